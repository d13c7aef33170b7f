"""Accelerator, precision and strategy from the recipe, and how a model is prepared.

Strategies (`train.strategy`; `STRATEGIES` maps each to what `Trainer(strategy=)` takes):
  auto            one device; several (train.devices or num_nodes above 1): ddp.
  ddp             Lightning's DDPStrategy: weights replicated, gradients all-reduced
                  (train.grad_sync: by DDP's hooks, or, under CUDA graphs, with no DDP
                  wrapper by GradAverager).
  fsdp            FSDP2 (`fully_shard`) through Lightning's ModelParallelStrategy: every
                  block, then the root, sharded over all ranks.
  model_parallel  the same strategy as fsdp (the name Lightning uses).
`train.expert_parallel = EP > 1` works with ddp and fsdp: the ranks form a
(data_parallel = world / EP) x (expert = EP) mesh; each MoE layer keeps E / EP
experts (experts/layers.py shard_experts), exchanged by all-to-all inside each
expert group (experts/parallel.py).
Expert shards differ between ranks, so neither DDP nor FSDP may average them: they are
left out of both (DDP's ignore list, fully_shard's ignored_params) and
`ScalePlan.finish_grads` averages them over the ranks that hold the same shard.
Every rank reads its own data (the DataModule shards by global rank), so the
global-batch counts and the router-bias loads are summed over the whole world.

How a model is prepared (LightningModule.configure_model):
  1. `parallelize(model, train)` on the meta-device model: quantization-aware
     training's fake quantizers (train.qat), activation checkpointing, regional
     compile (also what `moelab bench` uses; no process group needed);
  2. materialise on the device: every rank initialises the whole model from the same
     seed, so any layout starts from the single-process weights (cost: one full
     float32 copy per rank for a moment; fine for the proxies, not for a model that
     does not fit one device);
  3. `shard_model(model, train)`: expert parallel (slice the experts), then FSDP2 per
     block and the root. STYLE.md's order (EP, AC, compile, FSDP) holds per module:
     AC and compile wrap forwards, which slicing and sharding leave in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from arch.config import TrainConfig
from arch.ranges import require_numbers
from arch.registry import RecipeError, check_choice
from experts.layers import check_expert_parallel
from lit_modules.runtime import graphs_refusal, processes


def _auto(train: TrainConfig) -> Any:
    """One process: Lightning's own choice (one device). Several (train.devices or
    train.num_nodes above 1): moelab's DDP, as train.strategy=ddp builds it. Lightning's
    auto would pick its plain DDP there, which writes a sharded checkpoint on rank 0
    alone while the others wait at the save's barrier: a deadlock."""
    return _ddp(train) if processes(train) > 1 else "auto"


def _ddp(train: TrainConfig) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    class MoelabDDPStrategy(DDPStrategy):
        """Lightning's DDP, except that a sharded checkpoint (a .dcp folder) is written
        by every rank: DDP's own save_checkpoint writes on rank 0 only. Loading goes
        through the CheckpointIO (lit_modules.checkpoints.training.AtomicCheckpointIO)."""

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            from lit_modules.checkpoints import layout

            if layout.is_sharded_name(filepath):
                from lit_modules.checkpoints.sharded import save_sharded

                return save_sharded(checkpoint, filepath)
            return super().save_checkpoint(checkpoint, filepath, storage_options)

        def configure_ddp(self) -> None:
            if grad_sync(train) == "hooks":
                return super().configure_ddp()
            # no DDP wrapper: the ranks start from rank 0's weights, as DDP would make
            # them, and the plan's GradAverager averages the gradients (shard_model)
            import logging

            broadcast_replicated(self.model)
            if self.global_rank == 0:
                logging.getLogger("moelab.train").info(
                    "train.grad_sync = step: no DDP wrapper; gradients averaged in buckets during each step's backward")

        def _register_ddp_hooks(self) -> None:
            # in place of Lightning's, which registers a hook passed to it, on CUDA only
            if train.grad_reduce_dtype == "bf16":
                reduce_in_bf16(self.model)

    # Every parameter takes part in every step (stacked expert weights are passed
    # whole to the backend), so DDP need not search for unused ones.
    return MoelabDDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)


@torch.no_grad()
def broadcast_replicated(module: nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank, as DDP does when it wraps a module,
    except those DDP is told to ignore (`_ddp_params_and_buffers_to_ignore`: expert
    shards, which differ between ranks)."""
    ignore = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name not in ignore:
            dist.broadcast(t.data, src=0)


def reduce_in_bf16(ddp: nn.Module) -> None:
    """train.grad_reduce_dtype = bf16 under DDP: each gradient bucket is cast to bf16,
    divided by the world size, all-reduced and written back in float32 (what torch's
    bf16_compress_hook does, which DDP accepts on CUDA and XPU only; this one runs on
    any backend, so the CPU tests run it too): half the bytes on the wire, the averaged
    gradient rounded to bf16."""
    ddp.register_comm_hook(None, _bf16_all_reduce)


def _bf16_all_reduce(group, bucket):  # no "-> Future[Tensor]": a string here, which DDP refuses
    group = group if group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    work = dist.all_reduce(compressed, group=group, async_op=True)

    def written_back(future) -> torch.Tensor:
        buffer.copy_(future.value()[0])
        return buffer

    return work.get_future().then(written_back)


def _fsdp(train: TrainConfig) -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

    sharded = train.checkpoint_format == "sharded"

    class FSDP2Strategy(ModelParallelStrategy):
        """Full (single-file) checkpoints load through lit_modules.checkpoints.full;
        sharded ones (train.checkpoint_format=sharded) are written and read by every
        rank through lit_modules.checkpoints.sharded, without gathering anything."""

        def lightning_module_state_dict(self):
            if sharded:  # this rank's shards (DTensors), not the gathered model
                return self.lightning_module.state_dict()
            return super().lightning_module_state_dict()

        def optimizer_state(self, optimizer):
            if sharded:  # CausalLM.on_save_checkpoint reads the live optimizer's shards itself
                return {}
            return super().optimizer_state(optimizer)

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            from lit_modules.checkpoints import layout

            if layout.is_sharded_name(filepath):
                from lit_modules.checkpoints.sharded import save_sharded

                return save_sharded(checkpoint, filepath)
            # One file, written by rank 0 (the gathered state is on rank 0 only). Every rank
            # computed the same path from the step (Checkpointing.save), so Lightning's
            # broadcast of it from rank 0, an object collective, is left out: on 4 GPUs under
            # FSDP2 + EP=4 it failed on one rank ("pickle data was truncated", 2026-11-27).
            if Path(filepath).is_dir():
                raise IsADirectoryError(f"the checkpoint path {filepath} is a directory; remove it or choose "
                                        f"another train.run_name.")
            if self.is_global_zero:
                self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            from lit_modules.checkpoints.training import read_checkpoint

            path = Path(checkpoint_path)
            if path.is_dir():  # sharded: tensors follow in CausalLM.on_load_checkpoint
                return read_checkpoint(path)
            from lit_modules.checkpoints.full import load_full_checkpoint

            return load_full_checkpoint(self, path)

        # Lightning's ModelParallelStrategy loads everything in load_checkpoint; a sharded
        # checkpoint's tensors arrive in the checkpoint dict instead, shaped for this rank
        def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
            if is_sharded(checkpoint):
                self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)

        def load_optimizer_state_dict(self, checkpoint) -> None:
            if is_sharded(checkpoint):
                Strategy.load_optimizer_state_dict(self, checkpoint)  # by position, as any strategy

    def is_sharded(checkpoint) -> bool:
        from lit_modules.checkpoints.sharded import SHARDED_KEY

        return SHARDED_KEY in checkpoint

    # Lightning's own (data_parallel x tensor_parallel) mesh is not used: shard_model
    # builds the (data_parallel x expert) one. Full checkpoints are unsharded state
    # dicts written by rank 0, which any world size or EP size can load
    # (CausalLM.on_save_checkpoint gathers the expert shards); sharded ones are
    # resharded by torch.distributed.checkpoint.
    return FSDP2Strategy(save_distributed_checkpoint=False)


# train.strategy -> factory(train) returning a Lightning strategy (or its name)
STRATEGIES: Dict[str, Callable[[TrainConfig], Any]] = {
    "auto": _auto,
    "ddp": _ddp,
    "fsdp": _fsdp,
    "model_parallel": _fsdp,
}


def build_strategy(train: TrainConfig) -> Any:
    check_choice("train.strategy", train.strategy, STRATEGIES, "a strategy")
    require_numbers(train, "train")  # a TrainConfig built in code: expert_parallel >= 1, ...
    if train.expert_parallel > 1 and train.strategy == "auto" and processes(train) == 1:
        raise RecipeError(f"train.expert_parallel = {train.expert_parallel} needs several processes; set "
                          f"train.devices (and train.strategy to ddp or fsdp), or train.expert_parallel=1.")
    check_grad_reduce(train.grad_reduce_dtype)  # train.ep_dispatch: check_scale, with the other EP checks
    check_graphs(train)
    check_grad_sync(train)
    return STRATEGIES[train.strategy](train)


def check_grad_sync(train: TrainConfig) -> None:
    """train.grad_sync: a known way, and `step` only where DDP would sync (FSDP2 reduces
    in its own hooks)."""
    grad_sync(train)  # a known value
    if train.grad_sync == "step" and train.strategy in ("fsdp", "model_parallel"):
        raise RecipeError(f"train.grad_sync = step replaces DDP's gradient hooks and has no meaning under "
                          f"train.strategy = {train.strategy} (FSDP2 reduce-scatters in its own); set "
                          f"train.grad_sync=auto or train.strategy=ddp.")


def check_graphs(train: TrainConfig) -> None:
    """train.compile = graphs (torch.compile's reduce-overhead mode: each compiled block
    replayed as a CUDA graph) on what it is built and tested for (graphs_refusal)."""
    if train.compile == "graphs":
        why = graphs_refusal(train)
        if why is not None:
            raise RecipeError(why)


EP_DISPATCH = ("alltoall", "allgather")


def check_ep_dispatch(value: str) -> None:
    check_choice("train.ep_dispatch", value, EP_DISPATCH, "a dispatch")


GRAD_REDUCE_DTYPES = ("float32", "bf16")


def check_grad_reduce(value: str) -> None:
    check_choice("train.grad_reduce_dtype", value, GRAD_REDUCE_DTYPES, "a dtype")


GRAD_SYNCS = ("auto", "hooks", "step")


def grad_sync(train: TrainConfig) -> str:
    """How DDP's ranks average gradients (train.grad_sync, auto resolved): `hooks`, DDP's
    reducer (buckets all-reduced as backward produces them), or `step`, no DDP wrapper
    and the gradients averaged by GradAverager (started during the step's last
    backward, finished after it). Auto: step under CUDA graphs (DDP's hooks beside the
    blocks' graphs gave NaN gradients), else hooks."""
    check_choice("train.grad_sync", train.grad_sync, GRAD_SYNCS, "a way")
    if train.grad_sync != "auto":
        return train.grad_sync
    return "step" if train.compile == "graphs" else "hooks"


# gradients averaged by GradAverager go in flat buckets of at most this many elements
# (256 MiB of float32)
GRAD_BUCKET_ELEMENTS = 1 << 26


class GradAverager:
    """train.grad_sync = step: each replicated parameter's gradient becomes its mean over
    the `world` ranks of `group`, without DDP's wrapper (which CUDA graphs cannot live
    beside). The parameters are cut into flat buckets (one dtype each, at most
    GRAD_BUCKET_ELEMENTS, in reverse order: the order backward produces them). During
    the step's last backward a gradient hook counts each bucket's parameters as their
    gradients land; a complete bucket is packed, divided by the world size and
    all-reduced at once (in `wire_dtype` when given: bf16, half the bytes), beside the
    rest of the backward. `finish` starts what is left (parameters that got no
    gradient: skipped, alike on every rank, as the model is), waits, and gives each
    parameter its averaged gradient (the bucket's view, or a copy when the wire dtype
    differs). Every rank runs the same backward, so the buckets start in the same order
    everywhere, which the collectives need. Cost: one more copy of the gradients while
    they travel."""

    def __init__(self, params: List[torch.Tensor], world: int, group=None, wire_dtype=None, overlap: bool = True):
        self.world, self.group, self.wire_dtype = world, group, wire_dtype
        self.buckets: List[List[torch.Tensor]] = []
        size = 0
        for p in reversed([p for p in params if p.requires_grad]):
            b = self.buckets[-1] if self.buckets else None
            if b is None or size + p.numel() > GRAD_BUCKET_ELEMENTS or p.dtype != b[0].dtype:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel()
            if overlap:
                p.register_post_accumulate_grad_hook(lambda p, i=len(self.buckets) - 1: self._landed(i))
        self.sync = True  # False: a micro-batch before the step's last (gradients accumulate locally)
        self._reset()

    def _reset(self) -> None:
        self._waiting = [len(b) for b in self.buckets]
        self._sent: Dict[int, tuple] = {}

    def _landed(self, i: int) -> None:
        if not self.sync:
            return
        self._waiting[i] -= 1
        if self._waiting[i] == 0:
            self._send(i)

    def _send(self, i: int) -> None:
        grads = [p.grad for p in self.buckets[i] if p.grad is not None]
        if not grads:
            self._sent[i] = None
            return
        with torch.no_grad():
            flat = torch.cat([g.reshape(-1) for g in grads])
            if self.wire_dtype is not None and flat.dtype != self.wire_dtype:
                flat = flat.to(self.wire_dtype)
            flat.div_(self.world)
        self._sent[i] = (flat, dist.all_reduce(flat, group=self.group, async_op=True))

    @torch.no_grad()
    def finish(self) -> None:
        """After the step's last backward: every bucket averaged, into the gradients."""
        try:
            for i in range(len(self.buckets)):
                if i not in self._sent:
                    self._send(i)
            for i, sent in self._sent.items():
                if sent is None:
                    continue
                flat, work = sent
                work.wait()
                params = [p for p in self.buckets[i] if p.grad is not None]
                for p, v in zip(params, flat.split([p.numel() for p in params])):
                    if v.dtype == p.grad.dtype:
                        p.grad = v.view_as(p)  # the averaged bucket itself: no copy back
                    else:
                        p.grad.copy_(v.view_as(p))
        finally:
            self._reset()
            self.sync = True


def check_scale(recipe) -> None:
    """Recipe-level checks of expert parallelism, before any process starts."""
    check_ep_dispatch(recipe.train.ep_dispatch)
    ep = recipe.train.expert_parallel
    if ep == 1:
        return
    from arch.resolve import layer_specs

    moe = recipe.model.moe
    if not any(spec.moe for spec in layer_specs(recipe.model)):
        raise RecipeError(f"train.expert_parallel = {ep} but the model has no MoE layers; set "
                          f"train.expert_parallel=1 for a dense model.")
    check_expert_parallel(moe.n_experts, ep)


# ------------------------------------------------------------- model preparation


def checkpoint_block(block: nn.Module) -> None:
    """Recompute `block` in backward instead of storing its activations.

    The block's forward is wrapped on the instance, so module names and state_dict
    keys stay what they were (checkpoints and converters rely on "model.layers.i.*").
    Non-reentrant checkpointing re-runs forward during backward: an MoE layer's
    `aux` and `stats` are overwritten with identical values, which is harmless."""
    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def stage_shapes(train: TrainConfig) -> List[tuple]:
    """The distinct (micro_batch_size, seq_len) of a run's stages (one without stages: one);
    read from the fields, as arch.stages.stage_plan would need the whole recipe."""
    shapes, mbs, seq = [], train.micro_batch_size, train.seq_len
    for st in train.stages:
        mbs = st.micro_batch_size if st.micro_batch_size is not None else mbs
        seq = st.seq_len if st.seq_len is not None else seq
        shapes.append((mbs, seq))
    return list(dict.fromkeys(shapes)) or [(train.micro_batch_size, train.seq_len)]


def parallelize(model: nn.Module, train: TrainConfig, device_mesh=None) -> nn.Module:
    """Prepare a meta-device model for training, in place; see the module docstring.

    Regional compilation (one `torch.compile` per block, all blocks alike) keeps
    compile time to one block's and survives any change to the outer loop."""
    # 1. expert parallel: shard experts over device_mesh["ep"] (model_parallel strategy)
    if train.qat.format is not None:
        # QAT first, so that AC's recomputation and compile's graphs include it. It only
        # tags modules (arch/quant.py read_weight says why that survives compile and
        # FSDP2); off until train.qat.start_step (set_qat_step).
        from arch.quant import apply_fake_quant

        apply_fake_quant(model, train.qat.format, train.qat.include, active=train.qat.start_step == 0)
    if train.activation_checkpointing:  # 2.
        for block in model.blocks():
            checkpoint_block(block)
    if train.compile in (True, "graphs"):  # 3. ("auto" is resolved before: lit_modules/runtime.py resolve_speed)
        shapes = stage_shapes(train)
        if len(shapes) > 1:
            # train.stages with several (micro-batch, seq_len) shapes: one static graph per
            # shape, compiled when its stage starts (the expected recompiles, one per new
            # shape, training and validation each); without dynamic=False Dynamo would
            # turn the second shape's sizes symbolic instead. The limit leaves room for them.
            import torch._dynamo

            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, 2 * len(shapes) + 4)
        options = {"dynamic": False} if len(shapes) > 1 else {}
        if train.compile == "graphs":  # CUDA graphs: each step starts with cudagraph_mark_step_begin
            options["mode"] = "reduce-overhead"
        for block in model.blocks():
            block.compile(**options)
    # 4. FSDP2 fully_shard per block, then the root (fsdp / model_parallel strategies)
    return model


def set_qat_step(model: nn.Module, train: TrainConfig, step: int) -> None:
    """Fake quantization on from train.qat.start_step optimizer steps done (`step`)."""
    q = getattr(model, "fake_quantizer", None)
    if q is not None:
        q.active = step >= train.qat.start_step


# ------------------------------------------------------------- sharding (after materialisation)


@dataclass
class ScalePlan:
    """What `shard_model` did, and the steps of a training step that depend on it."""

    world: int = 1
    ep: int = 1
    ep_group: Any = None  # the ranks that split one set of experts between them
    edp_group: Any = None  # the ranks that hold the same expert shard (None: only this one)
    expert_names: List[str] = field(default_factory=list)  # sharded parameters, relative to the model
    fsdp: bool = False
    # train.grad_sync = step under DDP (no DDP wrapper): the replicated weights'
    # gradients are averaged by this, started during backward, finished by finish_grads
    averager: Any = None
    mesh: Any = None  # the (data_parallel x expert) DeviceMesh; sharded checkpoints place expert shards on it
    # (model id, replicated parameters, expert shards): found once, not by walks every step
    _groups: Any = field(default=None, repr=False, compare=False)

    def param_groups(self, model: nn.Module):
        """(replicated parameters, expert shards) of `model`, found once."""
        if self._groups is None or self._groups[0] != id(model):
            names = set(self.expert_names)
            named = list(model.named_parameters())
            self._groups = (id(model), [p for n, p in named if n not in names], [p for n, p in named if n in names])
        return self._groups[1], self._groups[2]

    def sync_grads(self, model: nn.Module, sync: bool) -> None:
        """Before a micro-batch's backward: FSDP2 reduce-scatters gradients only when
        `sync` (the step's last micro-batch); earlier ones accumulate unsharded
        gradients locally (more memory for the accumulation, one reduction per step
        instead of one per micro-batch). DDP's no_sync is Lightning's toggle_model."""
        if self.fsdp and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(sync)
        if self.averager is not None:
            self.averager.sync = sync

    def finish_grads(self, model: nn.Module) -> None:
        """After the last backward of a step: average the expert shards' gradients (DDP
        and FSDP average everything else), and with an `averager` (train.grad_sync =
        step: no DDP wrapper) the replicated weights' too."""
        if self.averager is not None:
            self.averager.finish()
        if self.ep > 1:
            from experts.layers import reduce_expert_grads

            reduce_expert_grads(model, self.world, self.edp_group)

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global gradient norm (every rank gets the same value) and, with
        max_norm > 0, clipping to it. Expert shards add their squared norms over the
        expert group; FSDP's sharded gradients (DTensors) are reduced by DTensor."""
        replicated, shards = self.param_groups(model)
        params = [p for p in replicated if p.grad is not None]
        experts = [p for p in shards if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # DTensor
            norm = norm.full_tensor()
        if experts:
            sq = torch.nn.utils.get_total_norm([p.grad for p in experts]).float() ** 2
            dist.all_reduce(sq, group=self.ep_group)
            norm = (norm.float() ** 2 + sq).sqrt()
        if max_norm > 0:
            for group in (params, experts):
                if group:
                    torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
        return norm


def _mesh(device_type: str, world: int, ep: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("data_parallel", "expert"))


def shard_model(model: nn.Module, train: TrainConfig, device: torch.device,
                precision: str = "32-true") -> ScalePlan:
    """Expert parallel and FSDP2 for a materialised model, in place (module docstring).
    Without a process group (strategy auto) it does nothing.

    Under bf16-mixed, FSDP2 all-gathers the sharded weights in bf16 (the dtype the
    matmuls use under autocast anyway) and reduce-scatters gradients in float32 onto
    the float32 master shards: half the all-gather traffic of float32 weights.
    train.grad_reduce_dtype = bf16 reduce-scatters in bf16 (any precision)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ScalePlan()
    world, ep = dist.get_world_size(), train.expert_parallel
    plan = ScalePlan(world=world, ep=ep, fsdp=train.strategy in ("fsdp", "model_parallel"))
    if ep > 1:
        if world % ep != 0:
            raise RecipeError(f"train.expert_parallel = {ep} does not divide the {world} processes; choose "
                              f"an expert_parallel size that divides the number of devices.")
        from experts.layers import shard_experts

        mesh = plan.mesh = _mesh(device.type, world, ep)
        plan.ep_group = mesh["expert"].get_group()
        plan.edp_group = mesh["data_parallel"].get_group() if world > ep else None
        plan.expert_names = shard_experts(model, plan.ep_group, train.ep_dispatch)
    if plan.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # non-expert weights: sharded over every rank; expert shards stay whole on
        # their rank (ignored), their gradients averaged by finish_grads
        world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
        ignored = {p for n, p in model.named_parameters() if n in set(plan.expert_names)}
        reduce = torch.bfloat16 if train.grad_reduce_dtype == "bf16" else torch.float32
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce) if precision == "bf16-mixed"
              else MixedPrecisionPolicy(reduce_dtype=torch.bfloat16 if reduce == torch.bfloat16 else None))
        for block in model.blocks():
            fully_shard(block, mesh=world_mesh, ignored_params=ignored or None, mp_policy=mp,
                        reshard_after_forward=train.reshard_after_forward)
        fully_shard(model, mesh=world_mesh, ignored_params=ignored or None, mp_policy=mp)
    elif grad_sync(train) == "step":
        plan.averager = GradAverager(plan.param_groups(model)[0], world,
                                     wire_dtype=torch.bfloat16 if train.grad_reduce_dtype == "bf16" else None)
    return plan
