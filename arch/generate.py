"""Autoregressive sampling with a KV cache (arch/cache.py).

The prompt is fed in chunks of at most `prefill_chunk` tokens (bounding the memory of
its attention scores and logits), then one token per forward. Every forward continues
the cache, so each token costs one position's worth of compute; the logits are those
of a full forward over the whole sequence (tests/arch/test_cache.py).

Sampling of one step, in float32: temperature 0 is greedy (argmax); otherwise the
logits are divided by the temperature, cut to the top_k best (0: all), then to the
smallest set of best tokens whose probability reaches top_p (1: all), and sampled.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .cache import KVCache


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B,) next-token ids from the last position's logits (B, V)."""
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits_BV.softmax(dim=-1).sort(dim=-1, descending=True)
        # a token stays when the tokens ranked above it hold less than top_p, so the
        # best one always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def dropless(model):
    """MoE layers route every token to its experts while generating (experts/moe.py
    apply_capacity), whatever their capacity factor."""
    layers = [m for m in model.modules() if hasattr(m, "apply_capacity")]
    saved = [m.apply_capacity for m in layers]
    for m in layers:
        m.apply_capacity = False
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.apply_capacity = s


@torch.inference_mode()
def generate(model, prompt_BT: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             prefill_chunk: int = 256) -> Iterator[torch.Tensor]:
    """Yield the (B,) next tokens one step at a time, as soon as each is sampled; stop
    after `max_new_tokens`, or once every row has produced `eos_id` (which is yielded;
    rows that ended keep being sampled, their tokens mean nothing)."""
    B, T = prompt_BT.shape
    if T < 1:
        raise ValueError("the prompt has no tokens; give at least one.")
    if max_new_tokens < 1:
        return
    total = T + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"{T} prompt tokens + {max_new_tokens} new ones exceed the model's max_seq_len "
                         f"({model.cfg.max_seq_len}); shorten the prompt or ask for fewer tokens.")
    # the last sampled token is never fed back, so the cache needs one position less
    cache = KVCache.for_model(model, total - 1)
    ended = torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
    with dropless(model):
        for i in range(0, T, prefill_chunk):
            logits = model(prompt_BT[:, i:i + prefill_chunk], cache=cache).logits
        for step in range(max_new_tokens):
            token_B = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            yield token_B
            if eos_id is not None:
                ended |= token_B == eos_id
                if bool(ended.all()):
                    return
            if step + 1 < max_new_tokens:
                logits = model(token_B[:, None], cache=cache).logits
