"""AdamW with decay / no-decay groups, and the learning-rate schedules.

Weight-decay rule: every matrix decays (parameters with ndim >= 2: attention and
FFN projections, the stacked expert weights, routers, the embedding and an untied
head); vectors do not (ndim < 2: norm weights and biases). Decaying a norm weight
pulls it towards 0 (or, for Gemma's zero-centred norms, towards a scale of 1) for no
benefit, and biases are too few to matter. The router's per-expert selection bias is
a buffer, so no optimizer ever sees it.

Schedules give a multiplier of train.optim.lr for the s-th optimizer update
(s = 0, 1, ..., max_steps - 1), W = warmup_steps, N = max_steps, r = min_lr_ratio:

    warmup    s < W:  (s + 1) / W                          (reaches 1 at s = W - 1)
    cosine    s >= W: r + (1 - r) * (1 + cos(pi * p)) / 2, p = (s - W) / (N - W)
    wsd       s >= W: 1 until D = N - round(decay_fraction * N), then linear to r:
                      1 - (1 - r) * (s - D) / (N - D)
    constant  s >= W: 1

Cosine and WSD both reach r at s = N, one step past the last update, as the usual
definitions do.

With train.stages (arch/stages.py), a stage without `optim` follows the schedule
above over the whole run; a stage with it runs its own: the same formulas with
s - start and N = the stage's steps, times its peak lr / train.optim.lr.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from arch.config import OptimConfig
from arch.ranges import require_numbers
from arch.stages import Stage, stage_of_update
from arch.registry import RecipeError, choice_error

SCHEDULES = ("cosine", "wsd", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups by the rule in this module's docstring (trainable parameters only)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def mixed_tensor_types(model: nn.Module) -> bool:
    """True when some trainable parameters are DTensors and others plain tensors."""
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in model.parameters() if p.requires_grad}
    return len(kinds) > 1


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, max_steps: int,
                  min_lr_ratio: float, decay_fraction: float) -> float:
    """The factor applied to the peak learning rate at optimizer update `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    r = min_lr_ratio
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        p = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))
        if step < decay_start:
            return 1.0
        p = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - r) * p
    raise RecipeError(choice_error("train.optim.schedule", schedule, SCHEDULES, "a schedule"))


def staged_lr_multiplier(step: int, *, plan: Sequence[Stage], cfg: OptimConfig, max_steps: int) -> float:
    """`lr_multiplier` of the stage that update `step` belongs to (module docstring)."""
    stage = stage_of_update(plan, step)
    seg = stage.optim
    if seg is None:
        return lr_multiplier(step, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, max_steps=max_steps,
                             min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
    return seg.lr / cfg.lr * lr_multiplier(step - stage.start, schedule=seg.schedule, warmup_steps=seg.warmup_steps,
                                           max_steps=stage.steps, min_lr_ratio=seg.min_lr_ratio,
                                           decay_fraction=seg.decay_fraction)


def check_optim(cfg: OptimConfig, max_steps: int) -> None:
    """Fail before any tensor exists on a schedule or optimizer setting that cannot work.
    A loaded recipe has passed the number rules already; an OptimConfig built in code
    meets them here (lr, betas, eps, ... : arch/ranges.py)."""
    require_numbers(cfg, "train.optim")
    lr_multiplier(max_steps, schedule=cfg.schedule, warmup_steps=0, max_steps=max_steps,
                  min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)  # checks the name
    if len(cfg.betas) != 2:
        raise RecipeError(f"train.optim.betas = {list(cfg.betas)} must hold two numbers, e.g. [0.9, 0.95].")


class TypeSplitAdamW(torch.optim.AdamW):
    """AdamW whose groups may mix DTensors and plain tensors (FSDP2 + expert parallel:
    FSDP's shards are DTensors, the expert shards plain tensors). The fused and
    foreach kernels take one tensor type per call ("got mixed torch.Tensor and
    DTensor"), so each step updates a group's DTensors, then its
    plain tensors, each subset with the group's own kernel and hyper-parameters.
    Every parameter is updated once per step; the groups, their order and the state
    are AdamW's, so checkpoints match parameters by position as for any AdamW."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        full = [g["params"] for g in self.param_groups]
        try:
            for dtensors in (True, False):
                for group, params in zip(self.param_groups, full):
                    group["params"] = [p for p in params if isinstance(p, DTensor) == dtensors]
                super().step()
        finally:
            for group, params in zip(self.param_groups, full):
                group["params"] = params
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, max_steps: int, device_type: str,
                    plan: Optional[Sequence[Stage]] = None
                    ) -> Tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` plus a LambdaLR stepped once per optimizer update;
    `plan`: the run's stages, whose own schedule segments replace the run's."""
    check_optim(cfg, max_steps)
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    # FSDP2 + expert parallel mixes DTensors and plain tensors in one group; splitting
    # the groups instead would change the layout checkpoints are matched by
    cls = TypeSplitAdamW if mixed_tensor_types(model) else torch.optim.AdamW
    opt = cls(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if plan is not None and any(s.optim is not None for s in plan):
        # a partial, not a callable object: LambdaLR's state_dict would carry an object's
        # attributes (the plan) into the checkpoint, and load them back over the recipe's
        fn = partial(staged_lr_multiplier, plan=tuple(plan), cfg=cfg, max_steps=max_steps)
    else:
        fn = partial(lr_multiplier, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, max_steps=max_steps,
                     min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    return opt, sched
