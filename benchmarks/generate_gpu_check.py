"""KV-cached decoding on CUDA: cached logits against a full forward (float32 and bf16),
greedy tokens against recomputation, and decoding speed with and without the cache.

    PYTHONPATH=$PWD python3 benchmarks/generate_gpu_check.py [--new 256] [--device cuda]

Random-init proxies (recipes/proxies/*_tiny.yaml): the numbers check the CUDA paths of
arch/cache.py (SDPA with a position mask, the eager path for sinks, MLA), not quality.
"""
from __future__ import annotations

import argparse
import time

import torch

from arch import build_model, load_recipe
from arch.cache import KVCache
from arch.generate import generate

RECIPES = ["proxies/gemma3_tiny", "proxies/qwen3_moe_tiny", "proxies/gpt_oss_tiny", "proxies/deepseek_v3_tiny"]


def timed(fn, dev):
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=256, help="tokens to generate")
    p.add_argument("--prompt", type=int, default=200, help="prompt tokens (longer than the proxies' windows)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    for name in RECIPES:
        # SDPA for the full recomputations too: flex would recompile for every length
        recipe = load_recipe(name, ["model.attention.impl=sdpa"])
        torch.manual_seed(0)
        base = build_model(recipe.model, device=dev).eval()
        ids = torch.randint(0, recipe.model.vocab_size, (2, args.prompt + args.new), device=dev)
        for dtype in (torch.float32, torch.bfloat16):
            model = base.to(dtype)
            full = model(ids).logits.float()
            cache = KVCache.for_model(model, ids.shape[1])
            pieces = [model(ids[:, :args.prompt], cache=cache).logits]
            pieces += [model(ids[:, i:i + 1], cache=cache).logits for i in range(args.prompt, ids.shape[1])]
            diff = (torch.cat(pieces, 1).float() - full).abs().max().item()
            print(f"{name} {str(dtype)[6:]}: max |cached - full| logit = {diff:.3g} "
                  f"(largest logit {full.abs().max():.3g})")
        model = base.to(torch.float32)  # (Module.to is in place: the weights now hold bf16 values)
        prompt = ids[:1, :args.prompt]
        toks, t_cached = timed(lambda: torch.stack(list(generate(model, prompt, args.new)), 1), dev)

        def recompute():
            seq = prompt
            for _ in range(args.new):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
            return seq[:, args.prompt:]

        ref, t_full = timed(recompute, dev)
        print(f"{name} float32 greedy, {args.new} tokens: same tokens {torch.equal(toks, ref)}; cached "
              f"{args.new / t_cached:.1f} tokens/s, recomputed {args.new / t_full:.1f} tokens/s")


if __name__ == "__main__":
    main()
