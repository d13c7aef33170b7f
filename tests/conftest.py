"""Shared fixtures: tiny versions of the reference recipes, built on CPU in float32.

Tiny configs are made by overriding the real recipes from the command-line dotlist,
so the tests go through the same recipe path users do."""
from __future__ import annotations

import os
import socket

import pytest
import torch

# Without a GPU, the triton expert backend's kernels run through Triton's interpreter
# (tests/experts/test_triton_backend.py); set before anything imports triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from arch import build_model, load_recipe

TINY_WIDTH = [
    "model.d_model=64", "model.attention.n_heads=4", "model.attention.head_dim=16",
    "model.vocab_size=256", "model.max_seq_len=128",
]
TINY = {
    # Qwen3 dense: GQA 4:2, QK-norm, head_dim 16 != 64 / 4 ... (kept explicit), tied head
    "qwen3": ("qwen3/0.6b", TINY_WIDTH + ["model.n_layers=2", "model.attention.n_kv_heads=2",
                                          "model.ffn.d_ff=128"]),
    # Qwen3-MoE: 8 experts top-2, untied head
    "qwen3_moe": ("qwen3/30b_a3b", TINY_WIDTH + ["model.n_layers=2", "model.attention.n_kv_heads=1",
                                                 "model.ffn.d_ff=128", "model.moe.n_experts=8",
                                                 "model.moe.top_k=2", "model.moe.d_expert=32"]),
    # Gemma 3: sandwich norms, (1+w) norms, 5 local : 1 global, window 8, scaled embeddings,
    # query_pre_attn_scalar != head_dim
    "gemma3": ("gemma3/1b", TINY_WIDTH + ["model.n_layers=7", "model.attention.n_kv_heads=2",
                                          "model.ffn.d_ff=128", "model.layer_kinds.local.window=8",
                                          "model.attention.query_pre_attn_scalar=24"]),
}


def tiny_recipe(name: str, *extra: str):
    recipe, overrides = TINY[name]
    return load_recipe(recipe, list(overrides) + list(extra))


def tiny_model(name: str, *extra: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(tiny_recipe(name, *extra).model, device="cpu")
    with torch.no_grad():  # zero-centred norms start at 0: perturb so they matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# a tiny MoE for `moelab train` tests (applied to recipes/proxies/qwen3_moe_tiny)
TINY_MOE_TRAIN = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.attention.n_heads=4",
    "model.attention.n_kv_heads=2", "model.attention.head_dim=16", "model.moe.n_experts=8",
    "model.moe.top_k=2", "model.moe.d_expert=32", "model.ffn.d_ff=128",
    "train.seq_len=64", "train.log_every=1", "train.optim.warmup_steps=5", "train.optim.lr=3e-3",
    "data.max_chars=300000",
    # behaviour, not speed: on a GPU, auto would compile every test run's blocks and loss
    # (tests that check the compiled paths ask for them)
    "train.compile=false", "model.fused_ce_chunk=0",
]


# `moelab train` of the tiny MoE proxy, with one data cache shared by the session
RECIPE = "proxies/qwen3_moe_tiny"
TRAIN_TINY = TINY_MOE_TRAIN + [
    "train.micro_batch_size=8", "train.val_batches=4",
]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "moelab_train_cache"


def overrides(cache, run_dir, *extra):
    return TRAIN_TINY + [f"data.cache_dir={cache}", f"train.run_dir={run_dir}", *extra]


def free_port() -> int:
    """A free localhost port for a process group of spawned test processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a CPU (gloo) process group on localhost; one thread per process, as the
    test processes share a small CPU."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn_gloo(worker, world: int, *args) -> None:
    """Run `worker(rank, *args)` in `world` fresh processes joined in one gloo group; a
    worker that raises fails the test with its traceback. `worker` must be a module-level
    function (the processes are spawned, so it travels by name)."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_process, args=(world, free_port(), worker, args), nprocs=world)


def _gloo_process(rank, world, port, worker, args):
    import sys

    import torch.distributed as dist

    init_gloo(rank, world, port)
    try:
        worker(rank, *args)
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()
    # A worker that finished leaves without the interpreter's teardown: there, gloo's and
    # the TCP store's C++ threads can be destroyed while still joinable, which aborts the
    # process ("terminate called without an active exception", SIGABRT) after its work
    # was done and checked. CI lost two runs to that, each in a different test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(params=sorted(TINY))
def tiny_name(request):
    return request.param


def refuse_writes(monkeypatch, root, err: int) -> None:
    """Make writes under `root` fail with errno `err` (EROFS: a read-only file system,
    ENOSPC: a full disk) for one test: opening a file there for writing, creating a
    folder, renaming or linking into it. chmod cannot do this: tests run as root."""
    import builtins
    import io
    import os
    from pathlib import Path

    root = str(Path(root).absolute())

    def under(p) -> bool:
        try:
            return str(Path(os.fsdecode(p)).absolute()).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def refuse(p):
        raise OSError(err, os.strerror(err), os.fsdecode(p))

    real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "rename", "link")}
    real_open = builtins.open

    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            refuse(path)
        return real["open"](path, flags, *a, **k)

    def guard(name):
        def fake(src, *a, **k):
            target = a[0] if name in ("replace", "rename", "link") else src
            if under(target):
                refuse(target)
            return real[name](src, *a, **k)
        return fake

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name in ("mkdir", "replace", "rename", "link"):
        monkeypatch.setattr(os, name, guard(name))


class MarkerPayload:
    """A pickle that runs code: unpickling it creates `marker` (Path.touch). The
    hostile-input tests plant it in checkpoints and indexes and check that the marker
    never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="session")
def dense_and_upcycled_runs(cache, tmp_path_factory):
    """Two very short runs of the tiny proxy on the shared data cache: a dense one (the
    MoE layers turned off), and the MoE upcycled from its last checkpoint (4 copies,
    top-2), trained from those weights by `moelab train OUT/recipe.yaml`. Returns
    (dense summary, upcycled summary, upcycled model directory)."""
    from lit_modules.checkpoints.upcycle import UpcycleOptions, upcycle
    from lit_modules.train.run import train

    base = tmp_path_factory.mktemp("two_runs")
    dense = train(RECIPE, overrides(cache, base / "runs", "model.moe.n_experts=0", "train.run_name=dense",
                                    "train.max_steps=4", "train.val_every=2", "train.ckpt_every=0",
                                    "train.optim.warmup_steps=1"))
    model_dir = base / "upcycled"
    upcycle(dense["run_dir"], model_dir, UpcycleOptions(4, 2), check=False)
    moe = train(str(model_dir / "recipe.yaml"), ["train.run_name=upcycled"])
    return dense, moe, model_dir
