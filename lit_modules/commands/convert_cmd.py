"""`moelab import-hf` and `moelab export-hf`: Hugging Face checkpoints <-> moelab.

    moelab import-hf HF_DIR OUT_DIR       config.json + *.safetensors (+ tokenizer.json)
                                          -> recipe.yaml + model*.safetensors (+ tokenizer.json)
    moelab export-hf CHECKPOINT OUT_DIR   a model directory, .ckpt, sharded .dcp folder or run directory
                                          -> a directory transformers' from_pretrained loads
    moelab convert SOURCE OUT_DIR         either one, the direction read off SOURCE (the
                                          `moelab convert` of DESIGN.md)
"""
from __future__ import annotations

import sys


def _common(p) -> None:
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16", "float16"], default="keep",
                   help="cast floating-point weights (default: keep each tensor's stored dtype)")
    p.add_argument("--max-shard-size", default=None,
                   help="largest output shard, e.g. 2GB or 500MB (default 2GiB); shards are written "
                        "straight to disk, so this does not change the memory needed")


def add_parser(sub) -> None:
    p = sub.add_parser("import-hf", help="convert a Hugging Face model to moelab (Qwen3, Qwen3-MoE, Qwen3-Next, "
                       "Qwen3.5, Mixtral, OLMoE, gpt-oss, DeepSeek-V3, Gemma 3, Gemma 4)")
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("out_dir", help="new moelab model directory (must not exist or be empty)")
    _common(p)
    p.set_defaults(func=run_import)
    e = sub.add_parser("export-hf", help="convert a moelab checkpoint to a Hugging Face model directory")
    e.add_argument("checkpoint", help="moelab model directory, Lightning .ckpt, sharded .dcp folder, or run directory")
    e.add_argument("out_dir", help="new Hugging Face model directory (must not exist or be empty)")
    _common(e)
    e.add_argument("--architecture", default=None, metavar="CLASS",
                   help="the transformers class to write where several can hold the model, e.g. "
                        "Qwen3_5MoeForCausalLM for a hybrid (default: the one moelab picks, Qwen3NextForCausalLM)")
    e.set_defaults(func=run_export)
    c = sub.add_parser("convert", help="Hugging Face <-> moelab: import-hf or export-hf, chosen by SOURCE")
    c.add_argument("source", help="a Hugging Face model directory (imported), or a moelab model directory, "
                                  ".ckpt, sharded .dcp folder or run directory (exported)")
    c.add_argument("out_dir", help="new output directory (must not exist or be empty)")
    _common(c)
    c.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from lit_modules.checkpoints.hf import is_hf_dir

    if is_hf_dir(args.source):
        args.hf_dir = args.source
        return run_import(args)
    args.checkpoint = args.source
    return run_export(args)


def run_import(args) -> int:
    from lit_modules.commands.inspect_cmd import human
    from lit_modules.checkpoints.hf import DTYPES, import_hf, parse_size

    info = import_hf(args.hf_dir, args.out_dir, dtype=DTYPES[args.dtype],
                     max_shard_bytes=parse_size(args.max_shard_size))
    tok = " + tokenizer.json" if info["tokenizer"] else ""
    print(f"imported {info['architecture']} ({human(info['params'])} parameters) from {args.hf_dir} -> "
          f"{args.out_dir}: recipe.yaml + {len(info['files'])} safetensors file(s){tok}")
    return 0


def run_export(args) -> int:
    from lit_modules.checkpoints.hf import DTYPES, export_hf, parse_size

    info = export_hf(args.checkpoint, args.out_dir, dtype=DTYPES[args.dtype],
                     architecture=getattr(args, "architecture", None),
                     max_shard_bytes=parse_size(args.max_shard_size))
    for note in info["notes"]:
        print(f"moelab export-hf: note: {note}", file=sys.stderr)
    tok = " + tokenizer.json" if info["tokenizer"] else ""
    print(f"exported {args.checkpoint} as {info['architecture']} -> {args.out_dir}: config.json + "
          f"{len(info['files'])} safetensors file(s){tok}")
    return 0
