"""Peak host memory of `moelab import-hf` and `moelab export-hf` against the checkpoint's size.

Writes a synthetic Qwen3-MoE Hugging Face checkpoint of about --gb gigabytes (bf16,
hub layout: one tensor per expert projection, 1 GB shards) one shard at a time, so
this script itself never holds it, then runs import-hf and export-hf in child
processes and reports each one's peak anonymous and resident memory next to the
size (and that of a process that only imports the libraries). The claim under
test: a conversion needs far less memory than the checkpoint, let alone twice it.

    python benchmarks/convert_memory.py --gb 4 --workdir /tmp/convmem
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def write_checkpoint(folder: Path, gb: float) -> int:
    import torch
    from safetensors.torch import save_file

    d, heads, kv, hd, E, F, vocab = 1024, 8, 2, 128, 64, 512, 32000
    per_layer = 2 * (3 * E * d * F + E * d + d * hd * (heads + kv) * 2 + 2 * hd + 2 * d)
    n_layers = max(1, int(gb * 1e9 / per_layer))
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
           "hidden_size": d, "intermediate_size": 4 * d, "moe_intermediate_size": F, "num_experts": E,
           "num_experts_per_tok": 8, "norm_topk_prob": True, "num_hidden_layers": n_layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "hidden_act": "silu",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    weight_map, shard, shard_bytes, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        name = f"model-{n_shard + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, shard_bytes, n_shard = {}, 0, n_shard + 1

    def add(name, *shape):
        nonlocal shard_bytes, total
        t = torch.randn(*shape, dtype=torch.bfloat16) * 0.02
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        if shard_bytes >= 1e9:
            flush()

    add("model.embed_tokens.weight", vocab, d)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for n, shape in (("self_attn.q_proj.weight", (heads * hd, d)), ("self_attn.k_proj.weight", (kv * hd, d)),
                         ("self_attn.v_proj.weight", (kv * hd, d)), ("self_attn.o_proj.weight", (d, heads * hd)),
                         ("self_attn.q_norm.weight", (hd,)), ("self_attn.k_norm.weight", (hd,)),
                         ("input_layernorm.weight", (d,)), ("post_attention_layernorm.weight", (d,)),
                         ("mlp.gate.weight", (E, d))):
            add(p + n, *shape)
        for e in range(E):
            add(f"{p}mlp.experts.{e}.gate_proj.weight", F, d)
            add(f"{p}mlp.experts.{e}.up_proj.weight", F, d)
            add(f"{p}mlp.experts.{e}.down_proj.weight", d, F)
    add("model.norm.weight", d)
    add("lm_head.weight", vocab, d)
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def peak_memory_of(cmd) -> dict:
    """Run `cmd`, sampling its /proc status every 20 ms: peak anonymous memory (what the
    process really holds) and peak resident memory (also counts the mmapped input
    files' pages, which the kernel may drop at will)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    peak = {"RssAnon": 0, "VmRSS": 0}
    while proc.poll() is None:
        try:
            for line in open(f"/proc/{proc.pid}/status"):
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    if proc.wait():
        raise SystemExit(f"{cmd} failed")
    return {"peak_anon_bytes": peak["RssAnon"], "peak_rss_bytes": peak["VmRSS"], "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--workdir", default="/tmp/moelab_convmem")
    ap.add_argument("--max-shard-size", default="1GB")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    total = write_checkpoint(work / "hf", args.gb)
    base = [sys.executable, "-m", "lit_modules.cli"]
    baseline = peak_memory_of([sys.executable, "-c", "import torch, transformers, lit_modules.checkpoints.hf"])
    imp = peak_memory_of(base + ["import-hf", str(work / "hf"), str(work / "moelab"),
                                 "--max-shard-size", args.max_shard_size])
    exp = peak_memory_of(base + ["export-hf", str(work / "moelab"), str(work / "back"),
                                 "--max-shard-size", args.max_shard_size])
    out = {"checkpoint_bytes": total, "baseline_imports": baseline, "import_hf": imp, "export_hf": exp}
    for name in ("import_hf", "export_hf"):
        out[name]["anon_over_checkpoint"] = round(out[name]["peak_anon_bytes"] / total, 3)
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
