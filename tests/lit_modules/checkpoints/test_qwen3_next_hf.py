"""Qwen3-Next and Qwen3.5-MoE against transformers (the oracle): tiny random models with
every quirk (value heads 2 per key head, k_head_dim != v_head_dim, a 3-tap convolution,
an irregular layer_types list, partial RoPE 0.5, a dense layer, raw top-k weights) are
saved, imported, compared in float32 on CPU, and exported back."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _hf_tiny import VOCAB, import_and_load, max_diff, perturb, tokens  # noqa: E402
from lit_modules.checkpoints.hf import export_hf, import_hf  # noqa: E402
from lit_modules.checkpoints.hf_config import ConvertError  # noqa: E402
from lit_modules.checkpoints.hf_qwen3_next import transformers_pytorch_delta_rule  # noqa: E402


@pytest.fixture(autouse=True)
def _transformers_on_its_pytorch_rule():
    """With flash-linear-attention installed, transformers calls fla's Triton kernels for
    its DeltaNet layers even on CPU tensors, where they fail: these CPU comparisons run
    transformers' own PyTorch rule."""
    with transformers_pytorch_delta_rule():
        yield


def test_pytorch_rule_for_instance_attributes_too():
    """transformers 4.57 kept the rule in each layer (self.chunk_gated_delta_rule); the
    context points those at the unwrapped PyTorch function too, and restores them."""
    import inspect
    import sys

    module = sys.modules[type(hf_model("qwen3_next")).__module__]
    plain = inspect.unwrap(module.torch_chunk_gated_delta_rule)
    layer = torch.nn.Module()
    layer.chunk_gated_delta_rule = fla_like = lambda *a, **k: "fla"
    with transformers_pytorch_delta_rule(layer):
        assert layer.chunk_gated_delta_rule is plain
    assert layer.chunk_gated_delta_rule is fla_like
    # a layer of a family runs its own family's rule (Qwen3.5's is another function)
    qwen35 = hf_model("qwen3_5_moe")
    deltanet = next(m for m in qwen35.modules() if type(m).__name__.endswith("GatedDeltaNet"))
    own = inspect.unwrap(sys.modules[type(deltanet).__module__].torch_chunk_gated_delta_rule)
    assert own is not plain
    deltanet.chunk_gated_delta_rule = fla_like
    with transformers_pytorch_delta_rule(qwen35):
        assert deltanet.chunk_gated_delta_rule is own
    assert deltanet.chunk_gated_delta_rule is fla_like

TOL = 1e-4
QWEN3_NEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
                  layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6,
                  linear_conv_kernel_dim=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=24, norm_topk_prob=False, mlp_only_layers=[2],
                  router_aux_loss_coef=0.02,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
# Qwen3.5-MoE's text config has no dense layers and always renormalises
QWEN3_5 = {k: v for k, v in QWEN3_NEXT.items() if k not in ("intermediate_size", "norm_topk_prob", "mlp_only_layers")}


@torch.no_grad()
def _quirky(model, seed: int = 0):
    perturb(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():  # HF starts dt_bias at 1: make it and A_log matter
        if name.endswith(("dt_bias", "A_log")):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_model(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "qwen3_next":
        cfg = transformers.Qwen3NextConfig(**copy.deepcopy({**QWEN3_NEXT, **overrides}))
    else:
        cfg = transformers.Qwen3_5MoeTextConfig(**copy.deepcopy({**QWEN3_5, **overrides}))
    return _quirky(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), seed)


def qwen3_5_multimodal(seed: int = 0):
    """The published class, Qwen3_5MoeForConditionalGeneration, with a one-layer vision tower."""
    torch.manual_seed(seed)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, out_hidden_size=32,
                  num_position_embeddings=16, spatial_merge_size=1, temporal_patch_size=1)
    cfg = transformers.Qwen3_5MoeConfig(text_config=copy.deepcopy(QWEN3_5), vision_config=vision,
                                        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
                                        vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4)
    model = transformers.Qwen3_5MoeForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    return _quirky(model, seed)


def _loss_parity(hf, ours):
    """Logits within TOL; the float32 next-token loss plus the pooled aux loss within 1e-4 of HF's."""
    ids = tokens()
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # HF shifts inside
    with torch.no_grad():
        theirs = hf(input_ids=ids, labels=ids, output_router_logits=True)
        out = ours(ids, targets=targets)
    assert max_diff(out.logits, theirs.logits) <= TOL
    assert abs((out.loss + out.aux["aux_loss"]).item() - theirs.loss.item()) <= 1e-4


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5_moe"])
def test_logits_and_loss_match_transformers(kind, tmp_path):
    hf = hf_model(kind)
    recipe, ours = import_and_load(hf, tmp_path)
    m = recipe.model
    # the quirks under test really are in the imported recipe
    from arch.resolve import layer_specs

    assert [s.attention for s in layer_specs(m)] == ["gated_deltanet", "gqa", "gated_deltanet", "gated_deltanet"]
    assert m.layer_kinds["linear"].attention == "gated_deltanet" and m.attention.output_gate
    assert (m.attention.linear.n_v_heads, m.attention.linear.v_head_dim, m.attention.linear.conv_kernel) == (4, 6, 3)
    assert m.layer_kinds["global"].rope.partial == 0.5 and m.norm.zero_centered and m.moe.shared_gate
    assert m.moe.router.renormalize == (kind == "qwen3_5_moe")
    _loss_parity(hf, ours)


def test_chunk_size_does_not_change_the_logits(tmp_path):
    """The imported model with chunks of 3 tokens (16 = 5 x 3 + 1) against HF's (64)."""
    from lit_modules.checkpoints.model_dir import load_model_dir

    hf = hf_model("qwen3_next", seed=2)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "moelab")
    _, ours = load_model_dir(tmp_path / "moelab")
    for block in ours.layers:
        if hasattr(block.attn, "chunk_size"):
            block.attn.chunk_size = 3
    ids = tokens()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL


def test_qwen3_5_multimodal_text_part(tmp_path):
    """Qwen3_5MoeForConditionalGeneration as released: model.language_model.* imported,
    model.visual.* skipped; logits of text input against the multimodal model's own."""
    hf = qwen3_5_multimodal()
    recipe, ours = import_and_load(hf, tmp_path)
    assert recipe.model.n_layers == 4
    _loss_parity(hf, ours)


# the MTP layer is built like the last layer, so these models end with a full-attention one
MTP_LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def with_mtp_layer(hf, seed: int = 5):
    """hf's state dict plus the MTP layer of a released checkpoint, built from transformers'
    own pieces (its decoder layer as layer n_layers - 1, full attention and MoE, and its
    zero-centred norms) and perturbed: (state, those pieces)."""
    cfg, d = hf.config, hf.config.hidden_size
    torch.manual_seed(seed)
    layer = type(hf.model.layers[-1])(cfg, cfg.num_hidden_layers - 1)
    norm_cls = type(hf.model.norm)
    pieces = torch.nn.ModuleDict(dict(layer=layer, fc=torch.nn.Linear(2 * d, d, bias=False),
                                      pre_fc_norm_embedding=norm_cls(d, eps=cfg.rms_norm_eps),
                                      pre_fc_norm_hidden=norm_cls(d, eps=cfg.rms_norm_eps),
                                      norm=norm_cls(d, eps=cfg.rms_norm_eps)))
    with torch.no_grad():
        for name, p in pieces.named_parameters():  # the experts start uninitialised
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    perturb(pieces, seed)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for name, t in pieces.state_dict().items():
        state["mtp." + name.replace("layer.", "layers.0.", 1)] = t.contiguous()
    return state, pieces.eval()


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_5_moe"])
def test_checkpoint_mtp_layer_matches_its_definition(kind, tmp_path):
    """A released checkpoint's MTP layer (mtp.fc, its norms, mtp.layers.0) imports as
    model.mtp (depth 1) and computes what vLLM's Qwen3-Next MTP does, written here with
    transformers' own layer: logits = head(norm(layer(fc([norm_e(embed(t_{i+1})) ;
    norm_h(h_i)])))), h the model's final-normed states; then exports back to the same
    tensors, and the exported directory still loads into transformers."""
    from transformers import AutoModelForCausalLM

    from lit_modules.checkpoints.hf import hf_to_ours, ours_to_hf
    from lit_modules.checkpoints.model_dir import load_model_dir

    hf = hf_model(kind, seed=4, layer_types=MTP_LAYERS)
    state, mtp = with_mtp_layer(hf)
    recipe, ours = import_and_load(hf, tmp_path, state)
    assert recipe.model.mtp.depth == 1 and ours.mtp[0].block.spec.moe

    ids = tokens()
    T = ids.shape[1]
    causal = torch.full((T - 1, T - 1), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL  # the next-token model is untouched
        h = hf.model(ids).last_hidden_state[:, :-1]
        emb = hf.model.embed_tokens(ids[:, 1:])
        x = mtp["fc"](torch.cat([mtp["pre_fc_norm_embedding"](emb), mtp["pre_fc_norm_hidden"](h)], dim=-1))
        pos = torch.arange(T - 1)[None]
        # Qwen3.5's rotary is multimodal: it takes (3, batch, T) positions (transformers
        # 5.17 only those; later versions expand (batch, T) themselves)
        rope_pos = pos[None].expand(3, -1, -1) if kind == "qwen3_5_moe" else pos
        x = mtp["layer"](x, position_embeddings=hf.model.rotary_emb(x, rope_pos), attention_mask=causal,
                         position_ids=pos)
        theirs = hf.lm_head(mtp["norm"](x))
        module = ours.mtp[0]
        mine = ours._logits(module(h, ours.embed_tokens(ids[:, 1:]), ours.ropes[module.block.spec.kind](T - 1, "cpu")))
        assert max_diff(mine, theirs) <= TOL

    # export: every MTP tensor back under the release's names (experts per expert, as
    # every layer's), then a directory transformers loads and moelab imports again
    arch = type(hf).__name__
    n, d_expert = recipe.model.n_layers, recipe.model.moe.d_expert
    for name, t in ours.state_dict().items():
        if name.startswith("mtp."):
            for hf_name, hf_t in ours_to_hf(arch, name, t, n):
                assert hf_name.startswith("mtp."), hf_name
                back = hf_to_ours(arch, hf_name, d_expert, n)
                assert back.ours == name, (hf_name, back)
                assert torch.equal(hf_t, state[hf_name] if hf_name in state else t[back.index]), hf_name
    export_hf(tmp_path / "moelab", tmp_path / "back")
    back, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True,
                                                         attn_implementation="eager")
    assert not any(loading[k] for k in ("missing_keys", "mismatched_keys", "error_msgs")), loading
    with torch.no_grad():
        assert max_diff(back.eval()(ids).logits, hf(ids).logits) <= 1e-6
    import_hf(tmp_path / "back", tmp_path / "again")
    again = dict(load_model_dir(tmp_path / "again")[1].state_dict())
    for name, t in ours.state_dict().items():
        assert torch.equal(again[name], t), name


def test_mtp_layers_moelab_cannot_hold_are_one_sentence(tmp_path):
    """Two MTP layers (one shared fc), or an MTP layer after a linear-attention last layer."""
    hf = hf_model("qwen3_next", seed=4, layer_types=MTP_LAYERS)
    state, _ = with_mtp_layer(hf)
    state["mtp.layers.1.input_layernorm.weight"] = torch.zeros(32)
    (tmp_path / "a").mkdir()
    with pytest.raises(ConvertError, match="mtp_num_hidden_layers"):
        import_and_load(hf, tmp_path / "a", state)
    hf = hf_model("qwen3_next", seed=4)  # its last layer is a linear-attention one
    state, _ = with_mtp_layer(hf)
    (tmp_path / "b").mkdir()
    with pytest.raises(ConvertError, match="full-attention"):
        import_and_load(hf, tmp_path / "b", state)


@pytest.mark.parametrize("kind, architecture", [("qwen3_next", None), ("qwen3_5_moe", "Qwen3_5MoeForCausalLM"),
                                                ("qwen3_5_moe", None)])
def test_round_trip_import_export_from_pretrained(kind, architecture, tmp_path):
    """import -> export -> transformers' from_pretrained: no missing or unexpected keys and
    identical logits; Qwen3-Next's fused in_proj_qkvz / in_proj_ba are rebuilt exactly."""
    from transformers import AutoModelForCausalLM

    hf = hf_model(kind, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "moelab")
    info = export_hf(tmp_path / "moelab", tmp_path / "back", architecture=architecture)
    assert info["architecture"] == (architecture or "Qwen3NextForCausalLM")
    back, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True,
                                                         attn_implementation="eager")
    assert type(back).__name__ == info["architecture"]
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), loading
    ids = tokens()
    with torch.no_grad():
        assert max_diff(back.eval()(ids).logits, hf(ids).logits) <= 1e-6
    if architecture is None and kind == "qwen3_next":
        original = dict(hf.named_parameters())
        for name, p in back.named_parameters():
            if "in_proj_qkvz" in name or "in_proj_ba" in name:
                assert torch.equal(p, original[name]), name


def test_export_refuses_what_qwen3_5_cannot_hold(tmp_path):
    """A dense layer (mlp_only_layers) has no place in Qwen3.5-MoE: one sentence naming it."""
    hf = hf_model("qwen3_next", seed=3)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "moelab")
    with pytest.raises(ConvertError, match="layer 2 MoE"):
        export_hf(tmp_path / "moelab", tmp_path / "back", architecture="Qwen3_5MoeForCausalLM")


def test_unhonourable_config_is_one_sentence(tmp_path):
    hf = hf_model("qwen3_next", hidden_act="gelu")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConvertError, match="hidden_act"):
        import_hf(tmp_path / "hf", tmp_path / "moelab")


def test_cli_eval_generate_and_export(tmp_path, capsys):
    """`moelab eval` of a Qwen3.5 HF directory scores transformers' own perplexity; `moelab
    generate` of the imported model decodes transformers' greedy tokens; export-hf
    --architecture writes Qwen3.5's class or names the classes it can write."""
    import json

    from _eval_text import eval_json, tiny_bpe, transformers_perplexity
    from lit_modules.cli import main

    text = open(__file__, encoding="utf-8").read()[:1500]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tok = tiny_bpe(text, VOCAB, tmp_path / "tokenizer.json")
    hf = hf_model("qwen3_5_moe", vocab_size=tok.get_vocab_size())
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    want, n = transformers_perplexity(hf, tmp_path / "tokenizer.json", text, 20)
    got = eval_json(tmp_path / "hf", tmp_path / "text.txt", 20)
    assert got["tokens_predicted"] == n and abs(got["perplexity"] / want - 1) < 1e-5

    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "m")]) == 0
    capsys.readouterr()
    # greedy decoding through the recurrent-state cache picks transformers' argmax tokens
    assert main(["generate", str(tmp_path / "m"), "--prompt", "def test", "--max-new-tokens", "3",
                 "--temperature", "0", "--device", "cpu"]) == 0
    prompt = torch.tensor([tok.encode("def test").ids])
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=3, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert tok.decode(want) in capsys.readouterr().out
    assert main(["export-hf", str(tmp_path / "m"), str(tmp_path / "q35"), "--architecture",
                 "Qwen3_5MoeForCausalLM"]) == 0
    assert json.loads((tmp_path / "q35" / "config.json").read_text())["architectures"] == ["Qwen3_5MoeForCausalLM"]
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "m"), str(tmp_path / "x"), "--architecture", "Qwen3ForCausalLM"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Qwen3NextForCausalLM or Qwen3_5MoeForCausalLM, not Qwen3ForCausalLM" in err
