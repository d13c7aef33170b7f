"""Knowledge distillation: the student's cross-entropy on a target built from a
teacher's next-token distribution, chunked so that neither model's (tokens x vocab)
logits ever exist whole.

Per token, with capped logits z (cap(z) = c * tanh(z / c) or z), temperature tau and
the teacher's distribution p = softmax(z_t / tau), the target P is

    full      P = p
    topk      P = p on the teacher's k most likely ids, renormalised; 0 elsewhere
    sampled   Gemma 3's: k draws *with replacement* from p; P = p on the distinct ids
              drawn, renormalised over them; 0 for ids never drawn
    sampled_counts
              P = c / k, c_v = how often id v came up in the same k draws

and the distillation loss is tau^2 * H(P, q) = -tau^2 * sum_v P_v log q_v, with
q = softmax(z_s / tau) (tau^2 keeps the gradient's scale independent of tau, as in
Hinton et al.). For `full` this is tau^2 * (KL(p || q) + H(p)): the forward KL plus
the teacher's entropy, which has no gradient.

The two sampled targets differ in bias: E[c_v / k] = p_v, so `sampled_counts` gives
unbiased estimates of the `full` loss and gradient, while Gemma 3's renormalised
target leans toward the teacher's mode (p = (0.9, 0.1), k = 2: E[P_0] = 0.81 + 0.18 *
0.9 = 0.972, not 0.9); with k = 256 draws over a peaked distribution the two are close.
`sampled` is the report's; `sampled_counts` the unbiased alternative.

The optimised loss mixes it with the next-token loss on the true labels:

    loss = alpha * distill + (1 - alpha) * CE(softmax(z_s), y)

means over the rows whose label is not ignore_index. Like arch/loss.py, each chunk's
gradients with respect to the student's hidden states and head weight are formed at
once (d/dz_s = alpha * tau * (q - P) + (1 - alpha) * (softmax(z_s) - onehot(y)),
times the cap's derivative) and the logits dropped; backward only scales them.

Offline (train.distill.mode = offline), the targets of topk / sampled / sampled_counts
are computed beforehand as k (id, weight) slots per token (sparse_target) and
cached_distill_loss rebuilds P from them (dense_target) chunk by chunk; online builds P
through the same two functions, so both modes optimise the same loss from the same slots.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

KINDS = ("sampled", "sampled_counts", "topk", "full")


def _cap(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def sparse_target(zt_NV: torch.Tensor, kind: str, k: int, temperature: float,
                  generator: Optional[torch.Generator] = None):
    """The target of `topk` / `sampled` / `sampled_counts` as k (id, weight) slots per
    token: (ids (N, k) int64, weights (N, k) float32). `sampled` keeps the teacher's
    probability on each distinct id drawn, `sampled_counts` how often it came up (both
    unnormalised; slots past the distinct ids hold id 0, weight 0), `topk` the k most
    likely ids' probabilities. This is what the offline cache stores, k numbers a token
    instead of the vocabulary (lit_modules/train/distill_cache.py)."""
    p = torch.softmax(zt_NV.float() / temperature, dim=-1)
    if kind == "topk":
        vals, ids = p.topk(min(k, p.shape[-1]), dim=-1)
        return ids, vals
    if kind not in ("sampled", "sampled_counts"):
        raise ValueError(f"distillation kind {kind!r} has no sparse target; sparse kinds: topk, sampled, "
                         f"sampled_counts")
    draws = torch.multinomial(p, k, replacement=True, generator=generator).sort(-1).values
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.long().cumsum(-1) - 1  # the draws of one id share the slot of its first draw
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    ones = torch.ones(draws.shape, dtype=torch.float32, device=draws.device)
    counts = torch.zeros_like(ones).scatter_add_(1, slot, ones)
    if kind == "sampled_counts":
        return ids, counts
    return ids, p.gather(1, ids) * (counts > 0)


def dense_target(ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """Sparse slots -> the target P (float32, rows summing to 1) over `vocab` ids."""
    w = weights.float()
    w = w / w.sum(-1, keepdim=True)
    return torch.zeros(ids.shape[0], vocab, dtype=torch.float32, device=ids.device).scatter_add_(1, ids.long(), w)


def teacher_target(zt_NV: torch.Tensor, kind: str, k: int, temperature: float,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The target P (float32, rows summing to 1) from the teacher's capped logits."""
    if kind == "full":
        return torch.softmax(zt_NV.float() / temperature, dim=-1)
    if kind in ("topk", "sampled", "sampled_counts"):
        return dense_target(*sparse_target(zt_NV, kind, k, temperature, generator), zt_NV.shape[-1])
    raise ValueError(f"distillation kind {kind!r} is not one of {', '.join(KINDS)}")


def plain_distill_loss(h_s, w_s, h_t, w_t, y, kind: str, k: int = 256, temperature: float = 1.0,
                       alpha: float = 1.0, softcap_s: Optional[float] = None, softcap_t: Optional[float] = None,
                       vocab: Optional[int] = None, ignore_index: int = -100,
                       generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """The reference on the full logits: {"loss", "distill", "ce", "teacher_ce"}."""
    z_s = _cap(F.linear(h_s, w_s), softcap_s).float()
    with torch.no_grad():
        z_t = _cap(F.linear(h_t, w_t), softcap_t).float()
    V = vocab or z_s.shape[1]
    valid = (y != ignore_index).float()
    n = valid.sum().clamp_min(1)
    P = teacher_target(z_t[:, :V], kind, k, temperature, generator)
    distill = temperature ** 2 * (-(P * torch.log_softmax(z_s[:, :V] / temperature, -1)).sum(-1) * valid).sum() / n
    ce = F.cross_entropy(z_s, y, ignore_index=ignore_index)
    teacher_ce = F.cross_entropy(z_t, y, ignore_index=ignore_index)
    return {"loss": alpha * distill + (1 - alpha) * ce, "distill": distill, "ce": ce, "teacher_ce": teacher_ce}


def _online_target(h_t, w_t, y_safe, vf, kind, k, tau, cap_t, V, generator):
    """(P, summed teacher CE) of one chunk from the teacher's hidden states."""
    z_t = _cap((h_t.to(w_t.dtype) @ w_t.T).float(), cap_t)  # the teacher's own dtype (bf16 on a GPU)
    P = teacher_target(z_t[:, :V], kind, k, tau, generator)
    lse_t = torch.logsumexp(z_t, dim=-1)
    return P, ((lse_t - z_t.gather(1, y_safe[:, None]).squeeze(1)) * vf).sum()


def _chunk(h_s, w_s, target, y, valid, inv_n, tau, alpha, cap_s, V, need_grad):
    """One chunk: (summed distill, summed CE, summed teacher CE, d loss / d h_s, d loss / d w_s).
    target(y_safe, valid as float) -> (P over V ids, summed teacher CE)."""
    z = (h_s @ w_s.T).float()
    if cap_s is not None:
        t = torch.tanh(z / cap_s)
        z = cap_s * t
    y_safe = torch.where(valid, y, 0)
    vf = valid.float()
    P, teacher_ce = target(y_safe, vf)
    logq = torch.log_softmax(z[:, :V] / tau, dim=-1)
    distill = (tau * tau * -(P * logq).sum(-1) * vf).sum()
    lse = torch.logsumexp(z, dim=-1)
    ce = ((lse - z.gather(1, y_safe[:, None]).squeeze(1)) * vf).sum()
    if not need_grad:
        return distill, ce, teacher_ce, None, None
    g = torch.zeros_like(z)
    if alpha > 0:
        g[:, :V] = (alpha * tau) * (logq.exp_() - P)
    if alpha < 1:  # the one-hot subtracted in place: no second (rows x vocab) tensor
        g += (1 - alpha) * torch.exp(z - lse[:, None])
        g.scatter_add_(1, y_safe[:, None], torch.full_like(lse[:, None], alpha - 1))
    g *= (vf * inv_n)[:, None]
    if cap_s is not None:
        g *= 1.0 - t * t
    g = g.to(h_s.dtype)
    return distill, ce, teacher_ce, g @ w_s, (g.T @ h_s).float()


class _FusedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, y, opts: dict):
        N = h_s.shape[0]
        valid = y != opts["ignore_index"]
        n_valid = valid.sum().clamp_min(1)
        inv_n = 1.0 / n_valid.float()  # a device tensor: no host sync
        dtype, chunk, need_grad = opts["compute_dtype"], opts["chunk"], opts["need_grad"]
        hc, wc = h_s.to(dtype), w_s.to(dtype)
        grad_h = torch.empty_like(h_s) if need_grad else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=h_s.device)
        V = opts["vocab"] or w_s.shape[0]
        cached = opts["cached"]
        for s in range(0, N, chunk):
            e = s + chunk
            if cached is None:
                target = lambda ys, vf: _online_target(  # noqa: E731
                    h_t[s:e], w_t, ys, vf, opts["kind"], opts["k"], opts["temperature"], opts["softcap_t"], V,
                    opts["generator"])
            else:  # (ids, weights, teacher NLL per token), read from the offline cache
                target = lambda ys, vf: (dense_target(cached[0][s:e], cached[1][s:e], V),  # noqa: E731
                                         (cached[2][s:e].float() * vf).sum())
            d, c, tc, gh, gw = _chunk(hc[s:e], wc, target, y[s:e], valid[s:e], inv_n, opts["temperature"],
                                      opts["alpha"], opts["softcap_s"], V, need_grad)
            sums += torch.stack([d, c, tc])
            if need_grad:
                grad_h[s:s + chunk] = gh.to(h_s.dtype)
                grad_w += gw
        ctx.save_for_backward(grad_h, grad_w.to(w_s.dtype) if grad_w is not None else None)
        distill, ce, teacher_ce = (sums * inv_n).unbind()
        a = opts["alpha"]
        loss = a * distill + (1 - a) * ce
        ctx.mark_non_differentiable(distill, ce, teacher_ce)
        return loss, distill, ce, teacher_ce

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None)


def fused_distill_loss(h_s, w_s, h_t, w_t, y, kind: str, k: int = 256, temperature: float = 1.0,
                       alpha: float = 1.0, softcap_s: Optional[float] = None, softcap_t: Optional[float] = None,
                       vocab: Optional[int] = None, chunk: int = 4096, ignore_index: int = -100,
                       generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """plain_distill_loss's value and gradients (with respect to h_s and w_s only: the
    teacher is frozen), `chunk` rows at a time.

    h_s (N, D_s) and w_s (V_s, D_s) are the student's final hidden states and head;
    h_t (N, D_t) and w_t (V_t, D_t) the teacher's. `vocab`: the distributions cover
    the first `vocab` ids (the tokenizer's), for heads padded to different sizes;
    None: all of them (equal heads). Under autocast the student's matmuls run in the
    autocast dtype, the teacher's in its own; softmaxes and losses in float32."""
    if kind not in KINDS:
        raise ValueError(f"distillation kind {kind!r} is not one of {', '.join(KINDS)}")
    dtype = h_s.dtype
    if torch.is_autocast_enabled(h_s.device.type):
        dtype = torch.get_autocast_dtype(h_s.device.type)
    need_grad = torch.is_grad_enabled() and (h_s.requires_grad or w_s.requires_grad)
    opts = dict(kind=kind, k=k, temperature=temperature, alpha=alpha, softcap_s=softcap_s, softcap_t=softcap_t,
                vocab=vocab, chunk=chunk, ignore_index=ignore_index, generator=generator, compute_dtype=dtype,
                need_grad=need_grad, cached=None)
    with torch.autocast(h_s.device.type, enabled=False):
        loss, distill, ce, teacher_ce = _FusedDistill.apply(h_s, w_s, h_t.detach(), w_t.detach(), y, opts)
    return {"loss": loss, "distill": distill, "ce": ce, "teacher_ce": teacher_ce}


def cached_distill_loss(h_s, w_s, ids, weights, teacher_nll, y, temperature: float = 1.0, alpha: float = 1.0,
                        softcap_s: Optional[float] = None, vocab: Optional[int] = None, chunk: int = 4096,
                        ignore_index: int = -100) -> Dict[str, torch.Tensor]:
    """fused_distill_loss from targets computed beforehand (the offline mode): ids and
    weights (N, k) are sparse_target's slots (any float dtype; each row renormalised),
    teacher_nll (N,) the teacher's next-token loss per token (for the logged
    teacher_ce). The same loss and gradients as the online mode given the same slots."""
    dtype = h_s.dtype
    if torch.is_autocast_enabled(h_s.device.type):
        dtype = torch.get_autocast_dtype(h_s.device.type)
    need_grad = torch.is_grad_enabled() and (h_s.requires_grad or w_s.requires_grad)
    opts = dict(kind=None, k=ids.shape[-1], temperature=temperature, alpha=alpha, softcap_s=softcap_s,
                softcap_t=None, vocab=vocab, chunk=chunk, ignore_index=ignore_index, generator=None,
                compute_dtype=dtype, need_grad=need_grad, cached=(ids, weights, teacher_nll))
    with torch.autocast(h_s.device.type, enabled=False):
        loss, distill, ce, teacher_ce = _FusedDistill.apply(h_s, w_s, None, None, y, opts)
    return {"loss": loss, "distill": distill, "ce": ce, "teacher_ce": teacher_ce}
