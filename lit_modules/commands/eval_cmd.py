"""`moelab eval SOURCE --data PATH`: token-level loss and perplexity on a text file.

SOURCE is a moelab model directory, a Lightning .ckpt, a sharded checkpoint folder
(.dcp), a run directory, or a Hugging Face directory (converted in memory, nothing
written). The text is tokenized once, whole, with the source's tokenizer.json (its
post-processor included, as `tokenizer(text)` in transformers does), then cut into
non-overlapping windows of --seq-len tokens; each window is scored on its own,
predicting its tokens 2..n from the ones before. The loss is the mean over all
predicted tokens of all windows (a last, shorter window included), and perplexity =
exp(loss).

`--quantize FORMAT` scores the model with its weights quantized and dequantized
(post-training quantization, arch/quant.py), the same layers and the same arithmetic
as quantization-aware training's forward: PTQ and QAT compare on the same data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, NamedTuple, Optional

from arch.registry import RecipeError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="token-level loss and perplexity of a model on a text file")
    p.add_argument("source", help="moelab model directory, .ckpt, sharded .dcp folder, run directory, or "
                                  "Hugging Face directory")
    p.add_argument("--data", required=True, help="a UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length in tokens (default: the recipe's train.seq_len, at most model.max_seq_len)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the source's")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quantize", default=None, metavar="FORMAT",
                   help="post-training quantization of the weights before scoring: int4, int4_b32 or fp8 (the "
                        "layers train.qat quantizes: linear layers and experts, plus the recipe's "
                        "train.qat.include)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)


def load_source(source, device="cpu", dtype=None):
    """(recipe, model, tokenizer.json path or None) for any SOURCE `moelab eval` takes."""
    from lit_modules.checkpoints.hf import is_hf_dir, load_hf
    from lit_modules.checkpoints.layout import TOKENIZER_FILE
    from lit_modules.checkpoints.model_dir import load_model

    if is_hf_dir(source):
        recipe, model = load_hf(source, device, dtype)
        tok = Path(source) / TOKENIZER_FILE
        return recipe, model, tok if tok.is_file() else None
    return load_model(source, device, dtype)


class OpenModel(NamedTuple):
    recipe: object
    model: object
    tokenizer: object
    tokenizer_path: Path
    device: object
    dtype: object


def open_model(source, device_arg: str, dtype_arg: str, tokenizer_arg: Optional[str]) -> OpenModel:
    """What `eval`, `generate` and `analyze` start from: the model of SOURCE on the
    resolved device (bf16 on CUDA, float32 elsewhere, unless --dtype says), its expert
    backend checked for that device, and the tokenizer (--tokenizer, else the one
    SOURCE comes with; one sentence when there is none)."""
    import torch

    from lit_modules.runtime import check_expert_backend, resolve_device

    device = resolve_device(device_arg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype_arg)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(Path(tokenizer_arg), "--tokenizer") if tokenizer_arg else None
    recipe, model, tok_path = load_source(source, device, dtype)
    check_expert_backend(recipe.model, device.type)
    if tokenizer is None:
        if tok_path is None:
            raise RecipeError(f"{source} comes with no tokenizer.json; pass --tokenizer PATH.")
        tokenizer = load_tokenizer(Path(tok_path), str(source))
    return OpenModel(recipe, model, tokenizer, Path(tokenizer_arg) if tokenizer_arg else Path(tok_path), device,
                     dtype)


def window_loss(model, ids: List[int], seq_len: int, batch_size: int, device) -> dict:
    """Sum of next-token cross-entropy over non-overlapping windows of `seq_len` tokens."""
    import torch
    import torch.nn.functional as F

    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]  # a 1-token window predicts nothing
    total, count = 0.0, 0
    with torch.inference_mode():
        i = 0
        while i < len(windows):
            # equal-length windows batch together; the short last one goes alone
            batch = [windows[i]]
            while len(batch) < batch_size and i + len(batch) < len(windows) \
                    and len(windows[i + len(batch)]) == len(batch[0]):
                batch.append(windows[i + len(batch)])
            i += len(batch)
            x = torch.tensor(batch, dtype=torch.long, device=device)
            logits = model(x).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens_predicted": count, "windows": len(windows)}


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's contents, or one sentence saying why not."""
    if not path.is_file():
        raise RecipeError(f"{what} {path} is not a file; give a UTF-8 text file.")
    raw = path.read_bytes()
    if b"\0" in raw[:65536]:
        raise RecipeError(f"{what} {path} holds binary data (NUL bytes), not text; give a UTF-8 text file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{what} {path} is not UTF-8 text (byte {e.start} cannot be decoded); convert it, e.g. "
                          f"iconv -t utf-8.") from None
    if not text.strip():
        raise RecipeError(f"{what} {path} is empty; give a file with text to score.")
    return text


def load_tokenizer(path: Path, what: str):
    """A tokenizers.Tokenizer from a tokenizer.json, or one sentence saying why not."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise RecipeError(f"{what}: tokenizer {path} is not a file; give a tokenizer.json.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library's parse errors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(f"{what}: {path} is not a readable tokenizer.json ({reason}).") from None


def run_eval(args) -> int:
    if args.batch_size < 1:
        raise RecipeError(f"--batch-size {args.batch_size} must be at least 1.")
    if args.quantize is not None:
        from arch.quant import check_format

        check_format(args.quantize, "--quantize")
    data = Path(args.data)
    text = read_text_file(data, "--data")
    recipe, model, tokenizer, tok_path, device, dtype = open_model(args.source, args.device, args.dtype,
                                                                   args.tokenizer)
    if args.quantize is not None:
        from arch.quant import quantize_weights_

        quantize_weights_(model, args.quantize, recipe.train.qat.include)
    ids = tokenizer.encode(text).ids
    m = recipe.model
    if ids and max(ids) >= m.vocab_size:
        raise RecipeError(f"tokenizer {tok_path} produces token id {max(ids)} but the model's vocabulary has "
                          f"{m.vocab_size} entries; use the tokenizer the model was trained with.")
    seq_len = args.seq_len or min(recipe.train.seq_len, m.max_seq_len)
    if seq_len < 2 or seq_len > m.max_seq_len:
        raise RecipeError(f"--seq-len {seq_len} must be between 2 and the model's max_seq_len ({m.max_seq_len}).")
    if len(ids) < 2:
        raise RecipeError(f"--data {args.data} gives {len(ids)} token(s); at least 2 are needed to score anything.")
    out = window_loss(model, ids, seq_len, args.batch_size, device)
    out.update({"source": str(args.source), "data": str(data), "tokenizer": str(tok_path), "seq_len": seq_len,
                "tokens": len(ids), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "quantize": args.quantize})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.source} on {data}: loss {out['loss']:.4f} nats/token, perplexity {out['perplexity']:.3f} "
              f"({out['tokens_predicted']} predicted tokens in {out['windows']} windows of <= {seq_len}; "
              f"{device}, {out['dtype']}{', weights ' + args.quantize if args.quantize else ''})")
    return 0
