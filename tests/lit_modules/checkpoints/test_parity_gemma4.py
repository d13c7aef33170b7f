"""Gemma 4 (text) parity with transformers: tiny random Gemma4ForCausalLM models keeping
every quirk (per-kind head_dim and KV heads, keys = values, proportional partial RoPE,
KV sharing with the double-wide FFN, per-layer inputs, the dense + routed MoE block and
its router, layer scalars, soft-capping), imported with `moelab import-hf`'s converter
and compared in float32 on CPU: logits and loss within 1e-4."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _hf_tiny import import_and_load, max_diff, tokens  # noqa: E402
from _hf_tiny_gemma4 import CASES, gemma4  # noqa: E402

TOL = 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_gemma4_matches_transformers(case, tmp_path):
    hf = gemma4(**CASES[case])
    recipe, ours = import_and_load(hf, tmp_path)
    ids = tokens()
    with torch.no_grad():
        mine, theirs = ours(ids, targets=ids), hf(ids, labels=ids)
    diff = max_diff(mine.logits, theirs.logits)
    assert diff <= TOL, f"{case}: max |logit diff| = {diff:.3g}"
    # transformers' labels are shifted inside; moelab's targets are the next tokens
    with torch.no_grad():
        shifted = ours(ids[:, :-1], targets=ids[:, 1:]).loss
    assert abs(shifted.item() - theirs.loss.item()) <= TOL
    m = recipe.model
    glob = m.layer_kinds["global"]
    assert glob.head_dim == 24 and glob.rope.proportional
    if case == "moe-keqv":
        assert m.moe.kind == "parallel_dense" and glob.k_eq_v and glob.n_kv_heads == 1
    else:
        assert m.kv_shared_layers == 3 and m.kv_shared_ffn_mult == 2 and m.per_layer_input.dim == 8


@pytest.mark.parametrize("case", sorted(CASES))
def test_gemma4_export_round_trip(case, tmp_path):
    """import-hf then export-hf gives back a directory transformers loads with the same
    logits (the fused expert layout and the router's own tensors; the per-layer input
    tensors, the KV-sharing layers without k/v weights)."""
    from transformers import AutoModelForCausalLM

    from lit_modules.checkpoints.hf import export_hf

    hf = gemma4(**CASES[case])
    import_and_load(hf, tmp_path)
    export_hf(tmp_path / "moelab", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    ids = tokens()
    with torch.no_grad():
        assert max_diff(back(ids).logits, hf(ids).logits) <= TOL


def test_gemma4_multimodal_text_model(tmp_path):
    """The text model of Gemma4ForConditionalGeneration: its vision tower and embedder
    are skipped, the rest imports under model.language_model."""
    from _hf_tiny_gemma4 import gemma4_multimodal

    hf = gemma4_multimodal(**CASES["dense-ple-kvshare"])
    recipe, ours = import_and_load(hf, tmp_path)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(input_ids=ids).logits) <= TOL
    assert recipe.model.per_layer_input.dim == 8


@pytest.mark.parametrize("override, named", [
    ("model.moe.router.kind=softmax_topk", "model.moe.router.kind"),  # Gemma 4's router normalises its input
    ("model.kv_shared_ffn_mult=3", "d_ff"),  # transformers doubles the FFN of KV-sharing layers or nothing
])
def test_export_refuses_what_gemma4_cannot_hold(override, named):
    from arch import load_recipe
    from arch.recipe import resolve_recipe
    from lit_modules.checkpoints.hf_config import ConvertError, hf_config_for

    extra = ["model.layer_pattern=[local,local,global]", "model.kv_shared_layers=3"] if "ffn_mult" in override else []
    m = resolve_recipe(load_recipe("proxies/gemma4_moe_tiny", [override] + extra)).model
    with pytest.raises(ConvertError, match=named) as e:
        hf_config_for(m)
    assert "Gemma4ForCausalLM" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_kv_sharing_layers_stored_kv_weights_are_skipped(tmp_path):
    """Some checkpoints keep k/v weights for the KV-sharing layers, which compute none
    (transformers ignores them on load): the import skips them, and only them."""
    hf = gemma4(**CASES["dense-ple-kvshare"])
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    d, hd = hf.config.hidden_size, 12
    for name, rows in (("k_proj.weight", (2 * hd, d)), ("v_proj.weight", (2 * hd, d)), ("k_norm.weight", (hd,))):
        state[f"model.layers.5.self_attn.{name}"] = torch.randn(rows)
    recipe, ours = import_and_load(hf, tmp_path, state=state)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL
    from lit_modules.checkpoints.hf_config import ConvertError

    state["model.layers.2.self_attn.v_norm.weight"] = torch.ones(hd)  # layer 2 computes its own: not skipped
    (tmp_path / "again").mkdir()
    with pytest.raises(ConvertError, match="unexpected"):
        import_and_load(hf, tmp_path / "again", state=state)


@pytest.mark.parametrize("name", ["gemma4/e2b", "gemma4/e4b", "gemma4/31b", "gemma4/26b_a4b"])
def test_released_configs_import_as_the_shipped_recipes(name):
    """What import-hf makes of each released config computes what the shipped recipe
    does (equal signatures: every field that changes the function)."""
    import copy

    import transformers

    from _hf_tiny_gemma4 import RELEASED
    from arch import load_recipe
    from arch.recipe import resolve_recipe
    from lit_modules.checkpoints.hf_config import model_config_from_hf, signature
    from lit_modules.checkpoints.hf_gemma4 import GEMMA4

    from arch.config import Recipe

    text = transformers.Gemma4TextConfig(**copy.deepcopy(RELEASED[name]))
    imported = resolve_recipe(Recipe(model=model_config_from_hf(GEMMA4, text))).model
    shipped = load_recipe(name).model
    assert signature(imported) == signature(shipped)
    assert imported.max_seq_len == shipped.max_seq_len


@pytest.mark.parametrize("field, value, named", [
    ("hidden_activation", "silu", "hidden_activation"),
    ("use_bidirectional_attention", "all", "causal"),
])
def test_config_fields_moelab_cannot_honour_are_one_sentence(field, value, named):
    import copy

    import transformers

    from _hf_tiny_gemma4 import BASE
    from lit_modules.checkpoints.hf_config import ConvertError, model_config_from_hf
    from lit_modules.checkpoints.hf_gemma4 import GEMMA4

    text = transformers.Gemma4TextConfig(**copy.deepcopy({**BASE, **CASES["moe-keqv"], field: value}))
    with pytest.raises(ConvertError, match=named) as e:
        model_config_from_hf(GEMMA4, text)
    assert len(str(e.value).splitlines()) == 1
