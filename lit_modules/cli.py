"""The `moelab` command. Each subcommand lives in a module with `add_parser(sub)`
and a `run(args)`; heavy imports (lightning, transformers) stay inside `run`, so
`moelab inspect` answers at once.

    moelab recipes
    moelab inspect RECIPE [a.b=c ...] [--json] [--seq-len N] [--context N]
    moelab train   RECIPE [a.b=c ...]
    moelab distill-cache RECIPE [a.b=c ...] [--world N]
    moelab bench   RECIPE [a.b=c ...]
    moelab eval | generate | import-hf | export-hf | convert ...
    moelab analyze RUN [--batches N] [--data FILE] [--out DIR]
    moelab upcycle SOURCE OUT_DIR --experts E --top-k K [...]
    moelab compare RUN RUN ... [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from arch.registry import RecipeError

# subcommand name -> module providing add_parser(subparsers) and run(args)
SUBCOMMANDS = {
    "recipes": "lit_modules.commands.inspect_cmd",
    "inspect": "lit_modules.commands.inspect_cmd",
    "train": "lit_modules.commands.train_cmd",
    "distill-cache": "lit_modules.commands.distill_cache_cmd",
    "bench": "lit_modules.commands.bench_cmd",
    "import-hf": "lit_modules.commands.convert_cmd",
    "export-hf": "lit_modules.commands.convert_cmd",
    "convert": "lit_modules.commands.convert_cmd",
    "eval": "lit_modules.commands.eval_cmd",
    "generate": "lit_modules.commands.generate_cmd",
    "analyze": "lit_modules.commands.analyze_cmd",
    "upcycle": "lit_modules.commands.upcycle_cmd",
    "compare": "lit_modules.commands.compare_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab", description="MoE architecture playground: recipes -> models -> training."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(SUBCOMMANDS.values()):  # each module once, in order
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # a.b=c overrides after the options (`upcycle SRC OUT --experts 8 a.b=c`): argparse
        # stops a positional list at the first option
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-")
                                                                       for e in extra):
            args.overrides += extra
        else:
            parser.parse_args(argv)  # argparse's own message and exit
    try:
        return int(args.func(args) or 0)
    except RecipeError as e:
        print(f"moelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a TrainingInterrupted says what was kept
        print(f"moelab {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
