"""`moelab train RECIPE [a.b=c ...]`: one training run in its own directory.

    <train.run_dir>/<train.run_name, or recipe name + timestamp>/
        recipe.yaml          the resolved recipe (proxy applied)
        train.log            header, a line per logging step, validation, checkpoints
        tb/                  TensorBoard event files
        checkpoints/         stepNNNNNNNN.ckpt (newest train.keep_checkpoints) + last.ckpt
        summary.json         written at the end

Resume: `train.resume=PATH` (or `resume=PATH`; PATH a .ckpt or a run directory), or
automatically when train.run_name names a run directory holding
checkpoints/last.ckpt. Everything a user can get wrong is checked, one sentence per
problem, before the Trainer exists.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from arch import count, load_recipe, recipe_to_yaml
from arch.config import Recipe
from arch.registry import RecipeError

# A multi-process launch re-runs this command in every rank; the launching process
# passes the run directory and the checkpoint it resolved, so all ranks agree.
LAUNCH_ENV = "MOELAB_TRAIN_LAUNCH"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a recipe's model: TensorBoard logs, checkpoints, resume")
    p.add_argument("recipe", help="a recipe path or a name under recipes/ (e.g. proxies/qwen3_moe_tiny)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="a.b=c overrides (e.g. train.max_steps=100); resume=PATH is short for train.resume=PATH")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    train(args.recipe, args.overrides)
    return 0


# ------------------------------------------------------------------ checks


def normalize_overrides(overrides: Sequence[str]) -> List[str]:
    """`resume=PATH` is accepted as the short form of `train.resume=PATH`."""
    return ["train." + o if o.startswith("resume=") else o for o in overrides]


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
    from lit_modules.optim import check_optim

    check_optim(t.optim, t.max_steps)


def check_on_accelerator(recipe: Recipe, accelerator: str) -> None:
    """Checks that depend on where the run goes, still before any data work."""
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
        if p.is_dir():
            p = p / "checkpoints" / "last.ckpt" if (p / "checkpoints").is_dir() else p / "last.ckpt"
        if not p.is_file():
            raise RecipeError(f"train.resume = {t.resume}: no checkpoint there; give a .ckpt file, a run "
                              f"directory holding checkpoints/last.ckpt, or 'auto'.")
        if named is None:  # continue the run the checkpoint belongs to
            named = p.parent.parent if p.parent.name == "checkpoints" else _new_run_dir(recipe)
        return named, p
    if named is not None:
        last = named / "checkpoints" / "last.ckpt"
        return named, last if last.is_file() else None
    if t.resume == "auto":  # the newest run of this recipe that has a checkpoint
        runs = sorted(Path(t.run_dir).glob(f"{Path(recipe.name).name}-*/checkpoints/last.ckpt"),
                      key=lambda p: p.stat().st_mtime)
        if runs:
            return runs[-1].parent.parent, runs[-1]
    return _new_run_dir(recipe), None


def check_resume(path: Path, recipe: Recipe) -> int:
    """Read a checkpoint's header (tensors memory-mapped, not loaded); refuse an
    unreadable file or another architecture. Returns its optimizer step."""
    import torch

    from lit_modules.module import check_checkpoint_recipe

    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # truncated, not a zip archive, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(f"checkpoint {path} cannot be read ({reason}); resume from another checkpoint "
                          f"or start a new run.") from None
    check_checkpoint_recipe(ckpt, recipe, f"checkpoint {path}")
    return int(ckpt.get("global_step", 0))


# ------------------------------------------------------------------ logging


class _RunLog:
    """train.log in the run directory: the `moelab.train` logger plus Lightning's."""

    def __init__(self, path: Optional[Path]):
        self.handler = None
        self.loggers = [logging.getLogger("moelab.train"), logging.getLogger("lightning.pytorch")]
        if path is not None:
            self.handler = logging.FileHandler(path)
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
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ train


def train(recipe_name: str, overrides: Sequence[str] = (), callbacks: Sequence = ()) -> Dict:
    """Run `moelab train`; returns the summary (also written to summary.json).
    `callbacks`: extra Lightning callbacks, for programmatic use."""
    recipe = load_recipe(recipe_name, normalize_overrides(overrides))
    t = recipe.train
    check_train(recipe)

    import lightning as L
    import torch

    # known-harmless notices of the libraries, which would bury the run's own output
    # (the data module resumes its loader from trainer.global_step, which Lightning's
    # mid-epoch warning does not know)
    for pattern in (r".*isinstance\(treespec, LeafSpec\).*", r".*`IterableDataset` has `__len__` defined.*",
                    r".*resuming from a checkpoint that ended before the epoch ended.*"):
        warnings.filterwarnings("ignore", message=pattern)
    _quiet_advert()
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_only

    from lit_modules.callbacks import (AtomicCheckpointIO, Checkpointing, RouterStats, StepProgressBar,
                                       Throughput, peak_flops_per_device)
    from lit_modules.data import TokenDataModule
    from lit_modules.module import CausalLM, NonFiniteLoss, TrainingFailed
    from lit_modules.strategy import (build_strategy, check_scale, resolve_accelerator, resolve_devices,
                                      resolve_precision)

    accelerator = resolve_accelerator(t)
    check_on_accelerator(recipe, accelerator)
    precision = resolve_precision(t, accelerator)
    strategy = build_strategy(t)
    check_scale(recipe)
    run_dir, resume = resolve_run(recipe)
    resume_step = check_resume(resume, recipe) if resume else 0
    rank0 = rank_zero_only.rank == 0

    if rank0:
        print(f"moelab train: run directory {run_dir}", flush=True)
    dm = TokenDataModule(recipe)
    if rank0:  # data errors surface here, before the Trainer; later ranks reuse the cache
        dm.prepare_data()  # not setup(): that must see the trainer's rank and world size
        if dm.vocab_size > recipe.model.vocab_size:
            raise RecipeError(f"the tokenizer has {dm.vocab_size} tokens but model.vocab_size is "
                              f"{recipe.model.vocab_size}; raise model.vocab_size to at least "
                              f"{dm.vocab_size} or use a smaller tokenizer.")
        run_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs are known good
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        # the run carries its tokenizer, so `moelab eval` / `export-hf` of the run need no
        # --tokenizer and the run's tokens can be reproduced on another machine
        if dm.tokenizer_path and Path(dm.tokenizer_path).is_file():
            shutil.copyfile(dm.tokenizer_path, run_dir / "tokenizer.json")
    runlog = _RunLog(run_dir / "train.log" if rank0 else None)
    try:
        if rank0:
            runlog.loggers[0].info("moelab train: run directory %s", run_dir)
            if resume:
                runlog.say(f"moelab train: resuming from {resume} (step {resume_step})")
            acc = count(recipe.model, seq_len=t.seq_len)
            runlog.say(f"moelab train: {recipe.name}: {acc.params_total / 1e6:.2f}M parameters "
                       f"({acc.params_active / 1e6:.2f}M active), {t.max_steps} steps of "
                       f"{t.micro_batch_size * t.grad_accum} x {t.seq_len} tokens per rank, "
                       f"{accelerator} {precision}")

        L.seed_everything(t.seed, workers=True, verbose=False)
        module = CausalLM(recipe)
        ckpt = Checkpointing(run_dir / "checkpoints", t.ckpt_every, t.keep_checkpoints)
        throughput = Throughput(module.accounting.flops_per_token, peak_flops_per_device(t.peak_tflops, precision),
                                t.log_every)
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
            logger=TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False, **tb_kwargs),
            callbacks=[throughput, RouterStats(t.log_every, t.expert_image_every), ckpt,
                       StepProgressBar(refresh_rate=t.log_every), *callbacks],
            plugins=[AtomicCheckpointIO()],
            enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=t.log_every,
            use_distributed_sampler=False,  # the DataModule shards by rank itself
            default_root_dir=str(run_dir),
        )
        os.environ[LAUNCH_ENV] = json.dumps({"run_dir": str(run_dir), "resume": str(resume) if resume else None})
        t0 = time.perf_counter()
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
            if validate and (not module.val_history or module.val_history[-1]["step"] != trainer.global_step):
                trainer.validate(module, datamodule=dm, verbose=False)
        except NonFiniteLoss as e:
            raise TrainingFailed(non_finite_message(e, recipe, ckpt.last_path)) from None
        except torch.cuda.OutOfMemoryError:
            raise TrainingFailed(
                f"out of GPU memory at step {trainer.global_step + 1} (micro_batch_size {t.micro_batch_size}, "
                f"seq_len {t.seq_len}); the last good checkpoint is {ckpt.last_path or 'none'}; lower "
                f"train.micro_batch_size (raise train.grad_accum to keep the batch), set "
                f"train.activation_checkpointing=true or model.fused_ce_chunk=4096.") from None
        finally:
            os.environ.pop(LAUNCH_ENV, None)
        wall = time.perf_counter() - t0

        summary = _summary(recipe, run_dir, module, trainer, throughput, ckpt, resume, wall)
        if trainer.is_global_zero:
            _write_json(run_dir / "summary.json", summary)
            first = module.val_history[0] if module.val_history else None
            ppl = (f"val ppl {first['ppl']:.2f} (step {first['step']}) -> {summary['val_ppl']:.2f} "
                   f"(step {summary['steps']}); " if first and summary["val_ppl"] is not None else "")
            tps = f" at {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else ""
            runlog.say(f"moelab train: done: {ppl}{summary['tokens']:,} tokens{tps}")
            runlog.say(f"moelab train: checkpoint {summary['checkpoint']}; summary {run_dir / 'summary.json'}")
        return summary
    finally:
        runlog.close()


def _summary(recipe, run_dir, module, trainer, throughput, ckpt, resume, wall) -> Dict:
    val = module.val_history[-1] if module.val_history else {}
    first = module.val_history[0] if module.val_history else {}
    perf = throughput.summary()
    acc = module.accounting
    return {
        "recipe": recipe.name,
        "run_dir": str(run_dir),
        "steps": trainer.global_step,
        "tokens": trainer.global_step * module.tokens_per_step,
        "train_loss": module.last_train.get("loss"),
        "train_ce_loss": module.last_train.get("ce_loss"),
        "val_loss": val.get("loss"),
        "val_ppl": val.get("ppl"),
        "val_acc": val.get("acc"),
        "initial_val_loss": first.get("loss") if first.get("step") == 0 else None,
        "initial_val_ppl": first.get("ppl") if first.get("step") == 0 else None,
        "tokens_per_s": perf["tokens_per_s"],
        "mfu": perf["mfu"],
        # the step file written last; a run resumed at its end writes none
        "checkpoint": str(ckpt.saved_path or ckpt.last_path or resume or "") or None,
        "last_checkpoint": str(ckpt.last_path) if ckpt.last_path else None,
        "resumed_from": str(resume) if resume else None,
        "params_total": acc.params_total,
        "params_active": acc.params_active,
        "flops_per_token": acc.flops_per_token,
        "wall_seconds": wall,
        "val_history": module.val_history,
    }


if __name__ == "__main__":  # python -m lit_modules.commands.train_cmd RECIPE [overrides]
    from lit_modules.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
