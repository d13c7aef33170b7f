"""`moelab upcycle SOURCE OUT_DIR --experts E --top-k K [...] [a.b=c ...]`: a dense
model (model directory, .ckpt, sharded .dcp folder or run directory) -> an MoE model
directory whose recipe trains from the upcycled weights (`moelab train
OUT_DIR/recipe.yaml`). The method and what it promises: lit_modules/checkpoints/upcycle.py.
"""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("upcycle", help="sparse upcycling: a dense model -> an MoE recipe and weights")
    p.add_argument("source", help="the dense model: a model directory, .ckpt, sharded .dcp folder or run directory")
    p.add_argument("out_dir", help="new moelab model directory (must not exist or be empty)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="a.b=c for the output recipe: model.moe.* (balance, router kind, placement), train.*, data.*")
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer (E)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (K)")
    p.add_argument("--granularity", type=int, default=1,
                   help="G: cut the dense FFN into G parts of d_ff / G, each copied E / G times (fine-grained "
                        "upcycling; K must be a multiple of G); default 1: every expert a whole copy")
    p.add_argument("--noise", type=float, default=0.0,
                   help="add Gaussian noise of this many standard deviations of each dense matrix to every "
                        "expert's copy (default 0: exact copies)")
    p.add_argument("--reinit-fraction", type=float, default=0.0,
                   help="redraw this share of each expert's hidden units from the dense weights' mean and std "
                        "(Drop-Upcycling; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router, noise and redraws (default 0)")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the output back and comparing its logits with the dense model's")
    p.add_argument("--max-shard-size", default=None, help="largest output shard, e.g. 2GB (default 2GiB)")
    p.set_defaults(func=run_upcycle)


def run_upcycle(args) -> int:
    from lit_modules.checkpoints.hf import parse_size
    from lit_modules.checkpoints.upcycle import UpcycleOptions, exact_expected, upcycle
    from lit_modules.commands.inspect_cmd import human

    opts = UpcycleOptions(args.experts, args.top_k, args.granularity, args.noise, args.reinit_fraction, args.seed,
                          tuple(args.overrides))
    info = upcycle(args.source, args.out_dir, opts, check=not args.no_check,
                   max_shard_bytes=parse_size(args.max_shard_size))
    print(f"upcycled {args.source} ({human(info['dense_params'])} parameters) -> {args.out_dir}: {info['recipe']}, "
          f"{info['moe_layers']} MoE layer(s) of {args.experts} experts, top-{args.top_k}, granularity "
          f"{args.granularity}; {human(info['params_total'])} parameters ({human(info['params_active'])} active)")
    if info["max_logit_diff"] is not None:
        promise = ("equal to the dense model's up to rounding" if exact_expected(opts)
                   else "not promised equal: noise / redraws make the experts differ")
        print(f"max |logit difference| from the dense model on 64 random tokens: {info['max_logit_diff']:.3g} "
              f"({promise})")
    print(f"train it with: moelab train {args.out_dir}/recipe.yaml  (train.init_from points at {args.out_dir})")
    return 0


if __name__ == "__main__":
    from lit_modules.cli import main

    sys.exit(main(["upcycle", *sys.argv[1:]]))
