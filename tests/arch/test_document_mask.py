"""Document masks for packed sequences (arch/documents.py): the logits at each packed
document's positions equal those of the document run alone, for every attention path
(GQA with windows shorter than a document, sinks, MLA, multi-token prediction), with
RoPE positions restarting per document or running on through the pack; off, the
model is what it was, bit for bit."""
from __future__ import annotations

import pytest
import torch

from arch.cache import KVCache
from arch.documents import document_ids, document_mask, document_positions
from arch.generate import dropless
from arch.rope import RoPE
from test_cache import CONFIGS, make_model

EOS = 3
LENGTHS = (11, 14, 9)  # each longer than every tiny window (8, 6, 7): windows cut inside documents
# qwen3 (GQA), gemma3 (5 local : 1 global, window 8), gpt_oss (sinks, window 6, YaRN),
# deepseek_v3 (MLA, YaRN) and deepseek_v3_window (MLA, every layer window 7)
NAMES = ["qwen3", "gemma3", "gpt_oss", "deepseek_v3", "deepseek_v3_window"]


def packed(B=2, lengths=LENGTHS, seed=0):
    """(B, T) ids: documents of `lengths`, each ended by EOS (the last one cut short,
    as a window of the stream cuts it), and each row's list of (start, length)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 256, (B, sum(lengths)), generator=g)
    spans, start = [], 0
    for n in lengths:
        spans.append((start, n))
        start += n
    for s, n in spans[:-1]:
        ids[:, s + n - 1] = EOS
    return ids, spans


def doc_kwargs(ids, restart: bool):
    doc = document_ids(ids, EOS)
    return {"doc_ids": doc, "positions": document_positions(doc) if restart else None}


def test_document_ids_and_positions_by_hand():
    ids = torch.tensor([[5, 6, EOS, 7, 8, EOS, 9],
                        [EOS, EOS, 5, 6, 7, 8, EOS]])
    doc = document_ids(ids, EOS)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2, 2]]  # the eos ends its document
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3, 4]]
    m = document_mask(doc[:1], window=2)[0, 0].int()
    assert m.tolist() == [[1, 0, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0, 0],
                          [0, 1, 1, 0, 0, 0, 0],
                          [0, 0, 0, 1, 0, 0, 0],
                          [0, 0, 0, 1, 1, 0, 0],
                          [0, 0, 0, 0, 1, 1, 0],
                          [0, 0, 0, 0, 0, 0, 1]]


def test_rope_at_positions_is_the_table_entry():
    for name in ("gpt_oss", "deepseek_v3", "gemma3"):  # YaRN, YaRN with mscale, plain/linear
        for rope in make_model(name).ropes.values():
            cos, sin = rope(40, torch.device("cpu"))
            pos = torch.randint(0, 40, (3, 17))
            c, s = rope.at(pos)
            assert c.shape == (3, 1, 17, rope.dim)
            assert torch.equal(c[:, 0], cos[pos]) and torch.equal(s[:, 0], sin[pos])


@pytest.mark.parametrize("restart", [True, False])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_packed_documents_equal_documents_alone(name, restart):
    model = make_model(name)
    ids, spans = packed()
    with dropless(model):
        got = model(ids, **doc_kwargs(ids, restart)).logits
        plain = model(ids).logits
        for s, n in spans:
            # restart: positions 0.. as alone; else the document alone at its packed offset
            pos = None if restart else torch.arange(s, s + n).expand(ids.shape[0], n)
            alone = model(ids[:, s:s + n], positions=pos).logits
            torch.testing.assert_close(got[:, s:s + n], alone, rtol=1e-5, atol=2e-5)
        # the equality needs the mask: later documents see the earlier ones without it
        assert (plain[:, spans[1][0]:] - got[:, spans[1][0]:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "gpt_oss", "deepseek_v3"])
@torch.no_grad()
def test_without_documents_the_model_is_unchanged(name):
    """One document spanning the sequence with positions 0..T-1 is today's model; and
    the call without doc_ids takes the very path it took (bitwise, the same masks)."""
    model = make_model(name)
    ids = packed()[0].clamp_min(4)  # no eos: one document
    base = model(ids).logits
    assert torch.equal(model(ids, doc_ids=None, positions=None).logits, base)
    one = model(ids, doc_ids=torch.zeros_like(ids, dtype=torch.int32),
                positions=torch.arange(ids.shape[1]).expand_as(ids)).logits
    torch.testing.assert_close(one, base, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["gemma3", "deepseek_v3"])
def test_multi_token_prediction_blocks_get_the_document_masks(name):
    """With every target outside the last document ignored, the losses (the MTP one
    included) cannot depend on the earlier documents' tokens, if the MTP blocks
    attend within documents too."""
    model = make_model(name, "model.mtp.depth=2").train()
    ids, spans = packed(B=1)
    s, n = spans[-1]
    y = torch.full_like(ids, -100)
    y[:, s + 1:-1] = ids[:, s + 2:]  # depth 2 at position i embeds target i + 1: none before s
    other = ids.clone()
    other[:, :s] = torch.where(ids[:, :s] == EOS, ids[:, :s], (ids[:, :s] + 17) % 250 + 4)
    with torch.no_grad(), dropless(model):
        outs = [model(x, targets=y, **doc_kwargs(ids, True)) for x in (ids, other)]
        torch.testing.assert_close(outs[0].aux["mtp_loss"], outs[1].aux["mtp_loss"], rtol=0, atol=1e-6)
        torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=0, atol=1e-6)
        free = [model(x, targets=y) for x in (ids, other)]
        assert abs(float(free[0].aux["mtp_loss"] - free[1].aux["mtp_loss"])) > 1e-4


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_positions_reach_every_rope(name):
    """RoPE is relative: positions shifted by a constant give the same logits (so a
    document keeps its logits wherever it is packed, up to rounding), and positions
    that are not a shift change them (the tables reach every attention path)."""
    model = make_model(name)
    ids = packed()[0]
    T = ids.shape[1]
    base = model(ids).logits
    shifted = model(ids, positions=torch.arange(T).expand_as(ids) + 7).logits
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=2e-5)
    scrambled = model(ids, positions=(torch.arange(T) * 3 % T).expand_as(ids)).logits
    assert (scrambled - base).abs().max() > 1e-3


def test_cache_refuses_documents():
    model = make_model("qwen3")
    ids = packed(B=1)[0]
    with pytest.raises(ValueError, match="not for decoding with a KV cache"):
        model(ids, cache=KVCache.for_model(model, ids.shape[1]), doc_ids=document_ids(ids, EOS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["qwen3", "gemma3", "gpt_oss", "deepseek_v3"])
def test_cuda_flex_document_masks_match_eager(name):
    """On CUDA auto takes flex with document block masks (MLA: SDPA with the dense
    mask); forward and gradients equal the eager reference's."""
    extra = ["model.attention.head_dim=16"] if name != "deepseek_v3" else []
    fast = make_model(name, *extra).cuda()
    ref = make_model(name, *extra, "model.attention.impl=eager").cuda()
    ref.load_state_dict(fast.state_dict())
    ids, spans = packed()
    ids = ids.cuda()
    kw = doc_kwargs(ids, True)
    if name != "deepseek_v3":
        from torch.nn.attention.flex_attention import BlockMask

        assert isinstance(fast.layers[0].attn.block_mask(ids.shape[1], ids.device, kw["doc_ids"]), BlockMask)
    with dropless(fast), dropless(ref):
        a, b = fast(ids, targets=ids, **kw), ref(ids, targets=ids, **kw)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
        a.loss.backward()
        b.loss.backward()
    for (n, p), q in zip(fast.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.parametrize("impl", ["flex", "sdpa"])
def test_a_block_with_documents_is_one_graph(impl):
    """The document masks (a flex block mask whose mask_mod reads doc_ids, or the
    dense mask) and per-document RoPE tables enter a compiled block as inputs: one
    graph, no break (see tests/arch/test_graph_breaks.py)."""
    model = make_model("gemma3", f"model.attention.impl={impl}")
    ids = packed()[0]
    kw = doc_kwargs(ids, True)
    torch._dynamo.reset()
    for block in {b.spec.kind: b for b in model.layers}.values():
        x = torch.randn(*ids.shape, model.cfg.d_model)
        rope = model.ropes[block.spec.kind].at(kw["positions"])
        mask = block.attn.block_mask(ids.shape[1], "cpu", kw["doc_ids"])
        assert isinstance(mask, torch.Tensor) == (impl == "sdpa")
        with torch.no_grad():
            explained = torch._dynamo.explain(block)(x, rope, mask)
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_count == 1


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "gpt_oss"])
@torch.no_grad()  # CPU flex has no backward; tests/arch's CUDA test above compares gradients
def test_flex_document_block_masks_match_eager_on_cpu(name):
    """The flex path's mask_mod (per sequence b: its own documents) against the eager
    reference's dense mask, rows with different documents in one batch."""
    flex = make_model(name, "model.attention.impl=flex")
    ref = make_model(name, "model.attention.impl=eager")
    ids = torch.cat([packed(B=1)[0], packed(B=1, lengths=(5, 20, 9), seed=1)[0]])
    kw = doc_kwargs(ids, True)
    assert not torch.equal(kw["doc_ids"][0], kw["doc_ids"][1])
    with dropless(flex), dropless(ref):
        torch.testing.assert_close(flex(ids, **kw).logits, ref(ids, **kw).logits, rtol=1e-5, atol=2e-5)
