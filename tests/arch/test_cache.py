"""KV-cached decoding (arch/cache.py, arch/generate.py): the logits of a sequence fed in
pieces through the cache equal those of one full forward, for every attention kind
(GQA with windows, QK-norm per head and over all heads, soft-caps, sinks, MLA), with
sliding windows shorter than the sequence so that the ring buffers wrap."""
from __future__ import annotations

import pytest
import torch

from arch import build_model, load_recipe
from arch.cache import KVCache
from arch.generate import dropless, generate, sample_next
from conftest import TINY

SEQ = 22
SMALL = ["model.vocab_size=256", "model.max_seq_len=128", "model.d_model=64"]
CONFIGS = {
    # recipe, dotlist: each shrunk from the reference or proxy recipe users train
    "qwen3": TINY["qwen3"],
    "qwen3_moe": TINY["qwen3_moe"],
    # 5 local (window 8 < 22) : 1 global, sandwich norms, scaled embeddings
    "gemma3": TINY["gemma3"],
    # Gemma 3 with attention and final soft-capping (eager attention path)
    "gemma3_softcap": (TINY["gemma3"][0], TINY["gemma3"][1] + ["model.attention.softcap=2.0",
                                                               "model.final_softcap=5.0"]),
    # sinks + biases, alternating window 6 / global layers, YaRN, clamped SwiGLU experts
    "gpt_oss": ("proxies/gpt_oss_tiny", SMALL + ["model.n_layers=2", "model.layer_kinds.local.window=6",
                                                 "model.attention.head_dim=16", "model.moe.n_experts=8",
                                                 "model.moe.top_k=2", "model.moe.d_expert=32"]),
    # MLA (query bottleneck, interleaved shared rotary key, YaRN mscale), dense first
    # layer, grouped sigmoid routing, a shared expert
    "deepseek_v3": ("proxies/deepseek_v3_tiny", SMALL + [
        "model.n_layers=3", "model.attention.q_lora_rank=32", "model.attention.kv_lora_rank=16",
        "model.attention.qk_nope_head_dim=8", "model.attention.qk_rope_head_dim=8",
        "model.attention.v_head_dim=12", "model.ffn.d_ff=96", "model.moe.n_experts=8", "model.moe.top_k=2",
        "model.moe.d_expert=16", "model.moe.d_shared=16", "model.moe.router.n_group=4",
        "model.moe.router.topk_group=2"]),
    # OLMoE: QK-norm over the whole projections
    "olmoe": ("olmoe/1b_7b", SMALL + ["model.n_layers=2", "model.attention.n_heads=4", "model.attention.n_kv_heads=2",
                                      "model.moe.n_experts=8",
                                      "model.moe.top_k=2", "model.moe.d_expert=32"]),
}
# MLA with every layer windowed (7 < 22): its ring buffers too
CONFIGS["deepseek_v3_window"] = (CONFIGS["deepseek_v3"][0],
                                 CONFIGS["deepseek_v3"][1] + ["model.layer_kinds.global.window=7"])
# pieces that mix decoding steps with prompt chunks, one of them longer than every window
PIECES = [5, 1, 1, 9, 1, 2, 1, 1, 1]
assert sum(PIECES) == SEQ


def make_model(name: str, *extra: str, seed: int = 0):
    recipe, overrides = CONFIGS[name]
    torch.manual_seed(seed)
    model = build_model(load_recipe(recipe, list(overrides) + list(extra)).model, device="cpu")
    with torch.no_grad():  # norms start at 0 or 1, sinks and biases at 0: make them matter
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("sinks", "bias", "b_in", "b_out")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def cached_logits(model, ids, pieces):
    cache = KVCache.for_model(model, ids.shape[1])
    out, i = [], 0
    with torch.no_grad(), dropless(model):
        for n in pieces:
            assert cache.pos == i
            out.append(model(ids[:, i:i + n], cache=cache).logits)
            i += n
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_logits_equal_full_forward(name):
    model = make_model(name)
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    for pieces in (PIECES, [1] * SEQ):  # chunks and steps; and pure one-token decoding
        got, cache = cached_logits(model, ids, pieces)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=2e-5)
    # local layers keep only their window; global ones the whole sequence
    for spec, layer in zip(model.specs, cache.layers):
        assert layer.k.shape[2] == (SEQ if spec.window is None else min(spec.window, SEQ))
    windows = [s.window for s in model.specs if s.window is not None]
    if name.startswith(("gemma3", "gpt_oss", "deepseek_v3_window")):
        assert windows and max(windows) < SEQ - 9  # the rings wrapped, even within the 9-token chunk


def test_cache_is_needed_for_the_equality():
    """A model fed the second half alone (no cache) gives other logits: the test above
    would catch a cache that keeps nothing, or positions that restart at 0."""
    model = make_model("gemma3")
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        assert (model(ids[:, 10:]).logits - full[:, 10:]).abs().max() > 1e-3
        cache = KVCache.for_model(model, SEQ)
        model(ids[:, :10], cache=cache)
        cache.layers[0].pos_S.fill_(-1)  # forget layer 0's local keys
        assert (model(ids[:, 10:11], cache=cache).logits - full[:, 10:11]).abs().max() > 1e-4


def test_capacity_dropping_is_off_while_generating():
    """Capacity applies in eval as in training (experts/moe.py); under `dropless` a
    capacity-bounded layer is the dropless one, so cached pieces equal a full forward."""
    model = make_model("qwen3_moe", "model.moe.capacity_factor=0.5")
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dropping = model(ids).logits
        assert sum(int(m.stats["dropped_tokens"]) for m in model.moe_layers) > 0
        with dropless(model):
            full = model(ids).logits
        assert all(m.apply_capacity for m in model.moe_layers)  # restored
    assert (dropping - full).abs().max() > 1e-4
    got, _ = cached_logits(model, ids, PIECES)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=2e-5)


def test_cache_refuses_positions_beyond_its_capacity():
    model = make_model("qwen3")
    cache = KVCache.for_model(model, 4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="made for 4 positions"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_greedy_generation_equals_argmax_of_full_forwards():
    model = make_model("gemma3")
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    got = torch.stack(list(generate(model, prompt, 12, prefill_chunk=3)), dim=1)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, 5:])


def test_generation_stops_at_eos_and_checks_lengths():
    model = make_model("qwen3")
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(5))
    first = next(iter(generate(model, prompt, 8)))
    assert len(list(generate(model, prompt, 8, eos_id=int(first)))) == 1
    with pytest.raises(ValueError, match="max_seq_len"):
        list(generate(model, prompt, 128))
    with pytest.raises(ValueError, match="no tokens"):
        list(generate(model, prompt[:, :0], 3))


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits[:2], 0.0), torch.tensor([0, 0]))
    assert torch.equal(sample_next(logits, 5.0, top_k=1, generator=g), torch.zeros(4000, dtype=torch.long))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-3, generator=g), torch.zeros(4000, dtype=torch.long))
    # top_k 2: only the two best, in their renormalised proportions
    ids = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(ids.tolist()) == {0, 1}
    p0 = torch.softmax(torch.tensor([2.0, 1.0]), 0)[0].item()
    assert abs((ids == 0).float().mean().item() - p0) < 0.03
    # top_p: the smallest set of best tokens whose probability reaches p
    probs = logits[0].softmax(0)
    p = (probs[0] + probs[1] + 0.5 * probs[2]).item()  # needs the 3rd best, not the 4th
    assert set(sample_next(logits, 1.0, top_p=p, generator=g).tolist()) == {0, 1, 2}
    # every token at a high temperature; the same seed, the same draws
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == set(range(5))
    a = sample_next(logits, 0.7, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, sample_next(logits, 0.7, generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("rope_cfg", [dict(), dict(scaling="linear", factor=8.0),
                                      dict(scaling="yarn", factor=4.0, original_max_seq_len=16)])
def test_rope_tables_from_an_offset_are_rows_of_the_whole_table(rope_cfg):
    from arch.config import RopeConfig
    from arch.rope import RoPE

    rope = RoPE(16, RopeConfig(**rope_cfg))
    whole = rope(40, "cpu")
    for start, n in ((0, 40), (17, 1), (30, 10)):
        part = rope(n, "cpu", start)
        assert all(torch.equal(p, w[start:start + n]) for p, w in zip(part, whole))
