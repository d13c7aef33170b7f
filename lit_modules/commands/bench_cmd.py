"""`moelab bench`: training-step throughput, MFU and peak memory of a recipe's model
(optionally against its Hugging Face twin), or one MoE layer against a dense FFN.

    moelab bench RECIPE [a.b=c ...] [--vs-hf] [--json] [--steps N] [--warmup N]
    moelab bench RECIPE [a.b=c ...] --layer [--tokens N] [--with-loop] [--variant 'a.b=c ...']
"""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="time training steps: tokens/s, MFU, peak memory (--vs-hf, --layer)",
        description="Time training steps of a recipe's model on random tokens of shape "
                    "(train.micro_batch_size, train.seq_len): median of CUDA-event times (perf_counter on "
                    "CPU), tokens/s, MFU and peak memory. Change the shape with overrides such as "
                    "train.micro_batch_size=4 train.seq_len=1024.")
    p.add_argument("recipe", help="a recipe path or a name under recipes/ (e.g. proxies/qwen3_moe_w2)")
    p.add_argument("overrides", nargs="*", default=[], help="a.b=c overrides, e.g. model.moe.backend=loop")
    p.add_argument("--vs-hf", action="store_true",
                   help="also time the Hugging Face transformers twin with the same weights and batches")
    p.add_argument("--layer", action="store_true",
                   help="time one MoE layer of the recipe's shape (fwd + bwd) against a dense FFN of the "
                        "same active FLOPs (workload W1)")
    p.add_argument("--tokens", type=int, default=None,
                   help="--layer: tokens per step (default: micro_batch_size x seq_len)")
    p.add_argument("--with-loop", action="store_true",
                   help="--layer: also time the slow `loop` backend; the other rows report their error against it")
    p.add_argument("--variant", action="append", default=[], metavar="'a.b=c ...'",
                   help="--layer: one more row with these overrides on top (same weights), e.g. "
                        "--variant model.moe.capacity_factor=1.25; repeatable")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20); the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16-mixed", "bf16"],
                   help="bf16-mixed: autocast with fp32 master weights (training's default on GPU); bf16: "
                        "pure bf16 parameters; auto: the recipe's train.precision, else bf16-mixed on CUDA "
                        "(bf16 with --layer) and fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator in TFLOP/s (default: train.peak_tflops, else looked up by GPU name)")
    p.add_argument("--measure-ceiling", action="store_true",
                   help="also time an N^3 matmul (bf16 on CUDA) and print the TFLOP/s it reaches")
    p.add_argument("--ceiling-n", type=int, default=8192, help="matrix size for --measure-ceiling (default 8192)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--save", metavar="PATH", default=None, help="also write the JSON object to PATH")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from arch import load_recipe
    from lit_modules.runtime import check_compiled_experts, check_expert_backend, resolve_device, resolve_speed
    from lit_modules.tools import bench

    device = resolve_device(args.device)
    recipe = resolve_speed(load_recipe(args.recipe, args.overrides), device.type)
    check_expert_backend(recipe.model, device.type)
    if args.vs_hf and args.layer:
        raise bench.BenchError("--vs-hf compares whole models; drop it or --layer.")
    precision = bench.resolve_precision(args.dtype, device, recipe.train.precision, layer=args.layer)
    check_compiled_experts(recipe.model, recipe.train.compile, precision.autocast_dtype or precision.param_dtype,
                           "pass --dtype bf16-mixed or bf16")
    peak, source = bench.resolve_peak(args.peak_tflops, recipe.train.peak_tflops, device)
    common = dict(device=device, precision=precision, warmup=args.warmup, steps=args.steps,
                  peak_tflops=peak, peak_source=source)
    if args.variant and not args.layer:
        raise bench.BenchError("--variant adds rows to --layer; add --layer or drop --variant.")
    if args.layer:
        variants = [(v, resolve_speed(load_recipe(args.recipe, list(args.overrides) + v.split()), device.type))
                    for v in args.variant]
        report = bench.bench_layer(recipe, tokens=args.tokens, with_loop=args.with_loop, variants=variants,
                                   seed=recipe.train.seed, **common)
    else:
        report = bench.bench_model(recipe, vs_hf=args.vs_hf, **common)
    if args.measure_ceiling:
        report.update(bench.measure_matmul_ceiling(device, args.ceiling_n))
    text = json.dumps(report, indent=2)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")
    print(text if args.json else bench.format_report(report))
    sys.stdout.flush()
    return 0
