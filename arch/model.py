"""The decoder-only language model assembled from a resolved ModelConfig."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .cache import KVCache
from .config import ModelConfig, RopeConfig
from .loss import fused_linear_cross_entropy
from .norm import RMSNorm, build_norm
from .quant import read_weight
from .resolve import layer_specs
from .mla import rope_head_dim
from .mtp import MTPModule, mtp_specs, shift_left
from .per_layer import PerLayerEmbedding
from .rope import RoPE


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor]  # (B, T, V); may be None when only the loss is asked
    loss: Optional[torch.Tensor] = None  # mean next-token cross-entropy (ignore_index -100)
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)  # weighted balancing losses
    hidden: Optional[torch.Tensor] = None  # (B, T, D) after the final norm, with return_hidden


class Transformer(nn.Module):
    """Embedding -> blocks (one RoPE table per layer kind) -> final norm -> head
    [-> multi-token prediction modules, in training]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.specs = layer_specs(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.ropes = nn.ModuleDict(
            {kind: RoPE(self._rope_dim(kind), cfg.layer_kinds[kind].rope)
             for kind in dict.fromkeys(s.kind for s in self.specs)}
        )
        # Gemma 4's per-layer inputs (arch/per_layer.py); None when off
        self.per_layer = PerLayerEmbedding(cfg) if cfg.per_layer_input.dim else None
        self.layers = nn.ModuleList(Block(cfg, spec) for spec in self.specs)
        self.norm = build_norm(cfg.d_model, cfg.norm)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # multi-token prediction modules (empty unless model.mtp.depth > 0), training only
        self.mtp = nn.ModuleList(MTPModule(cfg, spec) for spec in mtp_specs(cfg, self.specs[-1]))

    def _rope_dim(self, kind: str) -> int:
        """The head width a kind's RoPE tables are for: its own head_dim, if it has one."""
        return self.cfg.layer_kinds[kind].head_dim or rope_head_dim(self.cfg.attention)

    @property
    def moe_layers(self) -> List[nn.Module]:
        return [b.ffn for b in self.layers if b.spec.moe]  # the MTP modules' apart: see forward

    def head_weight(self) -> torch.Tensor:
        return read_weight(self.embed if self.head is None else self.head)  # fake-quantized under QAT

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.cfg.scale_embeddings:  # Gemma: the scale is rounded to the weight dtype
            x = x * torch.tensor(math.sqrt(self.cfg.d_model), dtype=self.embed.weight.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_logits: bool = True, heads: bool = True, cache: Optional[KVCache] = None,
                return_hidden: bool = False,
                head_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                doc_ids: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None) -> LMOutput:
        """Logits, and the mean next-token loss when `targets` is given.

        With `return_logits=False` and `model.fused_ce_chunk > 0` the head and the loss
        are fused (arch/loss.py) and `logits` is None: the training path. With
        `return_logits=False` and no targets, or `heads=False`, the heads are skipped
        altogether (the bodies only, e.g. to count expert selections). In training mode
        with targets, the multi-token prediction modules run too (arch/mtp.py) and
        their weighted loss joins `aux` as "mtp_loss". With a `cache` (arch/cache.py),
        `input_ids` continue the sequence it holds: their positions start at
        `cache.pos`, and their keys and values join it. `head_loss(h_ND, head_weight)`
        replaces the next-token loss (distillation): called here, inside forward, where
        a sharded (FSDP2) head weight is whole. `return_hidden`: the final-normed
        hidden states in `hidden` too.

        Packed documents (arch/documents.py): `doc_ids` (B, T) numbers each position's
        document, and attention stops at their boundaries; `positions` (B, T) gives
        each token its RoPE position (document_positions: restarting per document; None:
        0..T-1). Neither goes with a `cache` (decoding is one document)."""
        x = self.embed_tokens(input_ids)
        T = input_ids.shape[1]
        start = 0 if cache is None else cache.pos
        if cache is not None and (doc_ids is not None or positions is not None):
            raise ValueError("doc_ids and positions are for packed training sequences, not for decoding with a "
                             "KV cache; leave them out when passing a cache.")
        if positions is None:
            ropes = {kind: rope(T, input_ids.device, start) for kind, rope in self.ropes.items()}
        else:
            ropes = {kind: rope.at(positions) for kind, rope in self.ropes.items()}
        # flex block masks, once per kind and outside the (compiled) blocks: built
        # inside a compiled block, a mask would be rebuilt on every call
        masks = {}
        for block in self.blocks():
            if cache is not None:  # cached attention masks by position (arch/cache.py)
                masks[block.spec.kind] = None
            elif block.spec.kind not in masks:
                make_mask = getattr(block.attn, "block_mask", None)  # registered kinds may have none
                if doc_ids is None:
                    masks[block.spec.kind] = make_mask(T, input_ids.device) if make_mask else None
                elif make_mask is None:
                    raise ValueError(f"the attention kind '{self.cfg.attention.kind}' builds no masks, so it cannot "
                                     "stop at document boundaries; turn train.document_mask off.")
                else:
                    masks[block.spec.kind] = make_mask(T, input_ids.device, doc_ids)
        # Gemma 4: per-layer inputs, and the keys and values KV-sharing layers reuse
        extra: Dict[str, object] = {}
        per_layer = None if self.per_layer is None else self.per_layer(input_ids, x)
        kv: Dict[int, tuple] = {}
        for i, block in enumerate(self.layers):
            if per_layer is not None:
                extra["per_layer"] = per_layer[:, :, i]
            if block.spec.kv_store or block.spec.kv_source is not None:
                extra["kv"] = kv
            x = block(x, ropes[block.spec.kind], masks[block.spec.kind], None if cache is None else cache.layers[i],
                      **extra)
        h = self.norm(x)
        logits = loss = None
        if heads and head_loss is not None:
            loss = head_loss(h.flatten(0, 1), self.head_weight())
        elif heads and (targets is not None or return_logits):
            if targets is not None and not return_logits and (self.cfg.fused_ce_chunk or 0) > 0:
                loss = self._loss(h, targets)
            else:
                logits = self._logits(h)
                if targets is not None:
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        moe, aux = self.moe_layers, {}
        if len(self.mtp) and targets is not None and self.training:
            mtp_loss = self._mtp(h, targets, ropes, masks, heads)
            moe = moe + [m.block.ffn for m in self.mtp if m.block.spec.moe]
            if mtp_loss is not None:
                aux["mtp_loss"] = mtp_loss
        if moe:
            aux = {**type(moe[0]).gather_aux(moe), **aux}
        return LMOutput(logits=logits, loss=loss, aux=aux, hidden=h if return_hidden else None)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.head_weight())
        cap = self.cfg.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def _loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head on `h` (B, T, D) against `targets` (B, T)."""
        if (self.cfg.fused_ce_chunk or 0) > 0:
            return fused_linear_cross_entropy(h.flatten(0, 1), self.head_weight(), targets.flatten(),
                                              self.cfg.fused_ce_chunk, self.cfg.final_softcap,
                                              compiled=bool(self.cfg.fused_ce_compile))
        return F.cross_entropy(self._logits(h).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def _mtp(self, h, targets, ropes, masks, heads: bool) -> Optional[torch.Tensor]:
        """The multi-token prediction loss (arch/mtp.py), None when `heads` is off."""
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            ids = shift_left(targets, k - 1)  # token i + k, as target i + k - 1 holds it
            y = shift_left(targets, k).masked_fill(ids < 0, -100)  # token i + k + 1
            kind = module.block.spec.kind
            h = module(h, self.embed_tokens(ids.clamp_min(0)), ropes[kind], masks[kind])
            if heads:
                losses.append(self._loss(h, y))
        return self.cfg.mtp.loss_weight / len(self.mtp) * sum(losses) if heads else None

    def set_rope(self, kind: str, cfg: RopeConfig) -> None:
        """Give the layers of `kind` another RoPE (base, scaling, factor): context
        extension between training stages (arch/stages.py). The weights are untouched;
        the tables are computed per forward, outside the compiled blocks, so nothing
        recompiles for a new base or factor. Attention that reads the RoPE config
        itself (MLA's YaRN softmax scale) is told too."""
        self.ropes[kind] = RoPE(self._rope_dim(kind), cfg)
        for block in self.blocks():
            if block.spec.kind == kind and hasattr(block.attn, "rope_changed"):
                block.attn.rope_changed(cfg)

    def blocks(self) -> List[Block]:
        """Every block: the model's layers, then the MTP modules' (compile, activation
        checkpointing and FSDP2 wrap each)."""
        return list(self.layers) + [m.block for m in self.mtp]

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after materialising a meta model."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.init_scale_residual else std
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith(("o_proj", "out_proj", "down_proj"))  # out_proj: gated DeltaNet's
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "init_weights") and module is not self:
                module.init_weights(std, out_std)  # MoE layers own their stacked weights
