"""Training checkpoints of a run: written atomically, read as data only, and checked
against the recipe before a run resumes from one.

Two formats (train.checkpoint_format): a .ckpt file written by rank 0 (full), or a
.dcp folder every rank writes its shards into (sharded; lit_modules.checkpoints.sharded
does the tensors). Where they live is lit_modules.checkpoints.layout's business; this
module writes and reads them.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from arch import recipe_to_yaml
from arch.config import Recipe
from arch.registry import RecipeError
from arch.stages import recipe_at_step, stage_after, stage_plan

from lit_modules.checkpoints import layout
from lit_modules.checkpoints.sharded import read_header
from lit_modules.checkpoints.layout import CheckpointError
from lit_modules.checkpoints.safe import load_torch_file
from lit_modules.disk import DiskError, fsync_path, write_error

log = logging.getLogger("moelab.train")

LOAD_STARTED_KEY = "moelab_load_started"  # in a loaded checkpoint dict: when reading it began


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then os.replace.

    Lightning's own writer stages the file through fsspec, whose local transaction
    writes under $TMPDIR and then moves it; when $TMPDIR is another file system the
    move is a copy, and a kill during it leaves a truncated checkpoint under the
    final name. A rename within one directory is atomic on POSIX file systems.

    A path ending in .dcp is a sharded checkpoint folder: written here on one process
    (with several, the strategies write it from every rank themselves), read here by
    every strategy but FSDP2's. A failed write (full disk, read-only) removes the
    temporary file and is one DiskError naming the path; the files already there are
    untouched."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if layout.is_sharded_name(path):
            from lit_modules.checkpoints.sharded import save_sharded

            return save_sharded(checkpoint, path)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_path(path.parent)
        except OSError as e:
            raise write_error(e, "checkpoint", path, "free space on that disk or set train.run_dir to "
                                                     "another") from None
        finally:
            tmp.unlink(missing_ok=True)


    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """Resuming reads tensors and plain data only, whatever the caller asks:
        a checkpoint never runs code (read_checkpoint)."""
        return read_checkpoint(path)


def read_checkpoint(path) -> object:
    """A training checkpoint, read as data only: a .ckpt file (tensors memory-mapped),
    or a sharded folder's trainer.pt, whose tensors CausalLM.on_load_checkpoint reads
    next (checkpoint[SHARDED_KEY] names the folder). Notes when reading began, for the
    load time the run reports."""
    started = time.perf_counter()
    path = Path(path)
    ckpt = read_header(path) if path.is_dir() else load_torch_file(path)
    if isinstance(ckpt, dict):
        ckpt[LOAD_STARTED_KEY] = started
    return ckpt


class Checkpointing(Callback):
    """checkpoints/stepNNNNNNNN.ckpt (or, `sharded`, stepNNNNNNNN.dcp/) every `every`
    optimizer steps and at the end of training (every = 0: only at the end; -1: never), and last.ckpt (last.dcp) pointing at
    the newest one. Only complete checkpoints are ever named: each is written under a
    temporary name and renamed, then last.ckpt is replaced by a hard link to it (a copy
    where links are not supported), last.dcp by a relative symlink, through a rename.
    The newest `keep` step checkpoints are kept (0 = all); last.ckpt keeps its own
    link alive, and last.dcp points at the newest, which is kept.

    Times: `seconds` spent saving (excluded from throughput) over `saves` saves, and
    `load_seconds` spent restoring the checkpoint the run resumed from (else None)."""

    def __init__(self, dirpath: Path, every: int, keep: int = 3, sharded: bool = False):
        self.dirpath = Path(dirpath)
        self.every = every
        self.keep = keep
        self.sharded = sharded
        self.last_path: Optional[Path] = None  # the run's newest complete checkpoint
        self.saved_path: Optional[Path] = None  # the step checkpoint written last by this process
        self.saved_step = -1
        self.seconds = 0.0  # time spent writing, excluded from throughput
        self.saves = 0
        self.load_seconds: Optional[float] = None
        self._restored: Optional[tuple] = None  # (reading began, model restored)
        self._fit_started: Optional[float] = None

    @property
    def last(self) -> Path:
        return self.dirpath / (layout.LAST_SHARDED if self.sharded else layout.LAST_CHECKPOINT)

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.is_global_zero and self.dirpath.is_dir():  # leftovers of a killed writer
            for stale in layout.stale_partials(self.dirpath):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        self.last_path = layout.last_checkpoint(self.dirpath.parent)

    # Load time: from reading the checkpoint to the optimizer restored, less the
    # strategy's setup where Lightning does it in between (DDP restores the model
    # before wrapping it and the optimizer after; FSDP2 restores both after).

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        started = checkpoint.get(LOAD_STARTED_KEY)
        if started is not None:
            self._restored = (started, time.perf_counter())

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_started = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored is None:
            return
        started, restored = self._restored
        setup = max(0.0, self._fit_started - restored) if self._fit_started is not None else 0.0
        self.load_seconds = time.perf_counter() - started - setup
        self._restored = None
        log.info("step %d  checkpoint restored in %.2f s", trainer.global_step, self.load_seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every > 0 and trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every >= 0 and trainer.global_step != self.saved_step:
            self.save(trainer)

    def save(self, trainer) -> Path:
        t0 = time.perf_counter()
        step = trainer.global_step
        path = self.dirpath / layout.step_name(step, self.sharded)
        try:
            trainer.save_checkpoint(path, weights_only=False)  # every rank takes part
            if trainer.is_global_zero:
                self._point_last(path)
        except DiskError as e:  # last still names the checkpoint before: it is kept
            good = self.saved_path or self.last_path
            kept = (f"the last good checkpoint, {good}, is kept: resume from it with resume={good}" if good
                    else "no checkpoint was written before it")
            raise DiskError(f"training stopped at step {step}: {str(e).rstrip('.')}; {kept}.") from None
        if trainer.is_global_zero and self.keep > 0:
            for old in layout.step_files(self.dirpath)[:-self.keep]:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
        trainer.strategy.barrier("moelab_checkpoint")
        self.saved_step, self.saved_path, self.last_path = step, path, self.last
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.saves += 1
        log.info("step %d  checkpoint %s (%.2f s)", step, path, seconds)
        return path

    def _point_last(self, path: Path) -> None:
        """last.ckpt -> `path` (a hard link, a copy where links are not supported) or
        last.dcp -> `path` (a relative symlink), replaced in one rename."""
        tmp = self.dirpath / f".{self.last.name}.tmp-{os.getpid()}"
        try:
            tmp.unlink(missing_ok=True)
            if self.sharded:
                os.symlink(path.name, tmp)  # relative: the run directory may be moved
            else:
                try:
                    os.link(path, tmp)
                except OSError:
                    shutil.copyfile(path, tmp)
            os.replace(tmp, self.last)
            # a run that changed train.checkpoint_format keeps one last, the newest
            other = layout.LAST_CHECKPOINT if self.sharded else layout.LAST_SHARDED
            (self.dirpath / other).unlink(missing_ok=True)
            fsync_path(self.dirpath)
        except OSError as e:
            raise write_error(e, "checkpoint", self.last, "free space on that disk or set train.run_dir to "
                                                          "another") from None
        finally:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ resume checks


# Model fields that leave the weights' names, shapes and meaning alone: how they are
# computed (impl, backend, fused CE, init) or trained (balancing losses, jitter, bias
# rate, capacity, context length). A checkpoint may be resumed with other values, e.g.
# a higher aux_coef after an expert collapse. A key ending in "." matches a prefix.
IMPLEMENTATION_FIELDS = {"attention.impl", "moe.backend", "fused_ce_chunk", "fused_ce_compile", "init_std",
                         "init_scale_residual", "moe.balance.", "moe.router.jitter",
                         "moe.router.bias_update_rate", "moe.router.fast_logits", "moe.capacity_factor",
                         "max_seq_len"}


def _may_change(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in IMPLEMENTATION_FIELDS)


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def model_mismatch(checkpoint_recipe_yaml: str, recipe: Recipe) -> Optional[str]:
    """The first model field (other than IMPLEMENTATION_FIELDS) whose value differs, as
    'model.x: checkpoint A, recipe B', or None when the architectures agree."""
    ckpt = OmegaConf.to_container(OmegaConf.create(checkpoint_recipe_yaml)).get("model", {})
    ours = OmegaConf.to_container(OmegaConf.create(recipe_to_yaml(recipe)))["model"]
    a, b = dict(_flat(ckpt)), dict(_flat(ours))
    for key in list(dict.fromkeys(list(b) + list(a))):
        if _may_change(key):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return f"model.{key}: checkpoint {a.get(key, '<absent>')}, recipe {b.get(key, '<absent>')}"
    return None


def check_stage(checkpoint: dict, recipe: Recipe, where: str) -> None:
    """A checkpoint records the stage it was saved in (train.stages); the recipe must
    put its step in that stage, begun at the same step, or the run would resume in
    another stage than the one its weights and data position belong to. Stages may
    be lengthened, and stages after it changed or added."""
    saved = checkpoint.get("moelab_stage")
    if not isinstance(saved, dict):
        return  # a run without stages, or from before them: its step alone places it
    step = int(checkpoint.get("global_step", 0))
    ours = stage_after(stage_plan(recipe), step)
    if (saved.get("name"), saved.get("start")) != (ours.name, ours.start):
        raise RecipeError(f"{where} was saved at step {step} in stage '{saved.get('name')}' (begun at step "
                          f"{saved.get('start')}), but this recipe's train.stages put step {step} in stage "
                          f"'{ours.name}' (begun at step {ours.start}); resume with the stages it was trained "
                          f"with (those before its step unchanged).")


def check_checkpoint_recipe(checkpoint: dict, recipe: Recipe, where: str) -> None:
    """Refuse a checkpoint that is not moelab's, holds another architecture, or belongs
    to another stage. Its model is compared with the recipe's at the checkpoint's step:
    the RoPE a stage set (train.stages) is the recipe's own, not a difference."""
    if "moelab_recipe" not in checkpoint:
        raise RecipeError(f"{where} is not a moelab training checkpoint (it has no 'moelab_recipe' entry); "
                          f"resume from a checkpoints/*.ckpt written by `moelab train`.")
    check_stage(checkpoint, recipe, where)
    diff = model_mismatch(checkpoint["moelab_recipe"], recipe_at_step(recipe, int(checkpoint.get("global_step", 0))))
    if diff:
        raise RecipeError(f"{where} holds another architecture ({diff}); resume it with the recipe it was "
                          f"trained with, or start a new run (another train.run_name).")


def check_resume(path: Path, recipe: Recipe) -> int:
    """Read a checkpoint's header (a file's tensors memory-mapped, not loaded; a
    sharded folder's trainer.pt); refuse an unreadable or incomplete checkpoint or
    another architecture. Returns its optimizer step."""
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise RecipeError(f"cannot resume: {e}") from None
    if not isinstance(ckpt, dict):
        raise RecipeError(f"checkpoint {path} is not a Lightning checkpoint (a dict); resume from a "
                          f"checkpoints/*.ckpt written by `moelab train`.")
    check_checkpoint_recipe(ckpt, recipe, f"checkpoint {path}")
    return int(ckpt.get("global_step", 0))


# ------------------------------------------------------------------ init_from


def check_init_from(path, recipe: Recipe) -> None:
    """train.init_from: refuse, before any data work, a path that is not a moelab
    checkpoint, one of another architecture, or one whose tensors do not match it
    (the tensors' names and shapes are read, not their values)."""
    from lit_modules.checkpoints.model_dir import check_tensors, open_checkpoint

    try:
        source_recipe, src, _ = open_checkpoint(path)
        check_tensors(source_recipe, src.shapes(), path)
    except CheckpointError as e:
        raise RecipeError(f"train.init_from = {path}: {e}") from None
    diff = model_mismatch(recipe_to_yaml(source_recipe), recipe)
    if diff:
        raise RecipeError(f"train.init_from = {path} holds another architecture ({diff}); start from weights of "
                          f"this recipe's model, or train this recipe from scratch (train.init_from=null).")
