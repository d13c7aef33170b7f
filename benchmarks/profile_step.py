"""Where a training step's GPU time goes: the kernels of a few `moelab bench` steps.

The model is prepared exactly as `moelab bench` and `moelab train` prepare it
(lit_modules.tools.bench.prepare_model: regional compile, fused cross-entropy as the recipe
says); a few untimed steps run first (compilation), then torch.profiler records
`--steps` steps and the table lists the kernels by self CUDA time. GPU only.

    python benchmarks/profile_step.py proxies/qwen3_moe_w2 [a.b=c ...] [--dtype bf16] [--top 25]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from arch import load_recipe  # noqa: E402
from lit_modules.tools import bench  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "bf16-mixed"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--by-op", action="store_true",
                   help="also list the operators (with their input shapes) by the CUDA time of their kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device.")
    device = torch.device("cuda")
    recipe = load_recipe(args.recipe, args.overrides)
    precision = bench.PRECISIONS[args.dtype]
    B, T = recipe.train.micro_batch_size, recipe.train.seq_len
    batches = bench.make_batches(recipe.model.vocab_size, B, T, 2, recipe.train.seed, device)
    torch.manual_seed(recipe.train.seed)
    model = bench.prepare_model(recipe, device, precision)
    step = bench.training_step(model, bench.moelab_loss, recipe, batches, precision, device)

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if args.by_op:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities, record_shapes=args.by_op) as prof:
        for i in range(args.steps):
            step(i)
        torch.cuda.synchronize()
    print(f"{recipe.name} ({bench.model_detail(recipe)}, {precision.describe()}), {args.steps} steps, "
          f"{torch.cuda.get_device_name()}: kernels by self CUDA time")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=70))
    if args.by_op:
        print("operators and their input shapes, by the CUDA time of their kernels")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="device_time_total", row_limit=2 * args.top, max_name_column_width=50, max_shapes_column_width=70))


if __name__ == "__main__":
    main()
