"""`python -m lit_modules.data.export_stream RECIPE OUT [a.b=c ...]`: write a recipe's
token cache as litdata chunks for `data.streaming` (lit_modules/data/streaming.py).
Apart from streaming.py, which the DataModule imports, so that the two do not import
each other."""
from __future__ import annotations

import sys
from pathlib import Path

from lit_modules.data.streaming import export


def main(argv=None) -> int:
    from arch import load_recipe
    from arch.registry import RecipeError
    from lit_modules.data.datamodule import TokenDataModule

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m lit_modules.data.export_stream RECIPE OUT [a.b=c ...]", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(argv[0], argv[2:])
        counts = export(TokenDataModule(recipe), argv[1])
    except RecipeError as e:
        print(f"moelab streaming: error: {e}", file=sys.stderr)
        return 2
    print(f"moelab streaming: {counts['train']:,} train + {counts['val']:,} validation tokens written to {argv[1]} "
          f"(train with data.streaming={argv[1]} data.tokenizer={Path(argv[1]) / 'tokenizer.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
