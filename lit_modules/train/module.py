"""The LightningModule for causal-LM pretraining of a recipe's model.

One optimizer step per batch, done by hand (manual optimization) so that gradient
accumulation, the global-batch balancing loss and the router-bias update sit in one
place, `training_step`:

    batch (B = micro_batch_size x grad_accum, seq_len + 1) -> inputs / targets
    [global aux scope: expert counts of all micro-batches, all ranks: precomputed for
     all but the last, which trains first and adds its own (global_counts exact), or
     summed as the micro-batches go (running)]
    for each micro-batch: loss = CE + sum(weighted balancing losses)
                          (with train.distill: alpha * distill + (1 - alpha) * CE + ...)
                          backward(loss / grad_accum)   (DDP syncs on the last only)
    clip -> finite check -> router-bias update -> AdamW step -> LR schedule step
    (the finite check does not wait for the device: train.finite_check, `_guard_update`)

With train.stages (arch/stages.py) the stage is a function of the step: each step
first enters its stage (the RoPE of each layer kind set on the model when the stage
changes) and splits its batch by the stage's micro-batch size; validation runs in the
stage just trained; checkpoints record the stage and the RoPE the weights were
trained with.

Scalars go straight to the loggers at optimizer-step numbers (step 1 is the first
update, validation at step 0 is the untrained model), so TensorBoard's x axis is the
optimizer step whatever the accumulation or the number of ranks.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from arch import build_model, count, materialize, recipe_to_yaml
from arch.config import Recipe
from arch.documents import document_ids, document_positions
from arch.registry import RecipeError
from arch.stages import Stage, recipe_at_step, stage_after, stage_of_update, stage_plan
from experts.layers import (clear_global_counts, freeze_moe_layers, next_micro_batch, precompute_global_counts,
                            update_router_biases)
from experts.parallel import all_reduce_sum

from lit_modules.checkpoints.training import check_checkpoint_recipe
from lit_modules.train.optim import build_optimizer
from lit_modules.train.strategy import ScalePlan, parallelize, set_qat_step, shard_model

log = logging.getLogger("moelab.train")

class TrainingFailed(RecipeError):
    """Training stopped on a condition the user must fix; the message says how."""


class NonFiniteLoss(TrainingFailed):
    """The step's loss or gradient norm is NaN or infinite (torch.isfinite: a finite
    loss, however large, is not); the update was not applied."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"{self.what} at step {step}")

    @property
    def what(self) -> str:
        """Which value went non-finite, with both values as they are."""
        if not math.isfinite(self.loss):
            return f"the loss is {self.loss} (gradient norm {self.grad_norm})"
        return f"the gradient norm is {self.grad_norm} (the loss, {self.loss}, is finite)"


def host_copy(t: torch.Tensor) -> Tuple[torch.Tensor, Optional["torch.cuda.Event"]]:
    """(`t` on the host, an event that is done once the copy is): on CUDA a copy into
    pinned memory queued behind the work that computes `t`, which the host neither waits
    for now nor, later, for the work queued after it (`event.synchronize()`); elsewhere
    `t` itself, and no event."""
    if t.device.type != "cuda":
        return t, None
    copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    copy.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return copy, done


class CausalLM(L.LightningModule):
    """Next-token pretraining of `recipe.model` with `recipe.train`'s optimisation.

    The model is built in `configure_model` (meta device -> parallelize -> materialise
    on the strategy's device), so state_dict keys are "model.<Transformer keys>".
    """

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self.train_cfg = recipe.train
        self.automatic_optimization = False
        self.model = None  # built in configure_model
        # weights to start from (train.init_from); set by the run for a fresh run only
        self.init_from: Optional[str] = None
        self.teacher = None  # train.distill's (lit_modules/train/distill.py), loaded in configure_model
        # the end-of-text id that ends each packed document (train.document_mask): set
        # by hand, or read from the Trainer's data module in setup
        self.eos_id: Optional[int] = None
        self.scale_plan = ScalePlan()  # expert parallel / FSDP layout (lit_modules/train/strategy.py)
        self.accounting = count(recipe.model, seq_len=recipe.train.seq_len)
        self.plan = stage_plan(recipe)
        self.staged = bool(recipe.train.stages)
        # FLOPs per token of each stage (attention grows with its seq_len)
        self.stage_flops = [count(recipe.model, seq_len=st.seq_len).flops_per_token for st in self.plan]
        self.stage: Optional[Stage] = None  # the stage whose RoPE the model has now
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes=recipe.model.vocab_size, average="micro",
                                          ignore_index=-100, validate_args=False)
        # a data mixture validates each source with its own loader (dataloader_idx = its
        # place in data.mix): a loss and an accuracy per source
        from lit_modules.data.mix import mix_entries

        self.val_mix = mix_entries(recipe.data)
        if self.val_mix is not None:
            from lit_modules.data.mix import stage_weights

            # per stage, the weights val/loss averages the sources' losses by (its training mixture)
            self.val_mix_weights = [w.tolist() for w in stage_weights(self.val_mix, self.plan)]
            self.val_mix_loss = torch.nn.ModuleList(MeanMetric() for _ in self.val_mix)
            self.val_mix_acc = torch.nn.ModuleList(
                MulticlassAccuracy(num_classes=recipe.model.vocab_size, average="micro", ignore_index=-100,
                                   validate_args=False) for _ in self.val_mix)
        # host-side records, also carried in checkpoints so a resumed run's summary is whole
        self.last_train: Dict[str, float] = {}
        self.val_history: List[Dict[str, float]] = []
        # per stage name: the first and last logged training loss (the summary's table)
        self.stage_losses: Dict[str, Dict[str, float]] = {}
        # train.finite_check = deferred: (step, loss, grad norm, non-finite flag) of the
        # last update, on the device until confirm_finite reads it
        self._pending_finite = None

    # ------------------------------------------------------------------ build

    def setup(self, stage: str) -> None:
        if self.train_cfg.document_mask and self.eos_id is None:  # the data module is set up by now
            dm = getattr(self._trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "eos_id"):
                raise RecipeError("train.document_mask = true needs the end-of-text id that separates documents; "
                                  "fit with moelab's TokenDataModule or set CausalLM.eos_id.")
            self.eos_id = int(dm.eos_id)

    def documents(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        """The model's document arguments for inputs `x` (arch/documents.py): none
        unless train.document_mask."""
        if not self.train_cfg.document_mask:
            return {}
        doc = document_ids(x, self.eos_id)
        return {"doc_ids": doc, "positions": document_positions(doc) if self.train_cfg.document_positions else None}

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this hook more than once
            return
        model = build_model(self.recipe.model, "meta")
        parallelize(model, self.train_cfg)
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        model = materialize(model, device)
        if self.init_from is not None:  # whole tensors, before expert parallel or FSDP slices them
            from lit_modules.checkpoints.model_dir import load_weights

            n = load_weights(model, self.init_from)
            log.info("model weights from %s (%d tensors)", self.init_from, n)
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        self.scale_plan = shard_model(model, self.train_cfg, device, precision)
        # expert shards differ between ranks: DDP must neither broadcast nor average them
        self._ddp_params_and_buffers_to_ignore = [f"model.{n}" for n in self.scale_plan.expert_names]
        freeze_moe_layers(model)  # the per-step helpers below find the layers without a module walk
        self.model = model
        if self.train_cfg.distill.teacher and self.train_cfg.distill.mode == "offline":
            self.teacher = self._cached_teacher(device)
        elif self.train_cfg.distill.teacher:
            from lit_modules.train.distill import Teacher

            self.teacher = Teacher.load(self.train_cfg.distill, device, self.recipe.model.final_softcap,
                                        self.recipe.model.vocab_size)

    def _cached_teacher(self, device: torch.device):
        """train.distill.mode = offline: the cache that run.train checked (every rank opens it)."""
        from arch.stages import stage_plan
        from lit_modules.train.distill_cache import CachedTeacher, cache_folder, identity

        dm = self._trainer.datamodule
        folder = cache_folder(self.recipe, identity(self.recipe, dm))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return CachedTeacher(folder, self.train_cfg.distill, self.recipe.model.final_softcap, rank, world,
                             stage_plan(self.recipe)[0].rows, device)

    def configure_optimizers(self):
        opt, sched = build_optimizer(self.model, self.train_cfg.optim, self.train_cfg.max_steps, self.device.type,
                                     self.plan)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all ranks (of the stage of the next step)."""
        st = stage_of_update(self.plan, self.global_step)
        return st.rows * st.seq_len * self.trainer.world_size

    def _tokens_per_stage(self, steps: int) -> List[int]:
        """Tokens per rank that each stage holds of the first `steps` optimizer steps."""
        last = self.plan[-1]
        return [min(max(steps - st.start, 0), steps if st is last else st.steps) * st.rows * st.seq_len
                for st in self.plan]

    def tokens_until(self, steps: int) -> int:
        """Tokens of the first `steps` optimizer steps over all ranks, stages included."""
        return sum(self._tokens_per_stage(steps)) * self.trainer.world_size

    def flops_until(self, steps: int) -> float:
        """Training FLOPs of the first `steps` optimizer steps over all ranks."""
        return sum(n * f for n, f in zip(self._tokens_per_stage(steps), self.stage_flops)) * self.trainer.world_size

    def enter_stage(self, stage: Stage) -> None:
        """Give the model `stage`'s RoPE (a no-op in the stage it is in)."""
        if self.stage is stage or self.model is None:
            return
        before = self.stage
        for kind in self.model.ropes:
            self.model.set_rope(kind, stage.rope(kind))
        self.stage = stage
        if self.staged and (before is None or before.index != stage.index):
            log.info("step %d  %s", self.global_step, stage.describe())
            if self._trainer is not None:
                self.log_scalars({f"stage/rope_theta/{k}": r.theta for k, r in stage.ropes}
                                 | {f"stage/rope_factor/{k}": r.factor for k, r in stage.ropes}
                                 | {"stage/index": stage.index, "stage/seq_len": stage.seq_len,
                                    "stage/sequences_per_step": stage.rows}
                                 | ({f"stage/mix/{e.name}": w for e, w in
                                     zip(self.val_mix, self.val_mix_weights[stage.index])}
                                    if self.val_mix is not None else {}))

    # ------------------------------------------------------------------ train

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        set_qat_step(self.model, self.train_cfg, self.global_step)
        stage = stage_of_update(self.plan, self.global_step)
        self.enter_stage(stage)
        if batch.shape[0] != stage.rows or batch.shape[1] != stage.seq_len + 1:
            raise RuntimeError(f"step {self.global_step + 1} of {stage.describe()} got a batch of shape "
                               f"{tuple(batch.shape)}; the data module and the stage plan disagree")
        x, y = batch[:, :-1], batch[:, 1:]
        xs, ys = x.split(stage.micro_batch_size), y.split(stage.micro_batch_size)
        docs = [self.documents(xi) for xi in xs]
        n = len(xs)
        if self.teacher is not None:
            self.teacher.begin_step(self.global_step, batch)
        # Qwen's global-batch loss needs the expert frequencies of the whole step (all
        # micro-batches, all ranks) before the first micro-batch's backward; with one
        # micro-batch the layers all-reduce them inside the forward. A routing pre-pass
        # counts all micro-batches but the last, which then trains first: its forward
        # adds its own counts, and the others train with the complete ones. Returns at
        # once when no layer has the global scope with exact counts (the running form
        # sums them as the micro-batches go, in order).
        order = list(range(n))
        if n > 1 and precompute_global_counts(self.model, list(zip(xs, ys, docs))[:-1], group=None, one_more=True):
            order = [n - 1] + order[:-1]
        sums: Dict[str, torch.Tensor] = {}
        try:
            for pos, i in enumerate(order):
                xi, yi, last = xs[i], ys[i], pos == n - 1
                if pos > 0:  # close the previous micro-batch's counts (a no-op without global counts)
                    next_micro_batch(self.model)
                # gradients are all-reduced only in the last micro-batch's backward
                if n > 1:  # one micro-batch: FSDP2's default (reduce every backward) is right
                    self.scale_plan.sync_grads(self.model, last)
                with opt.toggle_model(sync_grad=last):
                    self.new_graph_step()
                    if self.teacher is None:
                        out = self.model(xi, targets=yi, return_logits=False, **docs[i])
                        parts = {"ce_loss": out.loss}
                    else:  # out.loss: alpha * distill + (1 - alpha) * CE
                        mb = stage.micro_batch_size
                        head = self.teacher.head_loss(xi, yi, docs[i], rows=slice(i * mb, (i + 1) * mb))
                        # targets too: multi-token prediction modules still train on them
                        out = self.model(xi, targets=yi, return_logits=False, head_loss=head, **docs[i])
                        parts = head.parts
                    loss = out.loss + sum(out.aux.values())
                    self.manual_backward(loss / n)
                for name, value in {"loss": loss, **parts, **out.aux}.items():
                    v = value.detach() / n
                    sums[name] = sums[name] + v if name in sums else v
        finally:
            clear_global_counts(self.model)

        self.scale_plan.finish_grads(self.model)
        grad_norm = self._clip_gradients()
        # never apply an update computed from a non-finite loss or gradient norm
        raw = self._optimizer()
        keep = self._guard_update(raw, sums["loss"], grad_norm)
        update_router_biases(self.model, group=None, keep=keep)  # a no-op without a router bias rate
        lr = sched.get_last_lr()[0]
        try:
            opt.step()
        finally:  # found_inf is this step's alone (_guard_update)
            if raw is not None:
                vars(raw).pop("found_inf", None)
        opt.zero_grad(set_to_none=True)
        sched.step()

        step = self.global_step  # updates done, this one included
        # metrics are read on the host at logging steps only: a read of a loss tensor
        # waits for the whole step queued before it (the progress bar showed the loss of
        # every step, and so drained the queue once more each step)
        if step % self.train_cfg.log_every == 0 or step >= self.train_cfg.max_steps:
            # the mean over ranks: the loss of the global batch (a collective, at the same
            # steps on every rank)
            names = list(sums)
            values = self.trainer.strategy.reduce(torch.stack([sums[k].float() for k in names]), reduce_op="mean")
            metrics = {f"train/{k}": float(v) for k, v in zip(names, values)}
            metrics.update({"train/lr": lr, "train/grad_norm": float(grad_norm)})
            self.log_scalars(metrics)
            self.show("loss", metrics["train/loss"])  # kept until the next
            self.last_train = {"step": step, **{k[len("train/"):]: v for k, v in metrics.items()}}
            record = self.stage_losses.setdefault(stage.name, {"first": metrics["train/loss"]})
            record["last"] = metrics["train/loss"]
            log.info("step %d  " + "  ".join(f"{k[6:]} {v:.4g}" for k, v in metrics.items()), step)
            self.confirm_finite()  # the read above waited for this step: its verdict is free

    # ------------------------------------------------------------------ finite check

    def _guard_update(self, opt: Optional[torch.optim.Optimizer], loss: torch.Tensor,
                      grad_norm: torch.Tensor) -> Optional[torch.Tensor]:
        """Stop before `opt`'s update if it was computed from a non-finite loss or gradient norm.

        train.finite_check = step (or an optimizer that is not fused): read the verdict
        now, one host sync per step. deferred (fused AdamW): the verdict stays on the
        device and becomes the optimizer's `found_inf`, with which the fused kernel
        skips the whole update (weights, moments and step count); the returned flag
        keeps the router biases still too. The verdict is copied to pinned host memory
        as soon as it is computed (no wait), and the host reads that copy one step
        later (`confirm_finite`: the next step, a logging step, validation, a
        checkpoint and the end of training read it first), waiting only for the copy,
        never for the work queued after it; the run stops there, naming the step that
        went non-finite. Under several processes the verdict is all-reduced, so every
        rank skips or applies the same update."""
        step = self.global_step + 1
        if self.train_cfg.finite_check == "step" or opt is None or not opt.defaults.get("fused"):
            if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
                raise NonFiniteLoss(step, float(loss), float(grad_norm))
            return None
        bad = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        # all ranks (no-op in one process); not strategy.reduce, whose barrier waits on the host
        bad = all_reduce_sum(bad)
        self.confirm_finite()  # the previous step's verdict: long computed by now
        self._pending_finite = (step, loss, grad_norm, bad, host_copy(bad))
        opt.found_inf = bad.reshape(())  # read by AdamW.step (torch/optim/adam.py), dropped after it
        return bad == 0

    def confirm_finite(self) -> None:
        """Raise NonFiniteLoss for a step whose update was skipped on the device
        (`_guard_update`, deferred); a no-op when none is pending. One host read."""
        pending, self._pending_finite = self._pending_finite, None
        if pending is None:
            return
        step, loss, grad_norm, bad, (copy, done) = pending
        if done is not None:
            done.synchronize()  # the copy of that step's verdict, not the steps queued since
        if bool(copy > 0):
            raise NonFiniteLoss(step, float(loss), float(grad_norm))

    def _clip_gradients(self) -> torch.Tensor:
        """Total gradient norm before clipping (gradients already reduced over ranks);
        clips to train.grad_clip when it is > 0."""
        return self.scale_plan.clip(self.model, self.train_cfg.grad_clip)

    def new_graph_step(self) -> None:
        """Before each forward under train.compile = graphs: the outputs of the blocks'
        CUDA graphs from the last forward (and its backward) are no longer needed, so
        the next replay may overwrite them (torch.compile's reduce-overhead contract)."""
        if self.train_cfg.compile == "graphs":
            torch.compiler.cudagraph_mark_step_begin()

    def show(self, name: str, value: float) -> None:
        """Put `value` on the progress bar (not in the logs). As a CPU tensor: Lightning
        turns a float into a tensor on the model's device and reads the bar's values on
        the host after every step, which would wait for the GPU to finish the step."""
        self.log(name, torch.tensor(float(value)), prog_bar=True, logger=False)

    def log_scalars(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
        """Write scalars to every logger at `step` (default: the optimizer step)."""
        step = self.global_step if step is None else step
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ validation

    def on_train_end(self) -> None:
        self.confirm_finite()

    def on_validation_epoch_start(self) -> None:
        self.confirm_finite()  # never validate (or record) the weights of a failed step
        # validation at step n sees the weights step n+1 trains with (quantized from start_step)
        set_qat_step(self.model, self.train_cfg, self.global_step)

    def on_validation_start(self) -> None:
        self.enter_stage(stage_after(self.plan, self.global_step))

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch[:, :-1], batch[:, 1:]
        self.new_graph_step()
        out = self.model(x, targets=y, **self.documents(x))
        if self.val_mix is not None:
            self.val_mix_loss[dataloader_idx].update(out.loss, weight=y.numel())
            self.val_mix_acc[dataloader_idx].update(out.logits.argmax(-1), y)
            return
        self.val_loss.update(out.loss, weight=y.numel())
        self.val_acc.update(out.logits.argmax(-1), y)

    def _mix_metrics(self) -> Dict[str, float]:
        """Per source val/<name>/loss, /ppl, /acc; val/loss and val/acc are the means
        weighted by data.mix's weights (the loss expected on the training
        distribution), not the mean over all validation tokens."""
        metrics, loss, acc = {}, 0.0, 0.0
        weights = self.val_mix_weights[self.stage.index if self.stage is not None else 0]
        for e, w, lm, am in zip(self.val_mix, weights, self.val_mix_loss, self.val_mix_acc):
            lv, av = float(lm.compute()), float(am.compute())
            lm.reset(), am.reset()
            metrics.update({f"val/{e.name}/loss": lv, f"val/{e.name}/ppl": math.exp(min(lv, 80.0)),
                            f"val/{e.name}/acc": av})
            loss, acc = loss + w * lv, acc + w * av
        return {"val/loss": loss, "val/acc": acc, **metrics}

    def on_validation_epoch_end(self) -> None:
        per_source = {}
        if self.val_mix is not None:
            per_source = self._mix_metrics()
            loss, acc = per_source.pop("val/loss"), per_source.pop("val/acc")
        else:
            loss = float(self.val_loss.compute())
            acc = float(self.val_acc.compute())
            self.val_loss.reset()
            self.val_acc.reset()
        ppl = math.exp(min(loss, 80.0))  # perplexity = exp(mean token cross-entropy)
        metrics = {"val/loss": loss, "val/ppl": ppl, "val/acc": acc, **per_source}
        self.log_scalars(metrics)
        self.show("val_ppl", ppl)
        if not self.val_history or self.val_history[-1]["step"] != self.global_step:
            record = {"step": self.global_step, "loss": loss, "ppl": ppl, "acc": acc}
            if self.val_mix is not None:  # each source's loss: the summary's table per stage and source
                record["sources"] = {e.name: per_source[f"val/{e.name}/loss"] for e in self.val_mix}
            self.val_history.append(record)
        log.info("step %d  val loss %.4f  ppl %.2f  acc %.4f", self.global_step, loss, ppl, acc)

    # ------------------------------------------------------------------ checkpoints

    def _optimizer(self) -> Optional[torch.optim.Optimizer]:
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        return opt if isinstance(opt, torch.optim.Optimizer) else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.confirm_finite()  # a checkpoint is never written for a step that went non-finite
        # the interop code reads the architecture from here, and resume checks it
        # the RoPE of the stage that trained these weights, for whoever loads them
        checkpoint["moelab_recipe"] = recipe_to_yaml(recipe_at_step(self.recipe, self.global_step))
        checkpoint["moelab_records"] = {"last_train": self.last_train, "val_history": self.val_history,
                                        "stage_losses": self.stage_losses}
        st = stage_after(self.plan, self.global_step)
        if self.staged:  # a run without stages may be continued by a recipe that adds them
            checkpoint["moelab_stage"] = {"index": st.index, "name": st.name, "start": st.start,
                                          "steps_done": self.global_step - st.start, "seq_len": st.seq_len}
        if self.train_cfg.checkpoint_format == "sharded":  # every rank writes its own shards
            from lit_modules.checkpoints.sharded import prepare_for_saving

            opt = self._optimizer()
            prepare_for_saving(checkpoint, self, [opt] if opt is not None else [])
        elif self.scale_plan.ep > 1:  # whole experts in the file: loadable at any EP size
            from lit_modules.checkpoints.full import gather_experts

            gather_experts(checkpoint, self.model, self.scale_plan, self._optimizer())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from lit_modules.checkpoints.sharded import SHARDED_KEY

        check_checkpoint_recipe(checkpoint, self.recipe, "the checkpoint being resumed")
        if SHARDED_KEY in checkpoint:  # tensors read now, shaped for this rank's layout
            from lit_modules.checkpoints.sharded import load_shards

            load_shards(checkpoint, self)
        elif self.scale_plan.ep > 1:
            from lit_modules.checkpoints.full import slice_experts

            slice_experts(checkpoint, self.model, self.scale_plan)
        records = checkpoint.get("moelab_records", {})
        self.last_train = dict(records.get("last_train", {}))
        self.val_history = list(records.get("val_history", []))
        self.stage_losses = {k: dict(v) for k, v in records.get("stage_losses", {}).items()}


