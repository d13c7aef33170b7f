"""`moelab train RECIPE [a.b=c ...]`: the command line of lit_modules.train.run."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a recipe's model: TensorBoard logs, checkpoints, resume")
    p.add_argument("recipe", help="a recipe path or a name under recipes/ (e.g. proxies/qwen3_moe_tiny)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="a.b=c overrides (e.g. train.max_steps=100); resume=PATH is short for train.resume=PATH")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from lit_modules.train.run import train

    train(args.recipe, args.overrides)
    return 0


if __name__ == "__main__":  # python -m lit_modules.commands.train_cmd RECIPE [overrides]
    from lit_modules.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
