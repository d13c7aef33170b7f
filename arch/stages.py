"""Training stages (`train.stages`): one run through several stretches of steps, each
with its own sequence length, batch shape, learning-rate segment and RoPE, as Qwen3
(4K general -> knowledge-heavy -> 32K long context with a raised RoPE base) and
Gemma 3 (32K, then 128K with its global layers' RoPE interpolated x8) pretrain.

    train.stages: [{name: general, steps: 800},
                   {name: long, steps: 200, seq_len: 32768, micro_batch_size: 1,
                    rope: {global: {theta: 1000000}}}]

Everything is a function of the optimizer step, so a resumed run is in the right
stage by its step alone. Steps are counted over the whole run; stage k holds the
updates start_k .. start_k + steps_k - 1 (0-based), and

    update u              belongs to the stage holding u          (`stage_of_update`)
    after s updates       the model is that of update s - 1's stage (`stage_after`):
                          validation and checkpoints at a boundary are the stage just
                          finished, since its RoPE trained the weights

Shapes and RoPE carry over from the stage before when not given (the first stage's
from train.* and model.layer_kinds.*.rope); a stage's learning-rate segment does not
(without `optim` a stage follows the run's schedule, train.optim over max_steps), nor
does its data mixture (`mix`: weights over data.mix's sources, by name; without it a
stage draws by data.mix's weights; lit_modules/data/mix.py draws the windows).

No torch here: this module validates the recipe and answers questions about steps.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .config import OptimConfig, Recipe, RopeConfig
from .ranges import check_numbers
from .registry import RecipeError, nearest

# the fields of train.optim a stage may set: those of the schedule; the optimizer's own
# (weight_decay, betas, eps, fused) stay the run's, so its state keeps its meaning
SCHEDULE_FIELDS = ("lr", "schedule", "warmup_steps", "min_lr_ratio", "decay_fraction")
# which dimensions rotate is part of what the weights mean; every other RoPE field may change
FIXED_ROPE_FIELDS = ("partial",)


@dataclass(frozen=True)
class Stage:
    """One resolved stage: the updates start .. start + steps - 1 of the run."""

    index: int
    name: str
    start: int
    steps: int
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    ropes: Tuple[Tuple[str, RopeConfig], ...]  # (layer kind, its RoPE), every kind of the model
    optim: Optional[OptimConfig]  # this stage's own schedule segment; None: the run's schedule
    # (data.mix source name, weight) this stage draws from, as given; (): data.mix's weights
    mix: Tuple[Tuple[str, float], ...] = ()

    @property
    def end(self) -> int:
        """The step count once this stage is done (the next stage's start)."""
        return self.start + self.steps

    @property
    def rows(self) -> int:
        """Sequences per optimizer step on one rank."""
        return self.micro_batch_size * self.grad_accum

    def rope(self, kind: str) -> RopeConfig:
        return dict(self.ropes)[kind]

    def describe(self) -> str:
        ropes = ", ".join(f"{k} theta {r.theta:g}" + (f" {r.scaling} x{r.factor:g}" if r.scaling != "none" else "")
                          for k, r in self.ropes)
        lr = "the run's LR schedule" if self.optim is None else (
            f"its own {self.optim.schedule} LR segment (peak {self.optim.lr:g}, warmup {self.optim.warmup_steps})")
        total = sum(w for _, w in self.mix)
        data = "" if not self.mix else ", data " + " ".join(f"{n} {w / total:.0%}" for n, w in self.mix)
        return (f"stage {self.index} '{self.name}': steps {self.start + 1}..{self.end}, seq_len {self.seq_len}, "
                f"{self.grad_accum} x {self.micro_batch_size} sequences per step, RoPE {ropes}, {lr}{data}")


def _where(i: int, name: str) -> str:
    return f"train.stages[{i}]" + (f" ('{name}')" if name else "")


def _merge(base, given: Dict, path: str, errors: List[str]):
    """`base` (a dataclass) with the fields of `given` replaced, typed by OmegaConf; an
    unknown key or a wrong type is one sentence naming `path`.<key>."""
    if not isinstance(given, dict):
        errors.append(f"{path} must be a mapping of fields, not {given!r}.")
        return None
    valid = [f.name for f in dataclasses.fields(base)]
    for key in given:
        if key not in valid:
            errors.append(f"{path}: unknown key '{key}'{nearest(str(key), valid)}; valid keys here are "
                          f"{', '.join(valid)}.")
            return None
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), given))
    except ConfigKeyError as e:  # pragma: no cover - keys are checked above
        errors.append(f"{path}: {str(e).splitlines()[0]}.")
    except OmegaConfBaseException as e:
        key = getattr(e, "key", None) or "?"
        errors.append(f"{path}.{key}: wrong type: {str(e).splitlines()[0]}.")
    return None


def _numbers(section, pattern_prefix: str, path: str, errors: List[str]) -> None:
    """check_numbers with the model's or train.optim's rules, each message naming the
    stage's own key path."""
    for msg in check_numbers(section, pattern_prefix).values():
        errors.append(msg.replace(pattern_prefix, path, 1))


def _stage_mix(i: int, given, data_mix, errors: List[str]) -> Tuple[Tuple[str, float], ...]:
    """A stage's mix as (name, weight) pairs. Whether each name is a source of data.mix
    is checked beside data.mix's own names (lit_modules/data/mix.py stage_weights),
    where a source's default name is derived."""
    path = f"train.stages[{i}].mix"
    if not given:
        return ()
    if not isinstance(given, dict):
        errors.append(f"{path} must map names of data.mix's sources to weights, e.g. {{web: 1, code: 3}}, "
                      f"not {given!r}.")
        return ()
    if not data_mix:
        errors.append(f"{path} weighs sources of data.mix, but data.mix is not set; list the sources in data.mix "
                      f"(each {{source, weight, name}}) and give the stage weights by their names, or drop the "
                      f"stage's mix.")
        return ()
    out = []
    for name, w in given.items():
        ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
        if not ok:
            errors.append(f"{path}.{name} = {w!r} is not a positive weight; give each source the stage draws from "
                          f"a weight > 0 and leave out the sources it does not draw from.")
            return ()
        out.append((str(name), float(w)))
    return tuple(out)


def _resolve(recipe: Recipe, errors: List[str]) -> List[Stage]:
    from .resolve import ROPE_SCALINGS

    t, m = recipe.train, recipe.model
    prev_seq, prev_mbs, prev_acc = t.seq_len, t.micro_batch_size, t.grad_accum
    ropes = {k: lk.rope for k, lk in m.layer_kinds.items()}
    stages: List[Stage] = []
    names: Dict[str, int] = {}
    start = 0
    for i, s in enumerate(t.stages):
        name = s.name or f"stage{i}"
        where = _where(i, s.name)
        if name in names:
            errors.append(f"{where}: the name '{name}' is that of train.stages[{names[name]}] too; give each stage "
                          f"its own name (checkpoints record the stage by it).")
        names.setdefault(name, i)
        seq = s.seq_len if s.seq_len is not None else prev_seq
        if isinstance(seq, int) and isinstance(m.max_seq_len, int) and seq > m.max_seq_len:
            errors.append(f"{where}.seq_len = {seq} exceeds model.max_seq_len = {m.max_seq_len}; raise "
                          f"model.max_seq_len to the longest stage's context (it is the model's native context "
                          f"once trained) or lower the stage's seq_len.")
        new_ropes = dict(ropes)
        if not isinstance(s.rope, dict):
            errors.append(f"{where}.rope must map layer kinds to RoPE fields, e.g. {{global: {{theta: 1000000}}}}.")
        else:
            for kind, given in s.rope.items():
                path = f"train.stages[{i}].rope.{kind}"
                if kind not in ropes:
                    errors.append(f"{path}: '{kind}' is not a key of model.layer_kinds{nearest(str(kind), ropes)}; "
                                  f"the model's layer kinds are {', '.join(ropes)}.")
                    continue
                if isinstance(given, dict):
                    for f in FIXED_ROPE_FIELDS:
                        if f in given and given[f] != ropes[kind].__dict__[f]:
                            errors.append(f"{path}.{f} cannot change between stages: which dimensions rotate is "
                                          f"part of what the weights mean; set it in model.layer_kinds.{kind}.rope.")
                rope = _merge(ropes[kind], given, path, errors)
                if rope is None:
                    continue
                if rope.scaling not in ROPE_SCALINGS:
                    errors.append(f"{path}.scaling = '{rope.scaling}' is not a RoPE scaling"
                                  f"{nearest(rope.scaling, ROPE_SCALINGS)}; choose one of {', '.join(ROPE_SCALINGS)}.")
                if rope.scaling == "yarn" and rope.original_max_seq_len is None:
                    rope.original_max_seq_len = prev_seq  # the context trained before this stage
                _numbers(rope, "model.layer_kinds.*.rope", path, errors)
                new_ropes[kind] = rope
        optim = None
        if s.optim:
            bad = [k for k in s.optim if k not in SCHEDULE_FIELDS]
            if bad:
                errors.append(f"{where}.optim.{bad[0]} cannot be set per stage; a stage's optim sets its "
                              f"learning-rate segment only: {', '.join(SCHEDULE_FIELDS)}.")
            else:
                optim = _merge(t.optim, s.optim, f"train.stages[{i}].optim", errors)
                if optim is not None:
                    _numbers(optim, "train.optim", f"train.stages[{i}].optim", errors)
                    if isinstance(s.steps, int) and optim.warmup_steps > s.steps:
                        given = "" if "warmup_steps" in s.optim else " (train.optim's, as the stage sets none)"
                        errors.append(f"train.stages[{i}].optim.warmup_steps = {optim.warmup_steps}{given} is longer "
                                      f"than the stage ({s.steps} steps); set a shorter warmup_steps in the stage's "
                                      f"optim or lengthen the stage.")
        mix = _stage_mix(i, s.mix, recipe.data.mix, errors)
        mbs = s.micro_batch_size if s.micro_batch_size is not None else prev_mbs
        acc = s.grad_accum if s.grad_accum is not None else prev_acc
        steps = s.steps if isinstance(s.steps, int) else 0
        stages.append(Stage(i, name, start, steps, seq, mbs, acc, tuple(new_ropes.items()), optim, mix))
        start += steps
        prev_seq, prev_mbs, prev_acc, ropes = seq, mbs, acc, new_ropes
    return stages


def check_stages(recipe: Recipe) -> List[str]:
    """Every problem of train.stages, one sentence each; fills train.max_steps (null:
    the stages' sum). Called by arch.recipe.resolve_recipe after the model resolved."""
    t = recipe.train
    errors: List[str] = []
    if not t.stages:
        if t.max_steps is None:
            errors.append("train.max_steps is null, which means the sum of train.stages' steps, but train.stages is "
                          "empty; set train.max_steps.")
        return errors
    stages = _resolve(recipe, errors)
    total = sum(s.steps for s in stages)
    if t.max_steps is None:
        t.max_steps = total
    elif t.max_steps != total:
        errors.append(f"train.max_steps = {t.max_steps} but train.stages' steps add up to {total}; set "
                      f"train.max_steps to {total} or to null (the stages' sum), or change the stages' steps.")
    return errors


def stage_plan(recipe: Recipe) -> Tuple[Stage, ...]:
    """The run's stages, resolved; without train.stages one stage of the train fields
    (its `optim` None: the run's schedule). The recipe must have loaded (validated)."""
    t = recipe.train
    if not t.stages:
        ropes = tuple((k, lk.rope) for k, lk in recipe.model.layer_kinds.items())
        return (Stage(0, "main", 0, t.max_steps, t.seq_len, t.micro_batch_size, t.grad_accum, ropes, None),)
    errors: List[str] = []
    stages = _resolve(recipe, errors)
    if errors:
        raise RecipeError("\n".join(errors))
    return tuple(stages)


def stage_of_update(plan: Sequence[Stage], update: int) -> Stage:
    """The stage that optimizer update `update` (0-based) belongs to; past the end, the last."""
    i = bisect.bisect_right([s.start for s in plan], update) - 1
    return plan[max(i, 0)]


def stage_after(plan: Sequence[Stage], steps_done: int) -> Stage:
    """The stage whose RoPE and shapes trained the model after `steps_done` updates."""
    return stage_of_update(plan, max(steps_done - 1, 0))


def recipe_at_step(recipe: Recipe, steps_done: int) -> Recipe:
    """The recipe with model.layer_kinds.*.rope as the stage after `steps_done` updates
    has them: what a checkpoint of that step records, so that a model loaded from it
    (eval, generate, export) uses the RoPE its weights were trained with."""
    stage = stage_after(stage_plan(recipe), steps_done)
    kinds = {k: dataclasses.replace(lk, rope=stage.rope(k)) for k, lk in recipe.model.layer_kinds.items()}
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, layer_kinds=kinds))
