"""Parity with transformers (the oracle): tiny random HF models keeping every quirk are
saved, imported with `moelab import-hf`'s converter, and compared in float32 on CPU.
Logits must agree to 1e-4; the MoE families' pooled auxiliary loss must equal HF's."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _hf_tiny import gemma3_multimodal, hf_model, import_and_load, max_diff, tokens  # noqa: E402


TOL = 1e-4

CASES = {
    # head_dim 12 != 32 / 4, GQA 4:2, untied head, attention biases
    "qwen3-untied-bias": ("qwen3", dict(tie_word_embeddings=False, attention_bias=True)),
    # tied head; layers >= 1 slide with a window of 5 < 16 tokens; linear RoPE x2
    "qwen3-tied-window": ("qwen3", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
                                        max_window_layers=1,
                                        rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0})),
    # renormalised top-k, untied, layer 1 dense (mlp_only_layers)
    "qwen3_moe-norm-untied": ("qwen3_moe", dict(norm_topk_prob=True, tie_word_embeddings=False, mlp_only_layers=[1])),
    # raw softmax weights, tied, MoE on every 2nd layer (decoder_sparse_step)
    "qwen3_moe-raw-tied": ("qwen3_moe", dict(norm_topk_prob=False, tie_word_embeddings=True, num_hidden_layers=4,
                                             decoder_sparse_step=2)),
    # YaRN x4 from a context of 8 < 16 tokens, so interpolated, ramped and kept
    # frequencies and the attention factor all show in the logits
    "qwen3-yarn": ("qwen3", dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 8.0})),
    # YaRN on the global layers only, without truncating the ramp (as gpt-oss)
    "gemma3-yarn-global": ("gemma3", dict(tie_word_embeddings=True, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0,
                           "original_max_position_embeddings": 8, "beta_fast": 16.0, "beta_slow": 1.0}})),
    # top-2 renormalised, untied; every layer slides with a window of 5 < 16 tokens
    "mixtral-window-untied": ("mixtral", dict(tie_word_embeddings=False, sliding_window=5)),
    # tied head, RoPE base 1e6, no window
    "mixtral-tied": ("mixtral", dict(tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # raw softmax top-k weights (norm_topk_prob false, as released), QK-norm over the whole
    # projections, attention biases, untied
    "olmoe-raw-bias": ("olmoe", dict(norm_topk_prob=False, attention_bias=True, tie_word_embeddings=False)),
    # renormalised top-k, tied, MHA
    "olmoe-norm-tied": ("olmoe", dict(norm_topk_prob=True, tie_word_embeddings=True, num_key_value_heads=4)),
    # MLA, group-limited sigmoid routing with the correction bias, a shared expert, dense first layer
    "deepseek_v3-untied": ("deepseek_v3", dict(tie_word_embeddings=False)),
    # no query bottleneck, plain RoPE layout, 2 of 4 groups, raw weights, tied
    "deepseek_v3-tied-noqlora": ("deepseek_v3", dict(tie_word_embeddings=True, q_lora_rank=None, rope_interleave=False,
                                                     n_group=4, topk_group=2, norm_topk_prob=False)),
    # sinks, biased clamped-SwiGLU experts, router bias, top-k then softmax, YaRN, windows
    "gpt_oss-untied": ("gpt_oss", dict(tie_word_embeddings=False)),
    "gpt_oss-tied-mha": ("gpt_oss", dict(tie_word_embeddings=True, num_key_value_heads=4, num_experts_per_tok=3)),
    # 7 layers: 5 local (window 5), 1 global (linear RoPE x8), 1 local; qpas 20 != head_dim 24 != 64 / 4; tied
    "gemma3-tied": ("gemma3", dict(tie_word_embeddings=True)),
    # untied head, final soft-capping, 8 layers, another local RoPE base. (Attention
    # soft-capping is refused: transformers' Gemma 3 does not apply it; test_convert.py)
    "gemma3-untied-softcap": ("gemma3", dict(tie_word_embeddings=False, num_hidden_layers=8,
                                             final_logit_softcapping=3.0,
                                             rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                                    "rope_theta": 100.0},
                                                              "full_attention": {"rope_type": "default",
                                                                                 "rope_theta": 1e6}})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    hf = hf_model(kind, **overrides)
    recipe, ours = import_and_load(hf, tmp_path)
    ids = tokens()
    with torch.no_grad():
        diff = max_diff(ours(ids).logits, hf(ids).logits)
    assert diff <= TOL, f"{case}: max |logit diff| = {diff:.3g}"
    # the quirk under test really is in the imported recipe
    specs_windows = {k.window for k in recipe.model.layer_kinds.values()}
    if kind == "gemma3":
        assert recipe.model.attention.query_pre_attn_scalar == 20 != recipe.model.attention.head_dim
        assert specs_windows == {None, 5} and recipe.model.layer_pattern[:6] == ["local"] * 5 + ["global"]
    if "yarn" in case:
        assert {k.rope.scaling for k in recipe.model.layer_kinds.values()} >= {"yarn"}
    if kind == "deepseek_v3":
        assert recipe.model.attention.kind == "mla" and recipe.model.moe.router.n_group > 1
        assert recipe.model.moe.first_k_dense == 1
    elif kind == "olmoe":  # QK-norm over all heads needs head_dim = d_model / heads
        assert recipe.model.attention.qk_norm_scope == "all_heads"
        assert recipe.model.moe.router.renormalize == overrides["norm_topk_prob"]
    else:
        assert recipe.model.attention.head_dim * recipe.model.attention.n_heads != recipe.model.d_model
    if kind == "mixtral":
        assert not recipe.model.attention.qk_norm and recipe.model.moe.router.renormalize
        used = {recipe.model.layer_kinds[k].window for k in recipe.model.layer_pattern}
        assert used == {overrides.get("sliding_window")}
    assert recipe.model.tie_embeddings == overrides["tie_word_embeddings"]


@pytest.mark.parametrize("kind, overrides", [
    ("qwen3_moe", dict(norm_topk_prob=True, mlp_only_layers=[1])),
    ("qwen3_moe", dict(norm_topk_prob=False, mlp_only_layers=[1])),
    ("mixtral", dict(sliding_window=5)),
    ("olmoe", dict(norm_topk_prob=False)),
    ("gpt_oss", dict()),
], ids=["qwen3_moe-norm", "qwen3_moe-raw", "mixtral", "olmoe", "gpt_oss"])
def test_pooled_aux_loss_matches_transformers(kind, overrides, tmp_path):
    hf = hf_model(kind, **overrides)
    recipe, ours = import_and_load(hf, tmp_path)
    b = recipe.model.moe.balance
    assert (b.aux_scope, b.aux_coef) == ("pooled", hf.config.router_aux_loss_coef)
    ids = tokens()
    labels = ids.clone()
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # HF shifts inside
    with torch.no_grad():
        theirs = hf(ids, labels=labels, output_router_logits=True)
        out = ours(ids, targets=targets)
    coef = hf.config.router_aux_loss_coef
    # HF returns the unweighted loss and adds coef * it to the LM loss
    assert torch.allclose(out.aux["aux_loss"], coef * theirs.aux_loss, rtol=1e-5, atol=1e-7)
    assert torch.allclose(out.loss + out.aux["aux_loss"], theirs.loss, rtol=1e-5, atol=1e-6)
    assert max_diff(out.logits, theirs.logits) <= TOL


def test_gemma3_multimodal_text_part(tmp_path):
    """Gemma3ForConditionalGeneration: text part only, vision tower ignored; tested on
    a tiny real one (SigLIP tower built offline) against its own text-only logits."""
    hf = gemma3_multimodal()
    recipe, ours = import_and_load(hf, tmp_path)
    ids = tokens()
    with torch.no_grad():
        diff = max_diff(ours(ids).logits, hf(input_ids=ids).logits)
    assert diff <= TOL
    assert recipe.model.tie_embeddings


def test_gemma3_multimodal_transformers5_names(tmp_path):
    """The same model stored with transformers 5's in-memory names
    (model.language_model.*, model.vision_tower.*), as a hand-made directory."""
    hf = gemma3_multimodal(seed=3)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert any(k.startswith("model.language_model.") for k in state)
    _, ours = import_and_load(hf, tmp_path, state)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(input_ids=ids).logits) <= TOL


def test_gpt_oss_mxfp4_experts_dequantize_exactly(tmp_path):
    """gpt-oss as released: expert weights in MXFP4 (uint8 blocks of packed FP4 pairs and
    power-of-two scales). import-hf dequantizes them to what transformers' own
    dequantization gives (the oracle), and the logits equal those of the transformers
    model holding those weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = hf_model("gpt_oss", intermediate_size=32)  # MXFP4 packs blocks of 32 along each input
    g = torch.Generator().manual_seed(3)
    state = {k: v for k, v in hf.state_dict().items()}
    with torch.no_grad():
        for i in range(hf.config.num_hidden_layers):
            for proj in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{proj}"
                E, rows_in, cols = state.pop(name).shape  # (E, in, out): MXFP4 packs along `in`
                blocks = torch.randint(0, 256, (E, cols, rows_in // 32, 16), generator=g, dtype=torch.uint8)
                scales = torch.randint(127 - 6, 127 - 1, (E, cols, rows_in // 32), generator=g, dtype=torch.uint8)
                state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
                getattr(hf.model.layers[i].mlp.experts, proj).copy_(
                    convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    hf.config.quantization_config = {"quant_method": "mxfp4"}
    _, ours = import_and_load(hf, tmp_path, state=state, dtype=torch.float32)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL
    w = ours.layers[0].ffn.w_in  # [gate; up] rows, from gate/up interleaved columns
    theirs = hf.model.layers[0].mlp.experts.gate_up_proj  # (E, D, 2F)
    assert torch.equal(w[:, :w.shape[1] // 2], theirs[..., 0::2].transpose(1, 2))


def test_deepseek_v3_mtp_matches_transformers(tmp_path):
    """DeepSeek-V3's MTP modules, stored as its release stores them (model.layers.{n+k}.*,
    with copies of the embedding and head), import into model.mtp and give the logits of
    transformers' MtpModel at every depth, then export back to the same tensors."""
    layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(getattr(layers, "MtpModel", None), "forward_layer"):
        pytest.skip("this transformers has no MtpModel.forward_layer (5.24 has; 5.17 does not)")
    from _hf_tiny import perturb

    from lit_modules.checkpoints.hf import ours_to_hf

    depth = 2
    hf = hf_model("deepseek_v3", tie_word_embeddings=False)
    torch.manual_seed(3)
    mtp = layers.MtpModel(hf, depth)
    with torch.no_grad():  # MtpModel leaves its stacked experts uninitialised
        for name, p in mtp.layers.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.1)
    perturb(mtp, seed=3)
    mtp.eval()
    n = hf.config.num_hidden_layers
    state = dict(hf.state_dict())
    own = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "post_norm.weight": "shared_head.norm.weight"}
    for name, t in mtp.state_dict().items():
        if not name.startswith("layers."):
            continue
        _, k, rest = name.split(".", 2)
        rest = own.get(rest) or rest[len("mtp_block."):]
        state[f"model.layers.{n + int(k)}.{rest}"] = t
    for k in range(depth):  # the release's copies of the shared tensors
        state[f"model.layers.{n + k}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
        state[f"model.layers.{n + k}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    recipe, ours = import_and_load(hf, tmp_path, state=state)
    assert recipe.model.mtp.depth == depth

    ids = tokens()
    T = ids.shape[1]
    with torch.no_grad():
        h = ours.norm(_ours_body(ours, ids))
        theirs_h = hf.model(ids).last_hidden_state
        assert max_diff(h, theirs_h) <= TOL
        pos = torch.arange(T).unsqueeze(0).expand(ids.shape[0], -1)
        for k, module in enumerate(ours.mtp, start=1):
            n_k = T - k
            kind = module.block.spec.kind
            h = module(h[:, :n_k], ours.embed_tokens(ids[:, k:]), ours.ropes[kind](n_k, ids.device))
            theirs_h = mtp.forward_layer(k - 1, theirs_h[:, :n_k], pos[:, k:], None, input_ids=ids[:, k:])
            diff = max_diff(ours._logits(h), mtp._project_to_logits(theirs_h))
            assert diff <= TOL, f"depth {k}: max |logit diff| = {diff:.3g}"
    # export: each MTP tensor goes back to its layer after the model's, under the
    # release's names (the experts in the per-expert hub layout, as for every layer)
    from lit_modules.checkpoints.hf import hf_to_ours

    d_expert = recipe.model.moe.d_expert
    for name, t in ours.state_dict().items():
        if not name.startswith("mtp."):
            continue
        k = int(name.split(".")[1])
        for hf_name, hf_t in ours_to_hf("DeepseekV3ForCausalLM", name, t, n):
            assert hf_name.startswith(f"model.layers.{n + k}."), hf_name
            back = hf_to_ours("DeepseekV3ForCausalLM", hf_name, d_expert, n)
            assert back.ours == name, (hf_name, back)
            if hf_name in state:
                assert torch.equal(hf_t, state[hf_name]), hf_name
            else:  # one expert's slice of a stacked tensor
                assert torch.equal(hf_t, t[back.index]), hf_name


def _ours_body(model, ids):
    x = model.embed_tokens(ids)
    T = ids.shape[1]
    for block in model.layers:
        x = block(x, model.ropes[block.spec.kind](T, ids.device))
    return x
