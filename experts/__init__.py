"""Mixture-of-Experts: routers, balancing losses, dispatch, expert backends.

Shape convention (suffixes on tensor names, used in every module here):
    T  tokens in the (flattened) batch        D  d_model
    E  experts                                F  d_expert
    K  top-k                                  I  rows of w_in (2F gated, F plain)
    S  routed (token, expert) slots, sorted by expert (S = T * K when dropless)

    MoE.forward:  x_TD -> router -> (weights_TK, ids_TK, scores_TE)
                  -> permute to x_SD (sorted by expert) -> backend -> y_SD
                  -> weight, unpermute (index_add) -> y_TD (+ shared experts)

Importing this package registers the `moe` layer, the routers and the backends in
arch's registries.
"""
from . import backends, moe, router  # noqa: F401  (registration)
from .moe import MoE

__all__ = ["MoE"]
