"""What `moelab train RECIPE [a.b=c ...]` does: one training run in its own directory
(the layout is lit_modules.checkpoints.layout's).

Resume: `train.resume=PATH` (or `resume=PATH`; PATH a .ckpt, a sharded .dcp folder or
a run directory), or
automatically when train.run_name names a run directory that holds a checkpoint.
Everything a user can get wrong is checked, one sentence per problem, before the
Trainer exists:

    check_train -> runtime (accelerator, precision, strategy) -> resolve_run
    -> check_resume -> data (prepare, vocabulary) -> open_run_dir (lock, recipe,
    tokenizer) -> Trainer.fit, with failures translated into one sentence

A new run that stops before its first checkpoint (an error, Ctrl-C) removes the run
directory it created, and says so. Ctrl-C finishes the step under way, writes its
checkpoint and exits 130 (callbacks.StopOnInterrupt).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from arch import count, load_recipe, recipe_to_yaml
from arch.config import Recipe
from arch.registry import RecipeError, check_choice
from lit_modules.checkpoints import layout
from lit_modules.checkpoints.layout import RunLock, check_run_name
from lit_modules.checkpoints.training import check_init_from, check_resume
from lit_modules.disk import REASONS, check_folder, reason, writing

# A multi-process launch re-runs this command in every rank; the launching process
# passes the run directory and the checkpoint it resolved, so all ranks agree.
LAUNCH_ENV = "MOELAB_TRAIN_LAUNCH"
RUN_FIX = "free space there, or set train.run_dir to a writable folder with room"


# ------------------------------------------------------------------ checks


def normalize_overrides(overrides: Sequence[str]) -> List[str]:
    """`resume=PATH` is accepted as the short form of `train.resume=PATH`."""
    return ["train." + o if o.startswith("resume=") else o for o in overrides]


FINITE_CHECKS = ("deferred", "step")


def check_train(recipe: Recipe) -> None:
    """What the number rules of load_recipe (arch/ranges.py) cannot see: fields
    against each other, and the free-form train.devices."""
    t = recipe.train
    if t.seq_len > recipe.model.max_seq_len:
        raise RecipeError(f"train.seq_len = {t.seq_len} exceeds model.max_seq_len = {recipe.model.max_seq_len}; "
                          f"lower train.seq_len or raise model.max_seq_len.")
    devices = t.devices
    if not (devices == "auto" or (isinstance(devices, int) and devices >= 1)
            or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices))):
        raise RecipeError(f"train.devices = {devices!r} must be 'auto', a positive number of devices or a list "
                          f"of device indices such as [0, 1].")
    check_choice("train.checkpoint_format", t.checkpoint_format, layout.CHECKPOINT_FORMATS, "a checkpoint format")
    # deferred: no host wait per step; step: each step checked before its update
    check_choice("train.finite_check", t.finite_check, FINITE_CHECKS, "a finite check")
    from lit_modules.train.distill import check_distill_config
    from lit_modules.train.optim import check_optim

    check_qat(recipe)
    check_documents(recipe)
    check_run_name(t.run_name)
    check_optim(t.optim, t.max_steps)
    check_distill_config(t.distill)
    if t.distill.teacher and t.distill.mode == "offline":
        from lit_modules.train.distill_cache import check_offline

        check_offline(recipe)
    from arch.stages import stage_plan

    from lit_modules.data.mix import mix_entries, stage_weights

    entries = mix_entries(recipe.data)
    if entries is not None:
        stage_weights(entries, stage_plan(recipe))  # a stage mix naming an unknown source
    for st in stage_plan(recipe):
        if st.optim is not None:
            try:
                check_optim(st.optim, st.steps)
            except RecipeError as e:
                raise RecipeError(str(e).replace("train.optim.", f"train.stages[{st.index}].optim.")) from None


def check_qat(recipe: Recipe) -> None:
    """train.qat's format, its include list and, for int4_b32, every quantized width
    (read from the model built on the meta device), before any data work."""
    from torch import nn

    from arch.quant import check_format, check_targets, quant_targets

    q = recipe.train.qat
    quant_targets(nn.Module(), q.include)  # the names in include, whatever the format
    if q.format is None:
        return
    check_format(q.format, "train.qat.format")
    import experts  # noqa: F401  (registers the MoE layer)
    from arch import build_model

    check_targets(quant_targets(build_model(recipe.model, "meta"), q.include), q.format, "train.qat.format")


def check_documents(recipe: Recipe) -> None:
    """train.document_mask / document_positions: positions restart only where attention
    stops, and the attention kind must build masks (arch/documents.py)."""
    t = recipe.train
    if t.document_positions and not t.document_mask:
        raise RecipeError("train.document_positions = true needs train.document_mask = true (positions restart "
                          "per document only where attention stops at documents); set both, or neither.")
    from arch.registry import ATTENTION

    kind = recipe.model.attention.kind
    if t.document_mask and kind in ATTENTION and not hasattr(ATTENTION.get(kind, "model.attention.kind"), "block_mask"):
        raise RecipeError(f"train.document_mask = true needs an attention kind that builds masks, and "
                          f"model.attention.kind = '{kind}' builds none; turn train.document_mask off.")


def check_on_accelerator(recipe: Recipe, accelerator: str) -> None:
    """Checks that depend on where the run goes, still before any data work."""
    from lit_modules.runtime import check_expert_backend

    check_expert_backend(recipe.model, "cuda" if accelerator in ("gpu", "cuda") else accelerator)
    a = recipe.model.attention
    if accelerator == "cpu" and a.impl == "flex":
        raise RecipeError("model.attention.impl = flex has no backward pass on CPU; use auto (SDPA on CPU, "
                          "flex on CUDA for windowed layers), sdpa or eager.")
    from arch.attention import FLEX_MIN_HEAD_DIM

    if accelerator != "cpu" and a.impl == "flex" and a.head_dim < FLEX_MIN_HEAD_DIM:
        raise RecipeError(f"model.attention.impl = flex needs head_dim >= {FLEX_MIN_HEAD_DIM} on CUDA (got "
                          f"{a.head_dim}); use auto (which falls back to SDPA there) or sdpa.")


def non_finite_message(e, recipe: Recipe, last_checkpoint: Optional[Path]) -> str:
    """What `moelab train` says on a NonFiniteLoss: the step, the value that went
    non-finite (never a finite loss called non-finite), the last good checkpoint and
    every field that commonly causes it, with its value now."""
    t, m = recipe.train, recipe.model
    thetas = ", ".join(f"model.layer_kinds.{k}.rope.theta (now {v.rope.theta:g})" for k, v in m.layer_kinds.items())
    clip = (f"lower train.grad_clip (now {t.grad_clip:g})" if t.grad_clip > 0
            else "set train.grad_clip (now 0: off), e.g. to 1.0")
    return (f"training stopped at step {e.step}: {e.what}; the last good checkpoint is "
            f"{last_checkpoint or 'none (none was written yet)'}; lower train.optim.lr (now {t.optim.lr:g}), "
            f"lengthen train.optim.warmup_steps (now {t.optim.warmup_steps}) or {clip}, or check the fields "
            f"that set the activations' scale: model.init_std (now {m.init_std:g}), model.norm.eps (now "
            f"{m.norm.eps:g}) and {thetas}; then resume with resume=<that checkpoint>.")


def _new_run_dir(recipe: Recipe) -> Path:
    base = Path(recipe.train.run_dir) / f"{Path(recipe.name).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def resolve_run(recipe: Recipe) -> Tuple[Path, Optional[Path]]:
    """(run directory, checkpoint to resume or None) from train.run_dir/run_name/resume."""
    launched = os.environ.get(LAUNCH_ENV)
    if launched:
        d = json.loads(launched)
        return Path(d["run_dir"]), Path(d["resume"]) if d["resume"] else None
    t = recipe.train
    named = Path(t.run_dir) / t.run_name if t.run_name else None
    if t.resume not in (None, "auto"):
        p = Path(t.resume)
        if p.is_dir() and not layout.is_sharded_name(p):  # a run directory
            p = layout.last_checkpoint(p) or p / layout.LAST_CHECKPOINT
        if not p.exists():
            raise RecipeError(f"train.resume = {t.resume}: no checkpoint there; give a .ckpt file, a sharded "
                              f"checkpoint folder (.dcp), a run directory holding {layout.CHECKPOINT_DIR}/"
                              f"{layout.LAST_CHECKPOINT} (or {layout.LAST_SHARDED}), or 'auto'.")
        if named is None:  # continue the run the checkpoint belongs to
            named = p.parent.parent if p.parent.name == layout.CHECKPOINT_DIR else _new_run_dir(recipe)
        return named, p
    if named is not None:
        return named, layout.last_checkpoint(named)
    if t.resume == "auto":  # the newest run of this recipe that has a checkpoint
        runs = [r for r in Path(t.run_dir).glob(f"{Path(recipe.name).name}-*") if layout.last_checkpoint(r)]
        if runs:
            newest = max(runs, key=lambda r: layout.last_checkpoint(r).stat().st_mtime)
            return newest, layout.last_checkpoint(newest)
    return _new_run_dir(recipe), None


# ------------------------------------------------------------------ logging


class _LogFile(logging.FileHandler):
    """train.log; a line that cannot be written (disk full) is said once, not as a
    traceback per line (logging's default)."""

    failed = False

    def handleError(self, record) -> None:
        e = sys.exc_info()[1]
        if not self.failed:
            self.failed = True
            why = reason(e) if isinstance(e, OSError) else str(e)
            print(f"moelab train: cannot write {self.baseFilename}: {why}; its lines are lost from here on",
                  file=sys.stderr, flush=True)


class _RunLog:
    """train.log in the run directory: the `moelab.train` logger plus Lightning's."""

    def __init__(self, path: Optional[Path]):
        self.handler = None
        self.loggers = [logging.getLogger("moelab.train"), logging.getLogger("lightning.pytorch")]
        if path is not None:
            self.handler = _LogFile(path)
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            for lg in self.loggers:
                lg.addHandler(self.handler)
            self.loggers[0].setLevel(logging.INFO)
            self.loggers[0].propagate = False  # the console shows the progress bar instead

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        if self.handler is not None:
            self.loggers[0].info(msg)

    def close(self) -> None:
        if self.handler is not None:
            for lg in self.loggers:
                lg.removeHandler(self.handler)
            self.handler.close()


def _no_advert(record: logging.LogRecord) -> bool:
    # Lightning's advice to allow TF32 matmuls is left out on purpose: under bf16-mixed
    # the float32 matmuls left are the routers', which stay in full float32 by design.
    msg = record.getMessage()
    return "litlogger" not in msg and "set_float32_matmul_precision" not in msg


def _quiet_advert() -> None:
    """Lightning advertises a hosted logger and TF32 at every start; drop those lines."""
    lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_advert not in lg.filters:
        lg.addFilter(_no_advert)


def _write_json(path: Path, obj: Dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing("the run summary", path, RUN_FIX):
            tmp.write_text(json.dumps(obj, indent=2) + "\n")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ train


def _quiet_libraries() -> None:
    """Known-harmless notices of the libraries, which would bury the run's own output
    (the data module resumes its loader from trainer.global_step, which Lightning's
    mid-epoch warning does not know; batches are slices of a memory-mapped token cache,
    0.3-0.6 ms of host time a step on an H100 host, so loader workers would buy little)."""
    for pattern in (r".*isinstance\(treespec, LeafSpec\).*", r".*`IterableDataset` has `__len__` defined.*",
                    r".*resuming from a checkpoint that ended before the epoch ended.*",
                    r".*does not have many workers which may be a bottleneck.*"):
        warnings.filterwarnings("ignore", message=pattern)
    _quiet_advert()


def prepare_data(dm, recipe: Recipe) -> None:
    """Tokenizer and token cache (rank 0; later ranks reuse the cache), so data errors
    surface before the Trainer exists. Not setup(): that must see the trainer's rank
    and world size."""
    dm.prepare_data()
    if dm.vocab_size > recipe.model.vocab_size:
        raise RecipeError(f"the tokenizer has {dm.vocab_size} tokens but model.vocab_size is "
                          f"{recipe.model.vocab_size}; raise model.vocab_size to at least "
                          f"{dm.vocab_size} or use a smaller tokenizer.")


def open_run_dir(run_dir: Path, recipe: Recipe, tokenizer_path) -> RunLock:
    """Create (or reopen) the run directory once the inputs are known good, take its
    lock before anything is written into it, then write the recipe and the tokenizer
    (so `moelab eval` / `export-hf` of the run need no --tokenizer). A write that
    fails is one sentence naming the directory, and a directory created here is
    removed again (never one whose lock another run holds)."""
    check_folder(run_dir, "the run directory", "set train.run_dir to a folder")
    created, lock = not run_dir.exists(), None
    try:
        with writing("the run directory", run_dir, RUN_FIX):
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir).acquire()
            (run_dir / layout.RECIPE_FILE).write_text(recipe_to_yaml(recipe))
            if tokenizer_path and Path(tokenizer_path).is_file():
                shutil.copyfile(tokenizer_path, run_dir / layout.TOKENIZER_FILE)
    except BaseException:
        if lock is not None:
            if created:
                _remove_unfinished(run_dir)
            lock.release()
        raise
    return lock


def _remove_unfinished(run_dir: Path) -> None:
    """A new run that stopped before its first checkpoint leaves nothing to resume:
    its directory (recipe, tokenizer, log, TensorBoard) goes, and this says so."""
    if layout.step_files(layout.checkpoint_dir(run_dir)) or layout.last_checkpoint(run_dir):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"moelab train: removed the run directory {run_dir}: the run stopped before its first checkpoint",
          flush=True)


def train(recipe_name: str, overrides: Sequence[str] = (), callbacks: Sequence = ()) -> Dict:
    """Run `moelab train`; returns the summary (also written to summary.json).
    `callbacks`: extra Lightning callbacks, for programmatic use."""
    recipe = load_recipe(recipe_name, normalize_overrides(overrides))
    t = recipe.train
    check_train(recipe)
    _quiet_libraries()
    from lightning.pytorch.utilities import rank_zero_only

    from lit_modules.data.datamodule import TokenDataModule
    from lit_modules.runtime import (check_compiled_experts, compute_dtype, resolve_accelerator, resolve_precision,
                                     resolve_speed)
    from lit_modules.train.strategy import build_strategy, check_scale

    accelerator = resolve_accelerator(t)
    asked_compile = t.compile  # auto is written back to recipe.yaml: it picks per machine
    resolve_speed(recipe, "cuda" if accelerator in ("gpu", "cuda") else accelerator)
    check_on_accelerator(recipe, accelerator)
    precision = resolve_precision(t, accelerator)
    check_compiled_experts(recipe.model, t.compile, compute_dtype(precision), "set train.precision=bf16-mixed")
    strategy = build_strategy(t)
    check_scale(recipe)
    run_dir, resume = resolve_run(recipe)
    resume_step = check_resume(resume, recipe) if resume else 0
    if t.init_from and not resume:
        check_init_from(t.init_from, recipe)
    rank0 = rank_zero_only.rank == 0
    dm = TokenDataModule(recipe)
    lock, created, runlog = None, False, None
    if rank0:
        print(f"moelab train: run directory {run_dir}", flush=True)
        if t.distill.teacher:  # before the corpus is tokenized
            from lit_modules.train.distill import check_teacher

            check_teacher(recipe, dm.prepare_tokenizer())
        prepare_data(dm, recipe)
        if t.distill.teacher and t.distill.mode == "offline":  # built beforehand by moelab distill-cache
            from lit_modules.train.distill_cache import check_cache

            check_cache(recipe, dm)
        created = not run_dir.exists()
        lock = open_run_dir(run_dir, replace(recipe, train=replace(t, compile=asked_compile)), dm.tokenizer_path)
    try:
        with writing("the run log", run_dir / layout.LOG_FILE, RUN_FIX):
            runlog = _RunLog(run_dir / layout.LOG_FILE if rank0 else None)
        if rank0:
            runlog.loggers[0].info("moelab train: run directory %s", run_dir)
            if resume:
                runlog.say(f"moelab train: resuming from {resume} (step {resume_step})")
            acc = count(recipe.model, seq_len=t.seq_len)
            from arch.stages import stage_plan

            plan = stage_plan(recipe)
            shape = (f"{t.micro_batch_size * t.grad_accum} x {t.seq_len} tokens per rank" if not t.stages else
                     f"{len(plan)} stages: " + ", ".join(f"{st.name} {st.steps} x {st.rows} x {st.seq_len}"
                                                         for st in plan) + " tokens per rank")
            runlog.say(f"moelab train: {recipe.name}: {acc.params_total / 1e6:.2f}M parameters "
                       f"({acc.params_active / 1e6:.2f}M active), {t.max_steps} steps of {shape}, "
                       f"{accelerator} {precision}")
            for st in plan[1:] if t.stages else ():
                runlog.loggers[0].info("moelab train: %s", st.describe())
        return _fit(recipe, run_dir, resume, resume_step, dm, accelerator, precision, strategy, callbacks, runlog)
    except BaseException:
        if created:
            _remove_unfinished(run_dir)
        raise
    finally:
        if runlog is not None:
            runlog.close()
        if lock is not None:
            lock.release()


def _fit(recipe: Recipe, run_dir: Path, resume: Optional[Path], resume_step: int, dm, accelerator: str,
         precision: str, strategy, callbacks: Sequence, runlog: "_RunLog") -> Dict:
    """Build the Trainer, fit, translate failures into one sentence, write the summary."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_modules.checkpoints.training import AtomicCheckpointIO, Checkpointing
    from lit_modules.runtime import peak_flops_per_device, resolve_devices
    from lit_modules.train.callbacks import (RouterStats, StepProfiler, StepProgressBar, StopOnInterrupt, SyncedGC,
                                             Throughput, TrainingInterrupted)
    from lit_modules.train.module import CausalLM

    t = recipe.train
    L.seed_everything(t.seed, workers=True, verbose=False)
    module = CausalLM(recipe)
    module.init_from = t.init_from if not resume else None  # a resumed run has its own weights
    ckpt = Checkpointing(layout.checkpoint_dir(run_dir), t.ckpt_every, t.keep_checkpoints,
                         sharded=t.checkpoint_format == "sharded")
    stop = StopOnInterrupt(vote_every=t.log_every)
    throughput = Throughput(module.accounting.flops_per_token, peak_flops_per_device(t.peak_tflops, precision),
                            t.log_every)
    router_stats = RouterStats(t.log_every, t.expert_image_every, run_dir / layout.ROUTER_LOADS_FILE)
    validate = t.val_every > 0 and t.val_batches > 0
    tb_kwargs = {"purge_step": resume_step + 1} if resume else {}
    trainer = L.Trainer(
        accelerator=accelerator, devices=resolve_devices(t), num_nodes=t.num_nodes, strategy=strategy,
        precision=precision,
        max_steps=t.max_steps, max_epochs=-1,
        val_check_interval=t.val_every if validate else None, check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches if validate else 0,
        # the sanity pass doubles as the step-0 validation of a fresh run
        num_sanity_val_steps=t.val_batches if (validate and not resume) else 0,
        logger=TensorBoardLogger(str(run_dir), name=layout.TB_DIR, version="", default_hp_metric=False,
                                 **tb_kwargs),
        callbacks=[throughput, router_stats, ckpt, stop,
                   StepProgressBar(refresh_rate=t.log_every),
                   *([StepProfiler(run_dir / "profile", t.profile_steps)] if t.profile_steps else []),
                   *([SyncedGC(t.gc_every)] if t.gc_every else []), *callbacks],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=t.log_every,
        use_distributed_sampler=False,  # the DataModule shards by rank itself
        default_root_dir=str(run_dir),
    )
    os.environ[LAUNCH_ENV] = json.dumps({"run_dir": str(run_dir), "resume": str(resume) if resume else None})
    t0 = time.perf_counter()
    stop.install()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
        interrupted = stop.stopped_at is not None and trainer.global_step < t.max_steps
        if validate and not interrupted and (not module.val_history
                                             or module.val_history[-1]["step"] != trainer.global_step):
            trainer.validate(module, datamodule=dm, verbose=False)
    except SystemExit:  # Lightning's answer to a KeyboardInterrupt: on_exception hooks, then exit(1)
        if not stop.hard:
            raise
        raise TrainingInterrupted(_interrupted_message(trainer.global_step, ckpt, resume, finished=False)) from None
    except Exception as e:
        failure = _failure(e, recipe, trainer, ckpt, run_dir)
        if failure is None:
            raise
        raise failure from None
    finally:
        stop.uninstall()
        os.environ.pop(LAUNCH_ENV, None)
    wall = time.perf_counter() - t0
    if interrupted:
        if not trainer.is_global_zero:
            raise SystemExit(130)  # rank 0 says it, once
        msg = _interrupted_message(trainer.global_step, ckpt, resume, finished=True)
        runlog.loggers[0].info("moelab train: %s", msg)
        raise TrainingInterrupted(msg)

    summary = _summary(recipe, run_dir, module, trainer, throughput, ckpt, resume, wall)
    if trainer.is_global_zero:
        _write_json(run_dir / layout.SUMMARY_FILE, summary)
        first = module.val_history[0] if module.val_history else None
        ppl = (f"val ppl {first['ppl']:.2f} (step {first['step']}) -> {summary['val_ppl']:.2f} "
               f"(step {summary['steps']}); " if first and summary["val_ppl"] is not None else "")
        tps = f" at {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else ""
        runlog.say(f"moelab train: done: {ppl}{summary['tokens']:,} tokens{tps}")
        parts = []
        if summary["checkpoint_saves"]:
            parts.append(f"{summary['checkpoint_saves']} saves in {summary['checkpoint_seconds']:.2f} s")
        if summary["checkpoint_load_seconds"] is not None:  # a resumed run, with or without saves
            parts.append(f"restored in {summary['checkpoint_load_seconds']:.2f} s")
        times = f" ({t.checkpoint_format}: {', '.join(parts)})" if parts else ""
        runlog.say(f"moelab train: checkpoint {summary['checkpoint']}{times}; summary "
                   f"{run_dir / layout.SUMMARY_FILE}")
    return summary


def _interrupted_message(step: int, ckpt, resume: Optional[Path], finished: bool) -> str:
    """What Ctrl-C kept: the checkpoint of the step it stopped at (`finished`), or, when
    stopped at once, the last one written before."""
    if finished:
        return f"interrupted at step {step}; checkpoint {ckpt.saved_path} (resume with resume={ckpt.saved_path})"
    good = ckpt.saved_path or ckpt.last_path or resume
    if good is None:
        return f"interrupted at step {step}, before any checkpoint was written; nothing was kept"
    return (f"interrupted at step {step}, stopped at once; the last checkpoint is {good} (resume with "
            f"resume={good})")


def _failure(e: Exception, recipe: Recipe, trainer, ckpt, run_dir: Path) -> Optional[RecipeError]:
    """A failure during training as one sentence: the step, the last good checkpoint
    and what to change; None for anything else (raised as it is)."""
    import torch

    from lit_modules.train.module import NonFiniteLoss, TrainingFailed

    t = recipe.train
    if isinstance(e, NonFiniteLoss):
        return TrainingFailed(non_finite_message(e, recipe, ckpt.last_path))
    if isinstance(e, OSError) and e.errno in REASONS:  # a write of the loggers (TensorBoard) or a callback
        where = e.filename or f"into the run directory {run_dir}"
        return TrainingFailed(f"training stopped at step {trainer.global_step}: cannot write {where}: {reason(e)}; "
                              f"{RUN_FIX}; the last good checkpoint is {ckpt.saved_path or ckpt.last_path or 'none'}.")
    if isinstance(e, torch.cuda.OutOfMemoryError):
        from arch.stages import stage_of_update, stage_plan

        st = stage_of_update(stage_plan(recipe), trainer.global_step)
        where = f"train.stages[{st.index}]." if t.stages else "train."
        return TrainingFailed(
            f"out of GPU memory at step {trainer.global_step + 1} (micro_batch_size {st.micro_batch_size}, "
            f"seq_len {st.seq_len}{f', stage {st.name}' if t.stages else ''}); the last good checkpoint is "
            f"{ckpt.last_path or 'none'}; lower {where}micro_batch_size (raise {where}grad_accum to keep the "
            f"batch), set train.activation_checkpointing=true or model.fused_ce_chunk=4096.")
    return None


def _summary(recipe, run_dir, module, trainer, throughput, ckpt, resume, wall) -> Dict:
    val = module.val_history[-1] if module.val_history else {}
    first = module.val_history[0] if module.val_history else {}
    perf = throughput.summary()
    acc = module.accounting
    return {
        "recipe": recipe.name,
        "run_dir": str(run_dir),
        "steps": trainer.global_step,
        "tokens": module.tokens_until(trainer.global_step),
        "train_loss": module.last_train.get("loss"),
        "train_ce_loss": module.last_train.get("ce_loss"),
        "val_loss": val.get("loss"),
        "val_ppl": val.get("ppl"),
        "val_acc": val.get("acc"),
        "initial_val_loss": first.get("loss") if first.get("step") == 0 else None,
        "initial_val_ppl": first.get("ppl") if first.get("step") == 0 else None,
        "tokens_per_s": perf["tokens_per_s"],
        "mfu": perf["mfu"],
        "peak_memory_gib": perf["peak_memory_gib"],
        "compile": recipe.train.compile,  # as run: false, true or graphs (auto resolved)
        # the step file written last; a run resumed at its end writes none
        "checkpoint": str(ckpt.saved_path or ckpt.last_path or resume or "") or None,
        "last_checkpoint": str(ckpt.last_path) if ckpt.last_path else None,
        "resumed_from": str(resume) if resume else None,
        "checkpoint_format": recipe.train.checkpoint_format,
        "checkpoint_saves": ckpt.saves,
        "checkpoint_seconds": ckpt.seconds,  # saving, all saves of this run (rank 0's, waits included)
        "checkpoint_load_seconds": ckpt.load_seconds,  # restoring the resumed checkpoint; None if not resumed
        "params_total": acc.params_total,
        "params_active": acc.params_active,
        "flops_per_token": acc.flops_per_token,
        "wall_seconds": wall,
        "val_history": module.val_history,
        "stages": _stage_summary(module, trainer.global_step) if recipe.train.stages else None,
    }


def _stage_summary(module, steps: int) -> List[Dict]:
    """Per stage: its shape, the first and last logged training loss, and the last
    validation in it (a validation at a boundary belongs to the stage just finished)."""
    from arch.stages import stage_after

    rows = []
    for st in module.plan:
        vals = [v for v in module.val_history if v["step"] > 0 and stage_after(module.plan, v["step"]) is st]
        losses = module.stage_losses.get(st.name, {})
        rows.append({"name": st.name, "start": st.start, "steps": st.steps, "seq_len": st.seq_len,
                     "micro_batch_size": st.micro_batch_size, "grad_accum": st.grad_accum,
                     "rope": {k: {"theta": r.theta, "scaling": r.scaling, "factor": r.factor} for k, r in st.ropes},
                     "tokens": module.tokens_until(min(st.end, steps)) - module.tokens_until(min(st.start, steps)),
                     "first_train_loss": losses.get("first"), "last_train_loss": losses.get("last"),
                     "val_loss": vals[-1]["loss"] if vals else None, "val_step": vals[-1]["step"] if vals else None,
                     # data.mix: the stage's weights per source and each source's last validation loss in it
                     "mix": dict(zip([e.name for e in module.val_mix], module.val_mix_weights[st.index]))
                     if module.val_mix is not None else None,
                     "val_sources": vals[-1].get("sources") if vals else None})
    return rows
