"""`moelab analyze SOURCE`: routing analysis as PNG plots plus analysis.json.

SOURCE is a run directory (or a checkpoint inside one), or anything `moelab eval`
loads (a model directory, .ckpt, .dcp folder) with `--data FILE`. Two halves
(lit_modules/tools/routing_analysis.py says what each number is):

  history   for a run: its router_loads.jsonl and TensorBoard router scalars ->
            load_over_steps.png, balance_over_steps.png
  final     the model on --batches N batches: of the run's validation split, or of
            --data FILE cut into windows of --seq-len tokens -> load_final.png,
            router_entropy.png, coselection.png, layer_agreement.png,
            top_tokens_layer{i}.png

Everything goes to RUN/analysis/ (or the source's folder's analysis/, or --out DIR);
analysis.json is written even without matplotlib, the plots then skipped in one line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

from arch.registry import RecipeError


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="routing analysis of a run or model: PNG plots and analysis.json")
    p.add_argument("source", help="run directory, or model directory / .ckpt / .dcp folder with --data")
    p.add_argument("--data", default=None,
                   help="a UTF-8 text file to route (default for a run: its validation split)")
    p.add_argument("--batches", type=int, default=4, help="batches to run the final model on (0: history only)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per batch (default: the recipe's train.micro_batch_size)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the recipe's train.seq_len, at most model.max_seq_len)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/analysis)")
    p.add_argument("--top-tokens", type=int, default=8, help="tokens listed per expert")
    p.add_argument("--min-count", type=int, default=5,
                   help="occurrences a token needs in the analysed batches to be listed for an expert")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the source's")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.set_defaults(func=run_analyze)


def run_dir_of(source: Path) -> Optional[Path]:
    """The run directory SOURCE is, or whose checkpoints/ holds it; None otherwise."""
    from lit_modules.checkpoints import layout

    if source.is_dir() and layout.is_run_dir(source):
        return source
    if source.parent.name == layout.CHECKPOINT_DIR and layout.is_run_dir(source.parent.parent):
        return source.parent.parent
    return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_analyze(args) -> int:
    import numpy as np

    from experts.layers import moe_layers
    from lit_modules.checkpoints.layout import ANALYSIS_DIR
    from lit_modules.commands.eval_cmd import open_model, read_text_file
    from lit_modules.disk import check_folder, writing
    from lit_modules.tools import routing_analysis as ra

    source = Path(args.source)
    for name in ("batches", "top_tokens", "min_count"):
        if getattr(args, name) < (0 if name == "batches" else 1):
            raise RecipeError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least "
                              f"{0 if name == 'batches' else 1}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise RecipeError(f"--batch-size {args.batch_size} must be at least 1.")
    if not source.exists():
        raise RecipeError(f"{source} does not exist; give a run directory, or a model directory / .ckpt with "
                          f"--data FILE.")
    run_dir = run_dir_of(source)
    if run_dir is None and args.batches == 0:
        raise RecipeError(f"--batches 0 analyses a run's history only, and {source} is not a run directory; give "
                          f"a run directory or at least one batch.")
    if run_dir is None and args.data is None:
        raise RecipeError(f"{source} is not a run directory, so it has no validation data of its own; pass "
                          f"--data FILE (a UTF-8 text file to route).")
    text = read_text_file(Path(args.data), "--data") if args.data else None
    if args.out:
        out = Path(args.out)
    else:
        out = (run_dir or (source if source.is_dir() else source.parent)) / ANALYSIS_DIR
    check_folder(out, "--out", "choose another --out")
    result = {"source": str(source), "run_dir": str(run_dir) if run_dir else None}
    fix = "free space there, or choose another --out"

    if args.batches > 0:
        recipe, model, tokenizer, tok_path, device, dtype = open_model(source, args.device, args.dtype,
                                                                       args.tokenizer)
        if not moe_layers(model):
            raise RecipeError(f"{source} has no MoE layer; there is no routing to analyse.")
        m, t = recipe.model, recipe.train
        seq_len = args.seq_len or min(t.seq_len, m.max_seq_len)
        if seq_len < 1 or seq_len > m.max_seq_len:
            raise RecipeError(f"--seq-len {seq_len} must be between 1 and the model's max_seq_len "
                              f"({m.max_seq_len}).")
        batch_size = args.batch_size or t.micro_batch_size
        if text is not None:
            ids = tokenizer.encode(text).ids
            if not ids:
                raise RecipeError(f"--data {args.data} gives no tokens; give a file with text to route.")
            if max(ids) >= m.vocab_size:
                raise RecipeError(f"tokenizer {tok_path} produces token id {max(ids)} but the model's vocabulary "
                                  f"has {m.vocab_size} entries; use the tokenizer the model was trained with.")
            batches = ra.text_batches(ids, seq_len, batch_size, args.batches)
            result["data"] = str(args.data)
        else:
            batches = ra.val_batches(recipe, tok_path, batch_size, seq_len, args.batches)
            result["data"] = "the run's validation split"
        cap, tokens = ra.run_batches(model, batches, device)
        n_batches = len(cap.ids[next(iter(cap.ids))]) if cap.ids else 0
        if tokens.size == 0:
            raise RecipeError(f"no batch could be formed from {result['data']}; give more text with --data.")
        ids = {k: np.concatenate(v) for k, v in cap.ids.items()}
        experts = {k: layer.n_experts for k, layer in cap.layers}

        def decode(i: int) -> str:
            return tokenizer.decode([i]) or (tokenizer.id_to_token(i) or f"<{i}>")

        result.update({"batches": n_batches, "batch_size": batch_size, "seq_len": seq_len, "device": str(device),
                       "dtype": str(dtype).removeprefix("torch."),
                       "final": ra.analyze_routing(ids, experts, tokens, cap.entropy_sum, cap.probs_sum,
                                                   cap.dropped, decode, args.top_tokens, args.min_count)})
    if run_dir is not None:
        from arch import load_recipe
        from lit_modules.checkpoints.layout import RECIPE_FILE

        r = load_recipe(run_dir / RECIPE_FILE)
        # the slots of rank 0's micro-batch, which the TensorBoard scalars describe
        result["history"] = ra.history(run_dir, r.train.micro_batch_size * r.train.seq_len * r.model.moe.top_k)

    with writing("the analysis", out, fix):
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "analysis.json", result)
        files: List[Path] = [out / "analysis.json"]
        plotted = ra.have_matplotlib()
        if plotted:
            if result.get("history"):
                files += ra.plot_history(result["history"], out)
            if result.get("final"):
                files += ra.plot_final(result["final"], out)

    print(f"moelab analyze: {source}")
    for line in ra.summary_lines(result):
        print(line)
    if run_dir is not None and not any(d.get("records") or d.get("scalars")
                                       for d in result["history"]["layers"].values()):
        print("training history: none recorded (no router_loads.jsonl or TensorBoard router scalars in the run)")
    if not plotted:
        print("plots skipped: matplotlib is not installed (pip install 'moelab[plots]'); analysis.json has the "
              "numbers.")
    print(f"wrote {len(files)} file(s) to {out}: " + ", ".join(f.name for f in files))
    return 0
