"""`moelab distill-cache RECIPE [a.b=c ...] [--world N]`: the teacher's targets for
train.distill.mode = offline, written before training (lit_modules/train/distill_cache.py);
give it the overrides the train command will get."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("distill-cache", help="cache a distillation teacher's targets for train.distill.mode=offline")
    p.add_argument("recipe", help="the student's recipe path or name under recipes/")
    p.add_argument("overrides", nargs="*", default=[],
                   help="a.b=c overrides, the same as the train command's (train.distill.* among them)")
    p.add_argument("--world", type=int, default=None,
                   help="training processes that will share each step (default: train.devices x train.num_nodes; "
                        "'auto': the GPUs here, else 1)")
    p.add_argument("--device", default=None, help="where the teacher runs (default: cuda if there is one, else cpu)")
    p.set_defaults(func=run_distill_cache)


def default_world(t) -> int:
    if isinstance(t.devices, int):
        n = t.devices
    elif isinstance(t.devices, list):
        n = len(t.devices)
    else:
        import torch

        n = max(torch.cuda.device_count(), 1)
    return n * t.num_nodes


def run_distill_cache(args) -> int:
    from arch import load_recipe
    from lit_modules.train.distill_cache import build_cache
    from lit_modules.train.run import check_train, normalize_overrides

    recipe = load_recipe(args.recipe, normalize_overrides(args.overrides))
    world = args.world if args.world is not None else default_world(recipe.train)
    check_train(recipe)
    build_cache(recipe, world=world, device=args.device)
    return 0


if __name__ == "__main__":  # python -m lit_modules.commands.distill_cache_cmd RECIPE [overrides]
    from lit_modules.cli import main

    sys.exit(main(["distill-cache", *sys.argv[1:]]))
