"""Fused output head + cross-entropy that never holds the full logits.

For N tokens and a vocabulary V the plain path materialises N x V logits (plus
their float32 copy and gradient): with 16K tokens and V = 32K that is 2 GiB in
float32. Here rows are processed in chunks: each chunk's logits are formed, the
loss and the gradients with respect to the hidden states and the head weight are
computed at once (d loss / d logits = softmax - onehot), and the logits are
dropped. Backward only scales the stored gradients by the incoming one.

    plain:  loss = cross_entropy(cap(h @ W.T), y)       cap(z) = c * tanh(z / c) or z
    fused:  the same value and gradients, chunk by chunk
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F


def plain_cross_entropy(h_ND, w_VD, y_N, softcap: Optional[float] = None, ignore_index: int = -100):
    """The reference: full logits, float32 cross-entropy (mean over non-ignored rows)."""
    logits = F.linear(h_ND, w_VD)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float(), y_N, ignore_index=ignore_index)


def _chunk_loss_and_grads(h_c, w, y_c, valid_c, inv_n, softcap: Optional[float], need_grad: bool):
    """One chunk: (summed loss, d mean-loss / d h_c, d mean-loss / d w in float32).

    h_c and w are in the compute dtype; logits, softmax and loss in float32.
    d(lse - z_y)/dz = softmax(z) - onehot(y); compiled, the softmax shares the max and
    the sum of the logsumexp (one reduction over the vocabulary)."""
    z = (h_c @ w.T).float()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=-1)
    y_safe = torch.where(valid_c, y_c, 0)
    target_logit = z.gather(1, y_safe[:, None]).squeeze(1)
    loss = ((lse - target_logit) * valid_c).sum()
    if not need_grad:
        return loss, None, None
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == y_safe[:, None]
    g = torch.softmax(z, dim=-1) - onehot.float()
    g = g * (valid_c.float() * inv_n)[:, None]
    if softcap is not None:
        g = g * (1.0 - t * t)
    g = g.to(h_c.dtype)
    return loss, g @ w, (g.T @ h_c).float()


@functools.lru_cache(maxsize=1)
def _compiled_chunk():
    # dynamic=False: at most two shapes per run (the full chunk and the last one)
    return torch.compile(_chunk_loss_and_grads, dynamic=False)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, y_N, chunk: int, softcap, ignore_index: int, compute_dtype, need_grad,
                compiled: bool):
        N = h_ND.shape[0]
        valid_N = y_N != ignore_index
        n_valid = valid_N.sum().clamp_min(1)
        inv_n = 1.0 / n_valid.float()  # a device tensor: no host sync
        hc, wc = h_ND.to(compute_dtype), w_VD.to(compute_dtype)
        grad_h = torch.empty_like(h_ND) if need_grad else None
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        fn = _compiled_chunk() if compiled else _chunk_loss_and_grads
        for s in range(0, N, chunk):
            loss_c, gh, gw = fn(hc[s:s + chunk], wc, y_N[s:s + chunk], valid_N[s:s + chunk], inv_n,
                                softcap, need_grad)
            loss += loss_c
            if need_grad:
                grad_h[s:s + chunk] = gh.to(h_ND.dtype)
                grad_w += gw
        ctx.save_for_backward(grad_h, grad_w.to(w_VD.dtype) if grad_w is not None else None)
        return loss * inv_n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                grad_w * grad_out if grad_w is not None else None, None, None, None, None, None, None, None)


def fused_linear_cross_entropy(h_ND, w_VD, y_N, chunk: int = 4096, softcap: Optional[float] = None,
                               ignore_index: int = -100, compiled: bool = False):
    """Mean cross-entropy of cap(h @ w.T) against y, chunked; equals plain_cross_entropy.

    Under autocast the matmuls run in the autocast dtype (as F.linear would), the
    softmax and the loss in float32. `compiled` runs each chunk's math through
    torch.compile (model.fused_ce_compile)."""
    dtype = h_ND.dtype
    if torch.is_autocast_enabled(h_ND.device.type):
        dtype = torch.get_autocast_dtype(h_ND.device.type)
    need_grad = torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad)
    with torch.autocast(h_ND.device.type, enabled=False):
        return _FusedLinearCE.apply(h_ND, w_VD, y_N, chunk, softcap, ignore_index, dtype, need_grad, compiled)
