"""Where a small training step's time goes: wall time, the host's time to issue the step,
and the GPU's kernel time per step, with the blocks compiled as the recipe says and with
other torch.compile modes (reduce-overhead: CUDA graphs), at each micro-batch size.

    python benchmarks/step_overhead.py [RECIPE] [a.b=c ...] [--micro 2,8]
        [--modes default,reduce-overhead] [--steps 12] [--warmup 5] [--device cuda]
        [--host-profile N]

The step is `moelab bench`'s (lit_modules.tools.bench: the model prepared as training
prepares it, AdamW, bf16-mixed on CUDA). GPU busy = summed kernel time / wall time: near
100% the GPU is the limit; well below it the host is (Python, kernel launches), which is
what CUDA graphs remove. The first steps' losses are printed per mode: every mode must
train the same model. `--host-profile N` also runs N more steps under cProfile and prints,
per row, the functions where the host spent its time (own time, with the call counts per
step): what a host-bound step would have to shed. On a CPU only the default mode runs, with no kernel times (a check
that the script works).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from arch import load_recipe  # noqa: E402
from lit_modules.tools import bench  # noqa: E402

MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def host_profile(step, n, top=18):
    """The `top` functions by own host time over n steps, as text: ms per step, calls per step."""
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n):
        step(i)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    total = sum(v[2] for v in stats.stats.values())
    out = io.StringIO()
    out.write(f"    host time under cProfile: {total / n * 1e3:.1f} ms/step (profiling inflates it)\n")
    for (file, line, func), (_cc, calls, own, _cum, _callers) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        out.write(f"    {own / n * 1e3:7.2f} ms {calls / n:7.1f}x  {func}  {where}\n")
    return out.getvalue()


def measure(recipe_name, overrides, micro, mode, device, warmup, steps, profile_steps=0):
    """One row: (first losses, wall ms, host ms, kernel ms, kernels, host profile) per step."""
    cuda = device.type == "cuda"
    torch._dynamo.reset()
    # reduce-overhead is train.compile=graphs, as moelab train runs it; other modes compile here
    extra = [f"train.micro_batch_size={micro}"] + {"default": [], "reduce-overhead": ["train.compile=graphs"]}.get(
        mode, ["train.compile=false"])
    recipe = load_recipe(recipe_name, list(overrides) + extra)
    precision = bench.PRECISIONS["bf16-mixed" if cuda else "fp32"]
    batches = bench.make_batches(recipe.model.vocab_size, micro, recipe.train.seq_len, 2, recipe.train.seed, device)
    torch.manual_seed(recipe.train.seed)
    model = bench.prepare_model(recipe, device, precision)
    if mode not in ("default", "reduce-overhead"):
        for block in model.blocks():
            block.compile(mode=mode)
    step = bench.training_step(model, bench.moelab_loss, recipe, batches, precision, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    first = [step(i) for i in range(warmup)]
    sync()
    losses = [round(float(v[1]), 5) for v in first]  # the cross-entropy
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    host = time.perf_counter() - t0
    sync()
    wall = time.perf_counter() - t0
    kernel_ms = kernels = None
    if cuda:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(i)
            sync()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        kernel_ms = sum(e.self_device_time_total for e in events) / 1e3 / 3
        kernels = sum(e.count for e in events) / 3
    profile = host_profile(step, profile_steps) if profile_steps else ""
    sync()
    del model, step
    if cuda:
        torch.cuda.empty_cache()
    return losses, wall / steps * 1e3, host / steps * 1e3, kernel_ms, kernels, profile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default="proxies/qwen3_moe_w2")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--micro", default="2,8", help="micro-batch sizes, comma-separated")
    p.add_argument("--modes", default="default,reduce-overhead", help=f"of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="also profile N steps' host work per row with cProfile")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: '{m}' is not one of {', '.join(MODES)}")
    if device.type != "cuda":
        modes = ["default"]
    rows, losses, profiles = [], {}, {}
    for micro in [int(m) for m in args.micro.split(",")]:
        for mode in modes:
            first, wall, host, kernel, n, prof = measure(args.recipe, args.overrides, micro, mode, device,
                                                         args.warmup, args.steps, args.host_profile)
            losses[(micro, mode)] = first
            profiles[(micro, mode)] = prof
            seq = load_recipe(args.recipe, list(args.overrides)).train.seq_len
            rows.append((micro, mode, wall, host, kernel, n, micro * seq / wall * 1e3))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.recipe} {' '.join(args.overrides)}: {name}, torch {torch.__version__}")
    for (micro, mode), prof in profiles.items():
        if prof:
            print(f"host profile, micro {micro}, {mode}:\n{prof}", end="")
    print("first losses per mode (the same model must train the same):")
    for key, value in losses.items():
        print(f"  micro {key[0]}, {key[1]}: {value}")
    print("| micro | compile mode | wall ms/step | host ms/step | kernel ms/step | GPU busy | kernels/step | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for micro, mode, wall, host, kernel, n, tps in rows:
        busy = "n/a" if kernel is None else f"{100 * kernel / wall:.0f}%"
        k = "n/a" if kernel is None else f"{kernel:.1f}"
        nk = "n/a" if n is None else f"{n:.0f}"
        print(f"| {micro} | {mode} | {wall:.1f} | {host:.1f} | {k} | {busy} | {nk} | {tps:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
