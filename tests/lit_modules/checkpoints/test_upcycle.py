"""`moelab upcycle`: a dense model -> MoE weights and recipe. The promise: with exact
copies (G = 1) or tied-router fine-grained parts (G > 1, top_k = G x m, router.scale
= G), the MoE model's logits equal the dense model's at initialisation."""
import pytest
import torch

from arch.resolve import layer_specs
from lit_modules.checkpoints.model_dir import load_model, save_model_dir
from lit_modules.checkpoints.upcycle import UpcycleError, UpcycleOptions, max_logit_difference, upcycle
from lit_modules.cli import main

from conftest import tiny_model, tiny_recipe

CASES = {  # name: (dense overrides, options)
    "copies": ((), UpcycleOptions(8, 2)),
    "fine_grained_g2": ((), UpcycleOptions(8, 4, granularity=2)),
    "fine_grained_gelu_bias_g4": (("model.ffn.kind=gelu", "model.ffn.bias=true"), UpcycleOptions(8, 4, granularity=4)),
}


def dense_dir(tmp_path, *extra):
    recipe = tiny_recipe("qwen3", "train.run_name=dense", "train.resume=auto", *extra)
    model = tiny_model("qwen3", *extra)
    if recipe.model.ffn.bias:  # zero-initialised biases would hide a wrong split
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(std=0.1)
    save_model_dir(model, recipe, tmp_path / "dense")
    return tmp_path / "dense", model


@pytest.mark.parametrize("case", list(CASES))
def test_upcycled_logits_equal_dense(tmp_path, case):
    extra, opts = CASES[case]
    src, dense = dense_dir(tmp_path, *extra)
    info = upcycle(src, tmp_path / "moe", opts, check=False)
    recipe, moe, _ = load_model(tmp_path / "moe")
    ids = torch.randint(0, recipe.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = dense.float()(ids).logits, moe.float()(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)

    # the recipe: the experts upcycling promised, the rest of the architecture unchanged
    G, m = opts.granularity, recipe.model.moe
    d_ff = dense.cfg.ffn.d_ff
    assert (m.n_experts, m.top_k, m.d_expert, m.router.scale) == (opts.n_experts, opts.top_k, d_ff // G, float(G))
    assert m.expert_ffn == dense.cfg.ffn.kind and m.expert_bias == dense.cfg.ffn.bias
    assert recipe.train.init_from == str((tmp_path / "moe").resolve())
    assert recipe.train.run_name is None and recipe.train.resume is None  # not the dense run's
    assert all(s.moe for s in layer_specs(recipe.model)) and info["moe_layers"] == recipe.model.n_layers
    assert recipe.model.attention == dense.cfg.attention and recipe.model.d_model == dense.cfg.d_model

    # the weights: attention and the rest copied; expert e = part e % G of the dense FFN
    dense_state, moe_state = dense.state_dict(), moe.state_dict()
    for k, v in dense_state.items():
        if ".ffn." not in k:
            assert torch.equal(moe_state[k], v), k
    F_ = d_ff // G
    for i, layer in enumerate(dense.layers):
        ffn, experts = layer.ffn, moe.layers[i].ffn
        for e in range(opts.n_experts):
            rows = slice((e % G) * F_, (e % G + 1) * F_)
            ins = [ffn.gate_proj.weight[rows], ffn.up_proj.weight[rows]] if hasattr(ffn, "gate_proj") \
                else [ffn.up_proj.weight[rows]]
            assert torch.equal(experts.w_in[e], torch.cat(ins))
            assert torch.equal(experts.w_out[e], ffn.down_proj.weight[:, rows])
            if experts.b_out is not None:
                torch.testing.assert_close(experts.b_out[e] * G, ffn.down_proj.bias)
        # router rows: random (distinct replicas), tied across a replica's G parts
        w = experts.router.gate.weight
        assert torch.equal(w, w[::G].repeat_interleave(G, 0))
        assert len({tuple(r.tolist()) for r in w}) == opts.n_experts // G
        assert 0.5 * recipe.model.init_std < w.std() < 2 * recipe.model.init_std
        # and the tokens spread over the experts from the start
        r = experts.router(torch.randn(256, recipe.model.d_model))
        assert r.ids_TK.unique().numel() == opts.n_experts


def test_noise_and_reinit_make_experts_differ(tmp_path):
    src, dense = dense_dir(tmp_path)
    info = upcycle(src, tmp_path / "noisy", UpcycleOptions(4, 2, noise=0.1, seed=3))
    assert info["max_logit_diff"] > 1e-3  # the equality test above would catch this
    upcycle(src, tmp_path / "drop", UpcycleOptions(4, 2, reinit_fraction=0.25, seed=3), check=False)
    _, moe, _ = load_model(tmp_path / "drop")
    ffn, experts = dense.layers[0].ffn, moe.layers[0].ffn
    d_ff = ffn.up_proj.weight.shape[0]
    changed = []
    for e in range(4):
        gate_rows = (experts.w_in[e, :d_ff] != ffn.gate_proj.weight).any(1)
        down_cols = (experts.w_out[e] != ffn.down_proj.weight).any(0)
        assert torch.equal(gate_rows, down_cols)  # whole hidden units redrawn
        assert int(gate_rows.sum()) == round(0.25 * d_ff)
        changed.append(gate_rows)
    assert not all(torch.equal(changed[0], c) for c in changed[1:])  # each expert its own units


def test_check_reports_equality(tmp_path):
    src, _ = dense_dir(tmp_path)
    info = upcycle(src, tmp_path / "moe", UpcycleOptions(4, 2))
    assert info["max_logit_diff"] < 2e-5
    assert info["params_total"] > info["dense_params"]


@pytest.mark.parametrize("args,expected", [
    (["--experts", "6", "--top-k", "2", "--granularity", "4"], "not a multiple of --granularity"),
    (["--experts", "8", "--top-k", "3", "--granularity", "2"], "--top-k 3 is not a multiple"),
    (["--experts", "4", "--top-k", "8"], "exceeds --experts"),
    (["--experts", "4", "--top-k", "2", "--reinit-fraction", "1.5"], "between 0 and 1"),
    (["--experts", "4", "--top-k", "2", "model.moe.d_expert=64"], "derives itself"),
    (["--experts", "4", "--top-k", "2", "model.d_model=128"], "would change the dense architecture"),
    (["--experts", "4", "--top-k", "2", "model.moe.router.renormalize=false"], "renormalize=true"),
    (["--experts", "4", "--top-k", "2", "--granularity", "3"], "not divisible by --granularity"),
])
def test_bad_requests_one_sentence(tmp_path, capsys, args, expected):
    src, _ = dense_dir(tmp_path)
    if "--granularity" in args and args[args.index("--granularity") + 1] == "3":
        args[1] = "6"
        args[3] = "3"
    assert main(["upcycle", str(src), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_moe_source_refused(tmp_path, capsys):
    recipe = tiny_recipe("qwen3_moe")
    save_model_dir(tiny_model("qwen3_moe"), recipe, tmp_path / "moe")
    assert main(["upcycle", str(tmp_path / "moe"), str(tmp_path / "out"), "--experts", "4", "--top-k", "2"]) == 2
    assert "already has MoE layers" in capsys.readouterr().err


def test_cli_prints_the_check(tmp_path, capsys):
    src, _ = dense_dir(tmp_path)
    assert main(["upcycle", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "4",
                 "--granularity", "2"]) == 0
    out = capsys.readouterr().out
    assert "max |logit difference|" in out and "equal to the dense model's" in out
    assert (tmp_path / "out" / "recipe.yaml").is_file()


def test_existing_output_refused_before_reading(tmp_path, capsys, monkeypatch):
    src, _ = dense_dir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    import lit_modules.checkpoints.upcycle as up

    monkeypatch.setattr(up, "load_model", lambda *a, **k: pytest.fail("weights read before the checks"))
    assert main(["upcycle", str(src), str(tmp_path / "out"), "--experts", "4", "--top-k", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_bfloat16_source_keeps_its_dtype(tmp_path):
    """Weights stay in the source's dtype; the balancing-bias buffer stays float32, as
    a freshly built model has it."""
    recipe = tiny_recipe("qwen3")
    save_model_dir(tiny_model("qwen3").to(torch.bfloat16), recipe, tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", UpcycleOptions(4, 2), check=False)
    _, moe, _ = load_model(tmp_path / "moe")
    layer = moe.layers[0].ffn
    assert layer.w_in.dtype == layer.router.gate.weight.dtype == moe.embed.weight.dtype == torch.bfloat16
    assert layer.router.expert_bias.dtype == torch.float32
