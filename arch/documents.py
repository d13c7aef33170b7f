"""Document masks for packed sequences: attention that stops at document boundaries.

A packed training sequence holds several documents, each ended by an end-of-text
token. `document_ids` numbers them per position (the eos belongs to the document it
ends); with them, a query attends only to keys of its own document, on top of the
causal mask and any sliding window:

    ids    a b <eos> c d <eos> e        doc   0 0 0 1 1 1 2
                keys ->
    q(a)   x . . . . . .
    q(b)   x x . . . . .
    q(eos) x x x . . . .
    q(c)   . . . x . . .
    q(d)   . . . x x . .
    q(eos) . . . x x x .
    q(e)   . . . . . . x

`document_positions` restarts the RoPE positions at 0 in each document, so a document
packed anywhere sees exactly the positions it would alone. arch never needs the eos id
itself: the caller (lit_modules/train/module.py) turns ids into document ids.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) int32: the number of eos tokens strictly before each position."""
    eos = (input_ids == eos_id).int()
    return (eos.cumsum(dim=1, dtype=torch.int32) - eos).to(torch.int32)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: each position's offset from the start of its document."""
    T = doc_ids.shape[1]
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # the start of t's document
    return t - first


def document_mask(doc_ids: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Boolean (B, 1, T, T): query i sees key j iff j <= i, i - j < window and both
    lie in one document (the SDPA and eager paths)."""
    T = doc_ids.shape[1]
    i = torch.arange(T, device=doc_ids.device)[:, None]
    j = torch.arange(T, device=doc_ids.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return (allowed & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def document_block_mask(doc_ids: torch.Tensor, window: Optional[int]) -> BlockMask:
    """The same mask as flex block sparsity, one per sequence of the batch: blocks of
    other documents are skipped, not computed and masked. Built per batch, outside
    compiled code (Transformer.forward does)."""
    B, T = doc_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return allowed & (q_idx - kv_idx < window) if window is not None else allowed

    return create_block_mask(mask_mod, B=B, H=None, Q_LEN=T, KV_LEN=T, device=doc_ids.device)
