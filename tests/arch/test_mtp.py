"""Multi-token prediction (arch/mtp.py): the loss equals a plain per-depth computation
on unpadded sequences, gradients reach every module, the accounting counts it apart,
and it stays out of evaluation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arch import build_model, count, load_recipe
from arch.registry import RecipeError


def tiny(recipe="proxies/deepseek_v3_tiny", *overrides):
    r = load_recipe(recipe, ["model.mtp.depth=2", "model.mtp.loss_weight=0.5", *overrides])
    torch.manual_seed(0)
    return r, build_model(r.model, "cpu").float()


def reference_mtp_loss(model, ids, targets):
    """Depth by depth on sequences cut to their valid length (no padding): depth k sees
    positions 0..T-k-1, the embedding of targets[:, k-1 : T-1] and predicts
    targets[:, k:]."""
    cfg = model.cfg
    T = ids.shape[1]
    with torch.no_grad():
        model.eval()
        h = model.norm(_body(model, ids))
        model.train()
    h = h.detach().requires_grad_(False)
    total = 0.0
    for k, module in enumerate(model.mtp, start=1):
        n = T - k
        emb = model.embed_tokens(targets[:, k - 1:k - 1 + n])
        kind = module.block.spec.kind
        rope = model.ropes[kind](n, ids.device)
        mask = getattr(module.block.attn, "block_mask", None)
        h = module(h[:, :n], emb, rope, mask(n, ids.device) if mask else None)
        logits = model._logits(h)
        total = total + F.cross_entropy(logits.flatten(0, 1).float(), targets[:, k:k + n].flatten())
    return cfg.mtp.loss_weight / len(model.mtp) * total


def _body(model, ids):
    x = model.embed_tokens(ids)
    T = ids.shape[1]
    for block in model.layers:
        rope = model.ropes[block.spec.kind](T, ids.device)
        mask = getattr(block.attn, "block_mask", None)
        x = block(x, rope, mask(T, ids.device) if mask else None)
    return x


@pytest.mark.parametrize("recipe", ["proxies/deepseek_v3_tiny", "proxies/gemma3_tiny", "proxies/dense_tiny"])
@pytest.mark.parametrize("fused", [0, 7])
def test_mtp_loss_equals_unpadded_reference(recipe, fused):
    r, model = tiny(recipe, f"model.fused_ce_chunk={fused}", "model.moe.balance.aux_coef=0.0")
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, r.model.vocab_size, (2, 12), generator=g)
    targets = torch.randint(0, r.model.vocab_size, (2, 12), generator=g)
    out = model(ids, targets=targets, return_logits=False)
    ref = reference_mtp_loss(model, ids, targets)
    assert torch.allclose(out.aux["mtp_loss"], ref, rtol=1e-5, atol=1e-6), (out.aux["mtp_loss"], ref)


def test_mtp_gradients_reach_every_module_and_eval_skips_it():
    r, model = tiny()
    model.train()
    ids = torch.randint(0, r.model.vocab_size, (2, 10))
    targets = torch.randint(0, r.model.vocab_size, (2, 10))
    out = model(ids, targets=targets, return_logits=False)
    out.aux["mtp_loss"].backward()
    for name, p in model.mtp.named_parameters():
        if name.endswith("expert_bias"):
            continue  # a selection bias: no gradient by design
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the MTP loss trains the body too (h^0 comes from it), the embedding and the head
    assert model.layers[0].attn_norm.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(ids, targets=targets)
    assert "mtp_loss" not in out.aux and out.logits.shape == (2, 10, r.model.vocab_size)


def test_ignored_targets_leave_the_mtp_loss():
    """A target of -100 (ignored) removes the positions that predict it and the
    positions that would embed it, at every depth."""
    r, model = tiny("proxies/dense_tiny")
    model.train()
    ids = torch.randint(0, r.model.vocab_size, (1, 9))
    targets = torch.randint(0, r.model.vocab_size, (1, 9))
    masked = targets.clone()
    masked[0, 4] = -100
    base = model(ids, targets=masked, return_logits=False).aux["mtp_loss"]
    assert torch.isfinite(base)
    # depth 1 embeds targets[i] and predicts targets[i+1]: position 3 (predicts 4) and
    # position 4 (embeds 4) are out; the reference loss over the others must match
    model_loss = []
    h = model.norm(_body(model, ids))
    T = 9
    for k, module in enumerate(model.mtp, start=1):
        emb_ids = torch.nn.functional.pad(masked[:, k - 1:], (0, k - 1), value=-100)
        y = torch.nn.functional.pad(masked[:, k:], (0, k), value=-100)
        y = y.masked_fill(emb_ids < 0, -100)
        kind = module.block.spec.kind
        h = module(h, model.embed_tokens(emb_ids.clamp_min(0)), model.ropes[kind](T, ids.device), None)
        keep = y[0] >= 0
        expected_kept = [i for i in range(T) if i + k < T and i + k - 1 != 4 and i + k != 4]
        assert keep.nonzero().flatten().tolist() == expected_kept
        model_loss.append(F.cross_entropy(model._logits(h)[0][keep], y[0][keep]))
    ref = r.model.mtp.loss_weight / 2 * sum(model_loss)
    assert torch.allclose(base, ref, rtol=1e-5)


def test_accounting_counts_mtp_apart():
    r = load_recipe("proxies/deepseek_v3_tiny", ["model.mtp.depth=2"])
    plain = count(load_recipe("proxies/deepseek_v3_tiny").model)
    acc = count(r.model)
    model = build_model(r.model, "meta")
    assert acc.params_mtp == sum(p.numel() for p in model.mtp.parameters()) > 0
    assert acc.params_total == plain.params_total and acc.params_active == plain.params_active
    assert acc.params_total + acc.params_mtp == sum(p.numel() for p in model.parameters())
    assert acc.flops_per_token > plain.flops_per_token


def test_mtp_fields_are_checked():
    with pytest.raises(RecipeError, match="model.mtp.depth"):
        load_recipe("proxies/dense_tiny", ["model.mtp.depth=-1"])
    with pytest.raises(RecipeError, match="model.mtp.loss_weight"):
        load_recipe("proxies/dense_tiny", ["model.mtp.loss_weight=-0.1"])
