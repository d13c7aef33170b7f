"""`moelab compare RUN RUN ... [--out DIR] [--no-plot]`: validation and training
curves of several runs against tokens and against training FLOPs (one PNG), and a
table of their final figures (printed, and written as Markdown and JSON). What is
read and how the axes are made: lit_modules/tools/compare.py."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="curves of several runs (vs tokens and FLOPs) and a table of final figures")
    p.add_argument("runs", nargs="+", help="run directories written by `moelab train`")
    p.add_argument("--out", default="compare", help="folder for compare.png, compare.md, compare.json "
                                                    "(default: ./compare)")
    p.add_argument("--no-plot", action="store_true", help="the table only (no matplotlib needed)")
    p.set_defaults(func=run_compare)


def run_compare(args) -> int:
    from lit_modules.tools.compare import compare

    result = compare(args.runs, args.out, draw=not args.no_plot)
    print(result["table"])
    print("wrote " + ", ".join(str(f) for f in result["files"]))
    return 0


if __name__ == "__main__":
    from lit_modules.cli import main

    sys.exit(main(["compare", *sys.argv[1:]]))
