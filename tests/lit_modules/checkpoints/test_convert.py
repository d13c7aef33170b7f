"""import-hf / export-hf: round trips, both expert layouts, sharded streaming, and the
one-sentence refusals for whatever cannot be converted exactly."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from _hf_tiny import config, hf_model, import_and_load, max_diff, tokens  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lit_modules.checkpoints.model_dir import load_model_dir, save_model_dir  # noqa: E402
from lit_modules.checkpoints.hf import export_hf, import_hf, parse_size  # noqa: E402
from lit_modules.checkpoints.hf_config import ConvertError, hf_config_for  # noqa: E402

ROUND_TRIP = {
    "qwen3": ("qwen3", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=2)),
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True, mlp_only_layers=[0])),
    "gemma3": ("gemma3", dict(tie_word_embeddings=False, final_logit_softcapping=5.0)),
    "qwen3-yarn": ("qwen3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                  "original_max_position_embeddings": 16, "beta_fast": 16.0,
                                                  "truncate": False})),
    # the hub's Mixtral names (block_sparse_moe, w1 / w3 / w2) both ways
    "mixtral": ("mixtral", dict(sliding_window=5)),
    "olmoe": ("olmoe", dict(norm_topk_prob=False, attention_bias=True)),
    # MLA, the correction bias and the shared expert both ways
    "deepseek_v3": ("deepseek_v3", dict()),
    # gpt-oss's fused, interleaved expert layout both ways
    "gpt_oss": ("gpt_oss", dict()),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP))
def test_round_trip_import_export_from_pretrained(case, tmp_path):
    """import -> export -> transformers' from_pretrained (no custom code): no missing or
    unexpected keys, the same config where it matters, and identical logits."""
    from transformers import AutoModelForCausalLM

    kind, overrides = ROUND_TRIP[case]
    hf = hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "moelab")
    info = export_hf(tmp_path / "moelab", tmp_path / "back")
    assert info["architecture"] == type(hf).__name__
    back, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True,
                                                         attn_implementation="eager")
    assert type(back) is type(hf)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), loading
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, hf(ids).logits)
    for field in ("head_dim", "tie_word_embeddings", "sliding_window", "layer_types", "rope_parameters",
                  "norm_topk_prob", "mlp_only_layers", "query_pre_attn_scalar", "final_logit_softcapping"):
        if hasattr(hf.config, field):
            assert getattr(back.config, field) == getattr(hf.config, field), field


def test_export_of_a_moelab_trained_model(tmp_path, tiny_name):
    """A model made in moelab (the tiny reference recipes) exports and transformers
    computes the same logits from it."""
    from conftest import tiny_model, tiny_recipe
    from transformers import AutoModelForCausalLM

    recipe, model = tiny_recipe(tiny_name), tiny_model(tiny_name)
    save_model_dir(model, recipe, tmp_path / "m")
    export_hf(tmp_path / "m", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, recipe.model.vocab_size, (2, 20))
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) <= 1e-4


def test_fused_expert_layout_imports(tmp_path):
    """transformers 5's fused gate_up_proj / down_proj tensors (as held in memory) import
    like the hub's per-expert ones."""
    hf = hf_model("qwen3_moe", norm_topk_prob=True)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    _, ours = import_and_load(hf, tmp_path, state)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= 1e-4


def test_streaming_import_holds_a_fraction_of_the_model(tmp_path):
    """Sharded input and output: tensors go to disk as they are read, so the converter
    holds at most the expert tensors of the layer being stacked, far below the model."""
    hf = hf_model("qwen3_moe", num_hidden_layers=8, norm_topk_prob=True)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 3
    total = sum(p.numel() * p.element_size() for p in hf.parameters())
    info = import_hf(tmp_path / "hf", tmp_path / "m", max_shard_bytes=24_000)
    assert len(info["files"]) > 3 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    layer_experts = sum(p.numel() * p.element_size() for n, p in hf.named_parameters()
                        if n.startswith("model.layers.0.mlp.experts"))
    assert 0 < info["peak_pending_bytes"] <= layer_experts < total / 6
    _, ours = load_model_dir(tmp_path / "m")
    ids = tokens()
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= 1e-4


def test_dtype_is_kept_or_cast(tmp_path):
    hf = hf_model("qwen3").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "keep")
    import_hf(tmp_path / "hf", tmp_path / "f32", dtype=torch.float32)
    with safe_open(str(tmp_path / "keep" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("embed.weight").dtype == torch.bfloat16
    with safe_open(str(tmp_path / "f32" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("embed.weight").dtype == torch.float32


# ------------------------------------------------------------------ refusals


def _write_config(tmp_path, cfg, arch=None):
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    cfg.save_pretrained(d)
    if arch:
        raw = json.loads((d / "config.json").read_text())
        raw["architectures"] = [arch]
        (d / "config.json").write_text(json.dumps(raw))
    return d


@pytest.mark.parametrize("kind, overrides, arch, needle", [
    ("qwen3", {}, "LlamaForCausalLM", "LlamaForCausalLM"),
    ("qwen3", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}), None,
     "rope_parameters.rope_type"),
    ("qwen3", dict(partial_rotary_factor=0.5), None, "partial_rotary_factor"),
    ("qwen3", dict(hidden_act="gelu"), None, "hidden_act"),
    ("qwen3", dict(attention_dropout=0.1), None, "attention_dropout"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4), None, "use_sliding_window"),
    ("mixtral", dict(router_jitter_noise=0.1), None, "router_jitter_noise"),
    ("olmoe", dict(clip_qkv=8.0), None, "clip_qkv"),
    ("gpt_oss", dict(swiglu_limit=5.0), None, "swiglu_limit"),
    ("gpt_oss", dict(quantization_config={"quant_method": "fp8"}), None, "quant_method"),
    ("deepseek_v3", dict(num_key_value_heads=2), None, "num_key_value_heads"),
    ("gemma3", dict(attn_logit_softcapping=50.0), None, "attn_logit_softcapping"),
    ("gemma3", dict(hidden_activation="gelu"), None, "hidden_activation"),
    ("gemma3", dict(use_bidirectional_attention=True), None, "use_bidirectional_attention"),
])
def test_unhonourable_config_is_one_sentence_naming_the_field(tmp_path, kind, overrides, arch, needle):
    d = _write_config(tmp_path, config(kind, **overrides), arch)
    with pytest.raises(ConvertError) as e:
        import_hf(d, tmp_path / "out")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_tensors_not_matching_config(tmp_path):
    hf = hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 5)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ConvertError) as e:
        import_hf(tmp_path / "hf", tmp_path / "out")
    msg = str(e.value)
    assert "layers.1.ffn.w_in" in msg and "q_proj" in msg and "(5, 5)" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


@pytest.mark.parametrize("name, extra, needle", [
    ("qwen3", ["model.attention.softcap=30"], "model.attention.softcap"),
    ("qwen3", ["model.ffn.kind=geglu"], "model.ffn.kind"),
    ("gemma3", ["model.attention.softcap=30"], "model.attention.softcap"),
    ("gemma3", ["model.layer_kinds.local.rope.theta=1000000"], "rope"),
    ("qwen3_moe", ["model.moe.n_shared_experts=1"], "model.moe.n_shared_experts"),
    ("qwen3_moe", ["model.moe.capacity_factor=1.25"], "model.moe.capacity_factor"),
    ("qwen3_moe", ["model.moe.router.kind=sigmoid_topk"], "model.moe.router.kind"),
    ("qwen3_moe", ["model.mtp.depth=1"], "model.mtp.depth"),
])
def test_export_refuses_what_transformers_cannot_express(name, extra, needle):
    from conftest import tiny_recipe

    recipe = tiny_recipe(name, *extra)
    if needle == "rope":  # Gemma 3 may differ per layer type only: make two local kinds disagree
        recipe.model.layer_pattern = ["local", "global", "local2"]
        recipe.model.layer_kinds["local2"] = type(recipe.model.layer_kinds["local"])(window=8)
    with pytest.raises(ConvertError) as e:
        hf_config_for(recipe.model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_gpt_oss_router_renormalize_changes_nothing_so_it_exports():
    """gpt-oss's router softmaxes its top-k logits, so its weights sum to 1 and
    renormalize=true computes what transformers' GptOss computes: the export is allowed
    (it was refused as a difference) and both give the same logits."""
    from arch import build_model, load_recipe
    from lit_modules.tools.bench import hf_twin

    recipe = load_recipe("proxies/gpt_oss_tiny", ["model.moe.router.renormalize=true", "model.moe.backend=loop",
                                                  "model.fused_ce_chunk=0", "model.fused_ce_compile=false"])
    torch.manual_seed(0)
    model = build_model(recipe.model, device="cpu").eval()
    twin, _ = hf_twin(model, recipe)
    ids = torch.randint(0, recipe.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin.eval()(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1GiB") == 1024**3
    assert parse_size("500kb") == 500_000 and parse_size("1234") == 1234 and parse_size(None) is None
    with pytest.raises(ConvertError):
        parse_size("lots")


# ------------------------------------------------------------------------ CLI


def moelab(*args):
    return subprocess.run([sys.executable, "-m", "lit_modules.cli", *args], capture_output=True, text=True)


def test_cli_import_then_export(tmp_path, capsys):
    hf_model("gemma3").save_pretrained(tmp_path / "hf")
    r = moelab("import-hf", str(tmp_path / "hf"), str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "Gemma3ForCausalLM" in r.stdout and (tmp_path / "m" / "recipe.yaml").is_file()
    r = moelab("export-hf", str(tmp_path / "m"), str(tmp_path / "back"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["dtype"] == "bfloat16"
    from lit_modules.cli import main

    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "m")]) == 2  # OUT_DIR exists
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "already exists" in err


def test_cli_convert_picks_the_direction(tmp_path):
    """`moelab convert` (DESIGN.md's name): an HF dir is imported, a moelab dir exported."""
    hf_model("qwen3").save_pretrained(tmp_path / "hf")
    r = moelab("convert", str(tmp_path / "hf"), str(tmp_path / "m"))
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr
    r = moelab("convert", str(tmp_path / "m"), str(tmp_path / "back"))
    assert r.returncode == 0 and "exported" in r.stdout, r.stderr
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def test_legacy_hub_config_fields(tmp_path):
    """config.json as the hub ships Gemma 3 (transformers 4 era): rope_theta,
    rope_local_base_freq, rope_scaling and sliding_window_pattern instead of
    rope_parameters / layer_types. transformers' reading of them is what we map."""
    from lit_modules.checkpoints.hf import recipe_from_hf

    raw = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 96, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 13, "num_attention_heads": 4, "num_key_value_heads": 1,
           "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 6, "sliding_window_pattern": 6,
           "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
           "attn_logit_softcapping": None}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    _, recipe, tied = recipe_from_hf(tmp_path / "hf")
    m = recipe.model
    assert tied and m.layer_pattern == ["local"] * 5 + ["global"]
    local, glob = m.layer_kinds["local"], m.layer_kinds["global"]
    assert (local.window, local.rope.theta, local.rope.scaling) == (6, 10_000.0, "none")
    assert (glob.window, glob.rope.theta, glob.rope.scaling, glob.rope.factor) == (None, 1e6, "linear", 8.0)


def test_export_from_a_training_run_directory(tmp_path):
    """export-hf takes a run directory (its checkpoints/last.ckpt) as written by training."""
    from conftest import tiny_model, tiny_recipe
    from transformers import AutoModelForCausalLM

    from arch import recipe_to_yaml

    recipe, model = tiny_recipe("qwen3_moe"), tiny_model("qwen3_moe")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "moelab_recipe": recipe_to_yaml(recipe)}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, recipe.model.vocab_size, (2, 12))
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) <= 1e-4


def test_deepseek_v3_mtp_round_trip(tmp_path):
    """A DeepSeek-V3 model with MTP modules exports them as the release stores them
    (layers after the model's; transformers' model skips them, its MtpModel reads them)
    and imports back to the same tensors and depth."""
    from transformers import AutoModelForCausalLM

    from arch import build_model, load_recipe
    from lit_modules.checkpoints.model_dir import load_model_dir

    recipe = load_recipe("proxies/deepseek_v3_tiny", ["model.mtp.depth=2"])
    torch.manual_seed(0)
    model = build_model(recipe.model, "cpu").float()
    save_model_dir(model, recipe, tmp_path / "m")
    export_hf(tmp_path / "m", tmp_path / "hf")
    n = recipe.model.n_layers
    hf, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                       output_loading_info=True)
    assert not loading["missing_keys"]
    assert {k.split(".")[2] for k in loading["unexpected_keys"]} <= {str(n), str(n + 1)}
    ids = torch.randint(0, recipe.model.vocab_size, (2, 12))
    with torch.no_grad():
        assert max_diff(model.eval()(ids).logits, hf.eval()(ids).logits) <= 1e-4
    import_hf(tmp_path / "hf", tmp_path / "back")
    back_recipe, back = load_model_dir(tmp_path / "back")
    assert back_recipe.model.mtp.depth == 2
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("mtp."))
