"""Callbacks of `moelab train`: checkpoints, throughput/MFU, router statistics, the
progress bar, Ctrl-C, garbage collection; and the checkpoint writer that never leaves a
half-written file.

Every scalar is written at the optimizer step (trainer.global_step) it belongs to.
"""
from __future__ import annotations

import gc
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

log = logging.getLogger("moelab.train")


class Throughput(Callback):
    """perf/tokens_per_s (all ranks) and perf/mfu every `log_every` steps.

    MFU = tokens/s x training FLOPs per token (arch.count: 6 x active matmul
    parameters + causal attention) / (peak FLOP/s x devices). Time spent in
    validation and in writing checkpoints is left out; the first interval holds
    start-up (and compilation), so `summary()` averages over the rest. Tokens and FLOPs
    come from the module's count of each step's (tokens_until / flops_until), so an
    interval across a stage boundary (train.stages) counts each step at its stage's
    shape."""

    def __init__(self, flops_per_token: float, peak_flops: Optional[float], log_every: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.log_every = log_every
        self.intervals: List[tuple] = []  # (tokens, seconds, flops) per logging interval
        self.last_tps: Optional[float] = None
        self.last_mfu: Optional[float] = None
        self._val_seconds = 0.0
        self._val_t0 = time.perf_counter()
        self._world = 1

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _excluded(self, trainer) -> float:
        from lit_modules.checkpoints.training import Checkpointing

        ckpt = sum(cb.seconds for cb in trainer.callbacks if isinstance(cb, Checkpointing))
        return self._val_seconds + ckpt

    def on_train_start(self, trainer, pl_module) -> None:
        self._val_seconds = 0.0
        self._t, self._step, self._x = self._now(trainer), trainer.global_step, self._excluded(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._val_seconds += time.perf_counter() - self._val_t0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.log_every and step < trainer.max_steps:
            return
        now, excluded = self._now(trainer), self._excluded(trainer)
        seconds = max(1e-9, now - self._t - (excluded - self._x))
        tokens = pl_module.tokens_until(step) - pl_module.tokens_until(self._step)
        flops = pl_module.flops_until(step) - pl_module.flops_until(self._step)
        self._t, self._step, self._x = now, step, excluded
        if tokens == 0:
            return
        self.intervals.append((tokens, seconds, flops))
        self.last_tps = tokens / seconds
        metrics = {"perf/tokens_per_s": self.last_tps, "perf/tokens": pl_module.tokens_until(step)}
        if self.peak_flops:
            self.last_mfu = flops / seconds / (self.peak_flops * trainer.world_size)
            metrics["perf/mfu"] = self.last_mfu
        pl_module.log_scalars(metrics)
        pl_module.show("tok/s", self.last_tps)

    def summary(self) -> Dict[str, Optional[float]]:
        steady = self.intervals[1:] or self.intervals
        tokens, seconds, flops = (sum(iv[i] for iv in steady) for i in range(3))
        tps = tokens / seconds if seconds > 0 else None
        mfu = flops / seconds / self.peak_flops / self._world if (tps and self.peak_flops) else None
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        return {"tokens_per_s": tps, "mfu": mfu, "train_seconds": sum(iv[1] for iv in self.intervals),
                "peak_memory_gib": peak}  # this rank's device (rank 0's in summary.json)

    def setup(self, trainer, pl_module, stage) -> None:
        self._world = trainer.world_size


# ------------------------------------------------------------------ routers


def load_image(loads_ES: np.ndarray, cell: int = 4) -> np.ndarray:
    """Experts x steps heat map as a CHW uint8 RGB image (numpy only).

    Colour = log2(load / mean load) clipped to [-2, 2]: white is a balanced expert,
    red up to 4x the mean load, blue down to a quarter of it (black: no tokens).
    Each cell is `cell` pixels square so small maps stay readable."""
    loads = loads_ES.astype(np.float64)
    mean = loads.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log2(np.where(mean > 0, loads / mean, 1.0))
    r = np.clip(np.nan_to_num(r, neginf=-2.0), -2.0, 2.0) / 2.0  # [-1, 1]
    over, under = np.clip(r, 0, 1), np.clip(-r, 0, 1)
    rgb = np.stack([1.0 - under, 1.0 - over - under, 1.0 - over], axis=0)
    rgb[:, loads == 0] = 0.0
    img = (rgb * 255).round().astype(np.uint8)
    return img.repeat(cell, axis=1).repeat(cell, axis=2)


class RouterStats(Callback):
    """Per MoE layer i: router/layer{i}/{max_over_mean_load, entropy, dropped, bias_norm,
    aux_loss, z_loss} (the losses unweighted) every `log_every` steps, and router/layer{i}/load, an experts x steps image of the
    last `image_every` steps' expert loads, every `image_every` steps.

    With `record_path` (the run's router_loads.jsonl), the same steps' numbers are also
    appended there as one JSON line every `image_every` steps and at the last step:
    per layer, the tokens per expert summed over the steps since the previous line,
    the dropped slots summed likewise and the mean entropy (`moelab analyze` plots
    them). A resumed run first drops the lines past its checkpoint's step.

    Loads are the tokens per expert of the step's last micro-batch on rank 0 (no extra
    communication); they stay on the device until an image or a line is written, then
    all layers come to the host in one transfer."""

    # TensorBoard name -> experts.stats.router_stats key
    SCALARS = {"max_over_mean_load": "load_max_over_mean", "entropy": "entropy", "dropped": "dropped_tokens",
               "bias_norm": "bias_norm", "aux_loss": "aux_loss", "z_loss": "z_loss"}

    def __init__(self, log_every: int, image_every: int, record_path: Optional[Path] = None):
        self.log_every = log_every
        self.image_every = image_every
        self.record_path = Path(record_path) if record_path is not None else None
        # per step: float64 (MoE layers, E + 2) = tokens per expert, dropped slots, entropy
        # (float64: sums of many steps' counts stay exact), for the layers in self.layers
        self.history: List[torch.Tensor] = []
        self.layers: List[Union[int, str]] = []
        self.steps: List[int] = []  # the step of each history entry
        self.last_record = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_record = trainer.global_step
        path = self.record_path
        if trainer.is_global_zero and path is not None and path.is_file():
            import json

            def before(line: str) -> bool:  # a line cut short by a kill is dropped too
                try:
                    return int(json.loads(line)["step"]) <= trainer.global_step
                except (ValueError, KeyError, TypeError):
                    return False

            # lines written after the resumed checkpoint belong to a future that was lost
            lines = path.read_text().splitlines()
            keep = [ln for ln in lines if before(ln)]
            if len(keep) != len(lines):
                path.write_text("".join(ln + "\n" for ln in keep))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from experts.stats import router_stats

        if not trainer.is_global_zero:
            return
        stats = router_stats(pl_module.model)
        if not stats:
            return
        # rank 0 alone does this every step, and the other ranks wait for it at the next
        # collective: a few kernels for all layers together, no host read but at logging
        # and image steps
        step, per_layer = trainer.global_step, list(stats.values())
        if self.image_every > 0:
            self.history.append(torch.cat([
                torch.stack([st["tokens_per_expert"] for st in per_layer]).double(),
                torch.stack([st["dropped_tokens"] for st in per_layer]).double().reshape(-1, 1),
                torch.stack([st["entropy"] for st in per_layer]).double().reshape(-1, 1)], dim=1))
            self.layers = list(stats)
            self.steps.append(step)
            del self.history[:-self.image_every], self.steps[:-self.image_every]
        if step % self.log_every == 0 or step >= trainer.max_steps:
            names = [(i, name, key) for i, st in stats.items() for name, key in self.SCALARS.items() if key in st]
            values = torch.stack([stats[i][key].float().reshape(()) for i, _, key in names]).tolist()  # one read
            pl_module.log_scalars({f"router/layer{i}/{name}": v for (i, name, _), v in zip(names, values)})
        if self.image_every <= 0 or not self.history:
            return
        image = step % self.image_every == 0
        record = self.record_path is not None and (image or step >= trainer.max_steps) and step > self.last_record
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None) if image else None
        if tb is None and not record:
            return
        # one host transfer for every layer: (layers, steps, E + 2)
        table = torch.stack(self.history, dim=1).cpu().numpy()
        if tb is not None:
            for i, t in zip(self.layers, table):
                tb.experiment.add_image(f"router/layer{i}/load", load_image(t[:, :-2].T.astype(np.float32)), step,
                                        dataformats="CHW")
        if record:
            self._record(step, table)

    def _record(self, step: int, table: np.ndarray) -> None:
        import json

        n = sum(1 for s in self.steps if s > self.last_record)
        window = table[:, len(self.steps) - n:]
        layers = {str(i): {"tokens_per_expert": [int(round(x)) for x in t[:, :-2].sum(0)],
                           "dropped": int(round(t[:, -2].sum())), "entropy": float(t[:, -1].mean())}
                  for i, t in zip(self.layers, window)}
        line = json.dumps({"step": step, "steps": n, "layers": layers}, separators=(",", ":"))
        with open(self.record_path, "a") as f:
            f.write(line + "\n")
        self.last_record = step


# ------------------------------------------------------------------ progress bar


class StepProgressBar(TQDMProgressBar):
    """One bar over optimizer steps (0 .. max_steps, continuing across epochs and
    resumes), showing the loss, tokens/s and the latest validation perplexity."""

    def on_train_epoch_start(self, trainer, *_) -> None:
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.set_description("train")
        bar.n = trainer.global_step
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step
        if self._should_update(n, trainer.max_steps):
            self.train_progress_bar.n = n
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # one bar for the whole run

    def on_exception(self, trainer, pl_module, exception) -> None:
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None:
                bar.close()  # so the error message starts on a line of its own

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {k: _short(v) for k, v in items.items()}


def _short(v):
    """4 significant digits, thousands separated past 10,000 (tokens/s): 5.617, 1,027,000."""
    if not isinstance(v, float) or math.isnan(v):
        return v
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


class StepProfiler(Callback):
    """torch.profiler over optimizer steps [start, start + steps): each rank writes its
    operators by device time (CPU time without a GPU) to <dirpath>/rank<r>.txt (on a GPU
    also by host time, rank<r>_cpu.txt), and rank 0 its Chrome trace (trace.json, for
    Perfetto or chrome://tracing) and, on a GPU, how the trace's window splits into
    compute, collectives, both and idle (overlap.md, lit_modules.tools.trace_overlap).
    Where a step's time goes, in the run as it runs (strategy, compile and all),
    without a separate script."""

    def __init__(self, dirpath: Path, steps: int, start: int = 5, rows: int = 40):
        self.dirpath, self.steps, self.start, self.rows = Path(dirpath), steps, start, rows
        self._prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._prof is None and trainer.global_step == self.start:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, record_shapes=False)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._prof is not None and trainer.global_step >= self.start + self.steps:
            self._finish(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._prof is not None:
            self._finish(trainer)

    def _finish(self, trainer) -> None:
        prof, self._prof = self._prof, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.start = -1  # once per run
        self.dirpath.mkdir(parents=True, exist_ok=True)
        averages = prof.key_averages()
        # by device time; on a GPU by host time too (a GPU left idle waits on these)
        tables = ({"": "self_cuda_time_total", "_cpu": "self_cpu_time_total"} if torch.cuda.is_available()
                  else {"": "self_cpu_time_total"})
        for suffix, key in tables.items():
            table = averages.table(sort_by=key, row_limit=self.rows, max_name_column_width=70)
            (self.dirpath / f"rank{trainer.global_rank}{suffix}.txt").write_text(table + "\n")
        if trainer.is_global_zero:
            trace = self.dirpath / "trace.json"
            prof.export_chrome_trace(str(trace))
            if torch.cuda.is_available():
                from lit_modules.tools.trace_overlap import format_summary, summarize_file

                (self.dirpath / "overlap.md").write_text(format_summary(summarize_file(trace)) + "\n")
        log.info("profile of %d steps written to %s", self.steps, self.dirpath)


class SyncedGC(Callback):
    """Python's garbage collector on a schedule during fit (train.gc_every; torchtitan's
    gc_freq): automatic collection off, a generation-1 collection every `every`
    optimizer steps. An automatic collection (~1.3 ms of host time on an H200 machine)
    falls at a different moment on each rank, and under DDP / FSDP every rank waits for
    the slowest at the next collective; here all ranks collect at the same step.
    Generation 1 frees what the steps left behind; a full collection takes far longer.
    The collector's previous state comes back when training ends or fails."""

    def __init__(self, every: int):
        self.every = every
        self._was_enabled: Optional[bool] = None  # None: the collector is not ours now
        self._collected_at = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        gc.collect(1)
        self._collected_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # once per optimizer step: moelab's module takes a whole step per batch, but under
        # Lightning's own accumulation this hook runs per micro-batch at one global_step
        if step % self.every == 0 and step != self._collected_at:
            self._collected_at = step
            gc.collect(1)

    def _restore(self) -> None:
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore()


# ------------------------------------------------------------------ Ctrl-C


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; the message says at which step and what was kept.
    A KeyboardInterrupt, so `moelab` exits 130."""


class StopOnInterrupt(Callback):
    """Ctrl-C (SIGINT) during training finishes the optimizer step under way, then stops
    as at max_steps but without a validation pass: the Checkpointing callback writes
    that step's checkpoint in on_train_end. A second Ctrl-C stops at once, as does one
    before the first step (Lightning's own handling: on_exception hooks, then exit);
    `hard` says so. Under several processes the ranks agree on the step to stop at by a
    vote (an all-reduce and a host read on every rank), held every `vote_every` steps
    (moelab train: train.log_every) and after each validation, not at every step: each
    vote drains every rank's queue and waits for the slowest rank.

    SIGTERM (a scheduler's preemption, `kill`) during training stops the same way, at
    the same vote. Lightning's own SIGTERM handling is replaced for the run: under
    several processes it broadcast a flag from rank 0 and read it on the host at every
    step (`_broadcast_sigterm_tensor` of its training loop, and a broadcast inside its
    signal handler that only that per-step broadcast would meet), a wait on every
    rank's queue each step; and it stopped at the end of the step with no checkpoint.

        stop = StopOnInterrupt(); stop.install()   # around trainer.fit, main thread
        ...; stop.uninstall()                      # stop.stopped_at: the step, or None
    """

    def __init__(self, vote_every: int = 1):
        self.vote_every = max(1, vote_every)
        self.requested = False
        self.sigterm = False  # the stop was asked by SIGTERM (not Ctrl-C)
        self.hard = False
        self._trainer = None
        self.stopped_at: Optional[int] = None
        self._training = False
        self._rank0 = True
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested or not self._training:
            self.hard = True
            raise KeyboardInterrupt
        self.requested = True
        if self._rank0:
            print("\nmoelab train: Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to stop "
                  "at once)", file=sys.stderr, flush=True)

    def _sigterm(self, signum, frame) -> None:
        trainer = self._trainer
        if not self.sigterm and trainer is not None and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # the launched ranks hear it too (Lightning did this)
        first = not self.requested
        # Lightning's received_sigterm stays False: it would raise at the end of the step,
        # before the checkpoint
        self.requested = self.sigterm = True
        if first and self._rank0:
            print("\nmoelab train: SIGTERM: stopping after this step and writing a checkpoint", file=sys.stderr,
                  flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._training, self._rank0, self._trainer = True, trainer.is_global_zero, trainer
        # after Lightning's connector registered its handler (it restores the handlers
        # it found when fit ends); main thread only, as for SIGINT
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_broadcast_sigterm_tensor"):  # Lightning >= 2.5: its per-step broadcast and read
                loop._broadcast_sigterm_tensor = lambda: None

    def on_train_end(self, trainer, pl_module) -> None:
        self._training = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.world_size > 1 and step % self.vote_every and step < trainer.max_steps:
            return  # every rank skips the same steps
        self._check(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def _check(self, trainer) -> None:
        stop = self.requested
        if trainer.world_size > 1:  # a signal may reach the ranks on either side of a step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and self.stopped_at is None:
            self.requested = True
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # Lightning would validate on the way out
