"""Mixture-of-Experts: routers, balancing losses, dispatch, expert backends.

Shape convention (suffixes on tensor names, used in every module here):
    T  tokens in the (flattened) batch        D  d_model
    E  experts                                F  d_expert
    K  top-k                                  I  rows of w_in (2F gated, F plain)
    S  routed (token, expert) slots, sorted by expert (S = T * K, dropped ones last)
    L  MoE layers

    MoE.forward:  x_TD -> router -> (weights_TK, ids_TK, scores_TE)     router.py
                  -> dispatch: permute to x_SD, sorted by expert        dispatch.py
                  -> backend (loop | grouped_mm) -> y_SD, each row      backends.py
                     scaled by its routing weight before the down projection
                  (triton: gather, experts and combine fused)           triton_backend.py
                  -> combine: unpermute, sum over k -> y_TD             dispatch.py
                  (+ shared experts)                                    moe.py

Losses: losses.py (formulas), moe.py (scopes); the counts a layer keeps between
forwards (global-batch counts, aux-loss-free bias loads): balance.py; everything
that walks a model's MoE layers (the training loop's balancing steps, expert
parallelism applied to a model): layers.py; router statistics: stats.py;
torch.distributed (collectives, the expert-parallel exchange): parallel.py only.

Importing this package registers the `moe` layer, the routers and the backends in
arch's registries.
"""
from . import backends, moe, parallel_dense, router, triton_backend  # noqa: F401  (registration)
from . import balance, layers, stats  # noqa: F401
from .moe import MoE

__all__ = ["MoE", "balance", "layers", "stats"]
