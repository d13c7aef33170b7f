"""KV cache for decoding: one LayerCache per layer, filled by the attention layer it
is handed to (Transformer.forward(ids, cache=...)).

    global layer   a buffer allocated once for the whole generation (prompt + new
                   tokens): the key of position p in slot p; linear memory
    local layer    a ring of `window` slots: position p in slot p % window, overwritten
                   once no later query can see it

    window 4, after 6 tokens:   slots [p4 p5 p2 p3]   (query 6 sees 3..6: p2 is stale)

Each update appends T keys at positions pos..pos+T-1 and returns the keys to attend
with a boolean (T, S) mask built from the absolute position of every slot, so the
order of the slots never matters (softmax and the weighted sum are sums over keys).
For T > 1 (a prompt chunk) the ring is read before it is written: the first queries of
the chunk still need the keys the chunk's last ones overwrite.

KV sharing (model.kv_shared_layers, Gemma 4): a sharing layer attends over what its
producer's update returned (keys, values and mask), so its own LayerCache is never
written and never allocated.

The cache stores what the layer attends over, after RoPE: per KV head for `gqa`,
and for `mla` the per-head keys and values after the up-projection (not the latent),
which costs n_heads x (qk_head_dim + v_head_dim) per token instead of kv_lora_rank +
qk_rope_head_dim, but needs nothing MLA-specific here. A gated DeltaNet layer keeps a
StateCache instead: its convolution's last inputs and its recurrent state.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


class LayerCache:
    """One layer's keys and values (B, H, slots, D); allocated at the first update, with
    the shapes and dtype of the layer's own tensors."""

    def __init__(self, window: Optional[int], capacity: int):
        self.window = window
        self.capacity = capacity  # positions this cache can take in all
        self.slots = capacity if window is None else min(window, capacity)
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.pos_S: Optional[torch.Tensor] = None  # position held by each slot, -1: empty
        self.pos = 0  # positions written so far

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append k (B, H, T, Dk), v (B, H, T, Dv) at positions pos..pos+T-1; return the
        keys and values to attend and the (T, S) mask of what each new query may see."""
        T = k.shape[2]
        start, end = self.pos, self.pos + T
        if end > self.capacity:
            raise ValueError(f"the KV cache was made for {self.capacity} positions and {end} are asked; "
                             "make it with a larger capacity.")
        if self.k is None:
            B, H = k.shape[:2]
            self.k = k.new_zeros(B, H, self.slots, k.shape[-1])
            self.v = v.new_zeros(B, H, self.slots, v.shape[-1])
            self.pos_S = torch.full((self.slots,), -1, dtype=torch.long, device=k.device)
        q_pos = torch.arange(start, end, device=k.device)
        if self.window is None:
            self.k[:, :, start:end], self.v[:, :, start:end] = k, v
            keys, values, k_pos = self.k[:, :, :end], self.v[:, :, :end], torch.arange(end, device=k.device)
        elif T == 1:  # a decoding step overwrites position pos - window, which it cannot see
            slot = start % self.slots
            self.k[:, :, slot:slot + 1], self.v[:, :, slot:slot + 1] = k, v
            self.pos_S[slot] = start
            keys, values, k_pos = self.k, self.v, self.pos_S
        else:
            keys, values = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
            k_pos = torch.cat((self.pos_S, q_pos))
            n = min(T, self.slots)  # only the last `slots` new keys stay
            slot = q_pos[T - n:] % self.slots
            self.k[:, :, slot], self.v[:, :, slot] = k[:, :, T - n:], v[:, :, T - n:]
            self.pos_S[slot] = q_pos[T - n:]
        self.pos = end
        mask = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
        if self.window is not None:
            mask = mask & (q_pos[:, None] - k_pos[None, :] < self.window)
        return keys, values, mask

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class StateCache:
    """A recurrent layer's decoding state (gated DeltaNet, arch/linear_attention.py): the
    last `taps` inputs of its causal convolution and its recurrent state, the same size
    at any length. Filled by the layer: `conv_inputs` before, `state` and `pos` after."""

    def __init__(self, capacity: int, taps: int):
        self.capacity = capacity
        self.taps = taps  # conv_kernel - 1
        self.conv: Optional[torch.Tensor] = None  # (B, channels, taps)
        self.state: Optional[torch.Tensor] = None  # (B, heads, Dk, Dv), float32
        self.pos = 0

    def conv_inputs(self, x_BCT: torch.Tensor) -> torch.Tensor:
        """The new inputs (B, C, T) behind the `taps` before them (zeros before the
        first token, as the convolution's padding); keeps the last `taps` for next time."""
        T = x_BCT.shape[-1]
        if self.pos + T > self.capacity:
            raise ValueError(f"the KV cache was made for {self.capacity} positions and {self.pos + T} are asked; "
                             "make it with a larger capacity.")
        if self.conv is None:
            self.conv = x_BCT.new_zeros(*x_BCT.shape[:2], self.taps)
        full = torch.cat((self.conv, x_BCT), dim=-1)
        self.conv = full[..., full.shape[-1] - self.taps:]
        return full

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.state) if t is not None)


class KVCache:
    """The caches of all layers of a model, for sequences of up to `capacity` tokens
    (prompt and generated ones together)."""

    def __init__(self, windows: Sequence[Optional[int]], capacity: int):
        if capacity < 1:
            raise ValueError(f"a KV cache needs a capacity of at least 1 position (got {capacity}).")
        self.layers: List[LayerCache] = [LayerCache(w, capacity) for w in windows]
        self.capacity = capacity

    @classmethod
    def for_model(cls, model, capacity: int) -> "KVCache":
        """A cache for `model` (a Transformer): one entry per layer, with its window."""
        cache = cls([spec.window for spec in model.specs], capacity)
        for i, block in enumerate(model.layers):  # a recurrent layer brings its own (StateCache)
            if hasattr(block.attn, "new_cache"):
                cache.layers[i] = block.attn.new_cache(capacity)
        return cache

    @property
    def pos(self) -> int:
        """Tokens seen so far: the position of the next one."""
        return self.layers[0].pos if self.layers else 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
