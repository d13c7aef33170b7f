"""`moelab generate SOURCE --prompt TEXT`: sample a continuation, printed as it comes.

SOURCE is anything `moelab eval` takes (model directory, .ckpt, sharded folder, run
directory, Hugging Face directory). The prompt is tokenized with the source's
tokenizer.json (its post-processor included, so a BOS token is added where the
tokenizer adds one), then decoded with a KV cache (arch/cache.py, arch/generate.py).
Text goes to stdout as tokens arrive; a character split over several tokens (a
multi-byte piece of byte-level BPE) is printed once all of it has arrived. Generation
stops after --max-new-tokens or at the tokenizer's end-of-text token.
"""
from __future__ import annotations

import sys
import time
from typing import List

from arch.registry import RecipeError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a model, streamed as it is generated")
    p.add_argument("source", help="moelab model directory, .ckpt, sharded .dcp folder, run directory, or "
                                  "Hugging Face directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy; default 1")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the most likely tokens holding this probability (1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the source's")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.set_defaults(func=run_generate)


class IncrementalDecoder:
    """Text of a growing list of token ids, handed out piece by piece. Only a window of
    recent tokens is decoded each time, and a piece is held back while it ends in the
    replacement character: the rest of that character's bytes are yet to come."""

    def __init__(self, tokenizer, context: List[int]):
        self.tok = tokenizer
        self.ids = list(context)  # the prompt: decoders that treat a text's start specially see it
        self.prefix = max(0, len(self.ids) - 4)  # window start: some context for the decoder
        self.read = len(self.ids)  # tokens whose text is out

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]


def find_eos(tokenizer):
    """The tokenizer's end-of-text id, or None when it defines none."""
    from lit_modules.data.corpus import DataError
    from lit_modules.data.tokenizer import eos_id

    try:
        return eos_id(tokenizer, "")
    except DataError:
        return None


def check_args(args) -> None:
    if not args.prompt:
        raise RecipeError("--prompt is empty; give some text to continue.")
    if args.max_new_tokens < 1:
        raise RecipeError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")
    if not args.temperature >= 0:
        raise RecipeError(f"--temperature {args.temperature} must be >= 0 (0: greedy).")
    if args.top_k < 0:
        raise RecipeError(f"--top-k {args.top_k} must be >= 0 (0: no limit).")
    if not 0 < args.top_p <= 1:
        raise RecipeError(f"--top-p {args.top_p} must be in (0, 1] (1: no limit).")


def run_generate(args) -> int:
    import torch

    from arch.generate import generate
    from lit_modules.commands.eval_cmd import open_model

    check_args(args)
    recipe, model, tokenizer, _, device, dtype = open_model(args.source, args.device, args.dtype, args.tokenizer)
    m = recipe.model
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise RecipeError("--prompt gives no tokens; give some text to continue.")
    if max(ids) >= m.vocab_size:
        raise RecipeError(f"the tokenizer produces token id {max(ids)} but the model's vocabulary has "
                          f"{m.vocab_size} entries; use the tokenizer the model was trained with.")
    if len(ids) + args.max_new_tokens > m.max_seq_len:
        raise RecipeError(f"--prompt is {len(ids)} tokens and --max-new-tokens {args.max_new_tokens}: together more "
                          f"than the model's max_seq_len ({m.max_seq_len}); shorten the prompt or ask for fewer "
                          f"tokens.")
    eos = None if args.ignore_eos else find_eos(tokenizer)

    generator = torch.Generator(device).manual_seed(args.seed)
    decoder = IncrementalDecoder(tokenizer, ids)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    t0, n = time.perf_counter(), 0
    for token in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos,
                          generator):
        n += 1
        if int(token) == eos:
            break
        sys.stdout.write(decoder.push(int(token)))
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    dt = time.perf_counter() - t0
    print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s; {device}, {str(dtype).removeprefix('torch.')}]",
          file=sys.stderr)
    return 0
