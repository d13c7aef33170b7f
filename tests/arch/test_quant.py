"""Weight quantization (arch/quant.py): each format against a plain loop reference, the
straight-through gradient, QAT on linear layers and on the stacked experts of every
backend, excluded modules untouched, start_step, compile, and PTQ through `moelab eval`."""
from __future__ import annotations

import copy

import pytest
import torch

from arch.quant import (FORMATS, FakeQuantLinear, apply_fake_quant, fake_quant, qdq_fp8, qdq_int4,
                        qdq_int4_b32, quantize_weights_, read_weight, weight_bytes)
from arch.registry import EXPERT_BACKEND, RecipeError
from conftest import tiny_model, tiny_recipe


# ------------------------------------------------------------------ reference math


def ref_int4(w, block=None):
    """Row by row (block by block), in Python floats: scale = max |w| / 7, round half
    to even as torch does, clamp to +-7."""
    out = torch.empty_like(w)
    rows, cols = w.reshape(-1, w.shape[-1]), out.view(-1, w.shape[-1])
    step = block or w.shape[-1]
    for r in range(rows.shape[0]):
        for c0 in range(0, rows.shape[1], step):
            seg = rows[r, c0:c0 + step].tolist()
            s = max(abs(v) for v in seg) / 7
            for j, v in enumerate(seg):
                q = 0 if s == 0 else max(-7, min(7, round(v / s)))
                cols[r, c0 + j] = q * s
    return out


def ref_fp8(w):
    """Per row: scale = max |w| / 448, then the nearest e4m3 value found by searching
    the format's 127 non-negative codes (ties to the even code, as IEEE rounding does),
    without torch's float8 cast."""
    codes = torch.arange(127, dtype=torch.uint8)  # 0x7f is NaN in e4m3fn
    grid = codes.view(torch.float8_e4m3fn).double()
    out = torch.empty_like(w)
    for r, row in enumerate(w.reshape(-1, w.shape[-1])):
        s = float(row.abs().max()) / 448
        for j, v in enumerate(row.tolist()):
            if s == 0:
                out.view(-1, w.shape[-1])[r, j] = 0.0
                continue
            x = abs(v / s)
            d = (grid - x).abs()
            best = [i for i in range(127) if d[i] == d.min()]
            code = best[0] if len(best) == 1 else [i for i in best if i % 2 == 0][0]
            out.view(-1, w.shape[-1])[r, j] = (1 if v >= 0 else -1) * float(grid[code]) * s
    return out


@pytest.mark.parametrize("shape", [(6, 64), (2, 5, 96)])
def test_formats_match_plain_reference(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3
    w[..., 0, :] = 0  # an all-zero channel stays zero, not NaN
    torch.testing.assert_close(qdq_int4(w), ref_int4(w), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(qdq_int4_b32(w), ref_int4(w, 32), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(qdq_fp8(w), ref_fp8(w), rtol=1e-6, atol=1e-7)
    # a format's grid: int4 keeps at most 15 values per channel, int4_b32 per block
    assert max(len(row.unique()) for row in qdq_int4(w).reshape(-1, shape[-1])) <= 15
    # idempotent: quantized weights are on the grid already
    for f in (qdq_int4, qdq_int4_b32, qdq_fp8):
        torch.testing.assert_close(f(f(w)), f(w))
    # bf16 in, bf16 out
    assert qdq_int4(w.bfloat16()).dtype == torch.bfloat16


def test_straight_through_gradient():
    torch.manual_seed(0)
    for fmt in FORMATS:
        w = torch.randn(4, 64, requires_grad=True)
        c = torch.randn(4, 64)
        y = fake_quant(w, fmt)
        assert not torch.equal(y, w)
        (y * c).sum().backward()
        torch.testing.assert_close(w.grad, c, rtol=0, atol=0)


def test_int4_b32_refuses_widths_not_divisible():
    model = tiny_model("qwen3_moe", "model.moe.d_expert=40")  # w_out has 40 inputs
    with pytest.raises(RecipeError, match="divisible by 32.*ffn.w_out"):
        apply_fake_quant(model, "int4_b32")
    with pytest.raises(RecipeError, match="not a quantization format"):
        apply_fake_quant(model, "int3")
    with pytest.raises(RecipeError, match="train.qat.include"):
        apply_fake_quant(model, "int4", ["embedding"])


def test_train_refuses_bad_qat_before_any_work():
    from lit_modules.train.run import check_train

    ok = ["train.seq_len=64"]
    check_train(tiny_recipe("qwen3_moe", *ok, "train.qat.format=int4_b32", "train.qat.include=[router,head]"))
    for extra, match in ((["train.qat.format=int3"], "train.qat.format = 'int3' is not a quantization format"),
                         (["train.qat.include=[routers]"], "train.qat.include has 'routers'"),
                         (["train.qat.format=int4_b32", "model.moe.d_expert=40"], "ffn.w_out has 40 inputs")):
        with pytest.raises(RecipeError, match=match):
            check_train(tiny_recipe("qwen3_moe", *ok, *extra))


# ------------------------------------------------------------------ the model


def _recording(name):
    seen = []
    inner = EXPERT_BACKEND.get(name, "backend")

    def backend(x, counts, w_in, w_out, *a, **k):
        seen.append((w_in.detach().clone(), w_out.detach().clone()))
        return inner(x, counts, w_in, w_out, *a, **k)

    return backend, seen


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_qat_quantizes_linear_and_expert_weights(backend, fmt):
    model = tiny_model("qwen3_moe", f"model.moe.backend={backend}")
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 12))
    before = model(ids).logits
    apply_fake_quant(model, fmt)
    moe = model.layers[0].ffn
    moe.backend, seen = _recording(backend)
    got = model(ids).logits
    # the backend received the quantized stacked weights
    torch.testing.assert_close(seen[0][0], fake_quant(moe.w_in, fmt).detach(), rtol=0, atol=0)
    torch.testing.assert_close(seen[0][1], fake_quant(moe.w_out, fmt).detach(), rtol=0, atol=0)
    assert isinstance(model.layers[0].attn.q_proj, FakeQuantLinear)
    # QAT's forward is the forward of the PTQ model (the same layers, the same arithmetic)
    quantize_weights_(ref, fmt)
    torch.testing.assert_close(got, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-4)
    # the parameters and the state dict are those of the plain model
    assert list(model.state_dict()) == list(ref.state_dict())


def test_excluded_modules_untouched_unless_listed():
    model = tiny_model("qwen3_moe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_weights_(model, "int4")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    kept = {"embed.weight", "head.weight", "norm.weight"}
    assert not changed & kept and not any(".router." in k or "norm" in k for k in changed)
    assert {"layers.0.attn.q_proj.weight", "layers.0.attn.o_proj.weight", "layers.1.ffn.w_in",
            "layers.1.ffn.w_out"} <= changed
    # listed kinds are quantized too
    model = tiny_model("qwen3_moe")
    q = apply_fake_quant(model, "int4", ["router", "head"])
    gate = model.layers[0].ffn.router.gate
    assert read_weight(gate) is not gate.weight and read_weight(model.head) is not model.head.weight
    assert read_weight(model.embed) is model.embed.weight
    # tied embeddings: "head" is the embedding
    tied = tiny_model("qwen3")
    apply_fake_quant(tied, "fp8", ["head"])
    assert read_weight(tied.embed) is not tied.embed.weight
    q.active = False
    assert read_weight(gate) is gate.weight


def test_start_step_and_parallelize():
    from arch.config import QATConfig, TrainConfig
    from lit_modules.train.strategy import parallelize, set_qat_step

    train = TrainConfig(qat=QATConfig(format="int4", start_step=3))
    model = tiny_model("qwen3_moe")
    plain = model(torch.arange(10)[None]).logits
    parallelize(model, train)
    assert model.fake_quantizer.active is False
    torch.testing.assert_close(model(torch.arange(10)[None]).logits, plain, rtol=0, atol=0)
    for step, on in ((0, False), (2, False), (3, True), (7, True)):
        set_qat_step(model, train, step)
        assert model.fake_quantizer.active is on
    assert not torch.allclose(model(torch.arange(10)[None]).logits, plain, atol=1e-4)


def test_training_step_honours_start_step(tmp_path):
    """CausalLM turns fake quantization on at train.qat.start_step updates done."""
    from lit_modules.train.module import CausalLM

    class LM(CausalLM):  # the step counter a Trainer would keep
        step_done = 0
        global_step = property(lambda self: self.step_done)

    recipe = tiny_recipe("qwen3_moe", "train.qat.format=fp8", "train.qat.start_step=3",
                         "train.micro_batch_size=2", "train.seq_len=16", "train.log_every=1000", "train.max_steps=1000")
    lm = LM(recipe)
    lm.configure_model()
    states = []

    class Stub:  # the few optimizer / scheduler calls training_step makes
        def toggle_model(self, sync_grad=True):
            import contextlib
            return contextlib.nullcontext()

        def step(self):
            states.append(lm.model.fake_quantizer.active)

        def zero_grad(self, set_to_none=True):
            pass

    class Sched:
        def step(self):
            pass

        def get_last_lr(self):
            return [0.0]

    stub = Stub()
    lm.optimizers = lambda *a, **k: stub
    lm.lr_schedulers = lambda: Sched()
    lm.manual_backward = lambda loss: loss.backward()
    lm.log = lambda *a, **k: None
    for step in range(1, 5):  # (step 0 would log, which needs a Trainer)
        lm.step_done = step
        lm.training_step(torch.randint(0, 256, (2, 17)), step)
    assert states == [False, False, True, True]


def test_fake_quant_under_compile():
    """Dynamo traces the transform into the block's graph: compiled == eager, values and
    gradients, and flipping `active` recompiles rather than reusing a stale graph."""
    torch.manual_seed(0)
    # loop: compiled grouped_mm takes bf16 only (tests/experts/test_compiled_training.py)
    model = tiny_model("qwen3_moe", "model.moe.backend=loop").train()
    q = apply_fake_quant(model, "int4_b32")
    ids = torch.randint(0, 256, (2, 12))
    eager = copy.deepcopy(model)
    for block in model.layers:
        block.compile(backend="aot_eager")
    for active in (True, False, True):
        q.active = active
        eager.fake_quantizer.active = active
        a, b = model(ids, targets=ids), eager(ids, targets=ids)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    ga = dict(model.named_parameters())["layers.0.ffn.w_in"].grad
    gb = dict(eager.named_parameters())["layers.0.ffn.w_in"].grad
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ eval --quantize


def test_eval_quantize_on_a_saved_model(tmp_path):
    from _eval_text import eval_json, tiny_bpe
    from lit_modules.checkpoints.model_dir import save_model_dir
    from lit_modules.cli import main

    text = open(__file__, encoding="utf-8").read()[:3000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tok = tiny_bpe(text, 200, tmp_path / "tokenizer.json")
    recipe = tiny_recipe("qwen3_moe")
    model = tiny_model("qwen3_moe")
    save_model_dir(model, recipe, tmp_path / "m", tmp_path / "tokenizer.json")

    def run(*extra):
        return eval_json(tmp_path / "m", tmp_path / "text.txt", 32, *extra)

    from lit_modules.commands.eval_cmd import window_loss

    ids = tok.encode(text).ids
    plain = run()
    assert plain["quantize"] is None
    for fmt in FORMATS:
        got = run("--quantize", fmt)
        ref = copy.deepcopy(model)
        quantize_weights_(ref, fmt)
        want = window_loss(ref, ids, 32, 4, torch.device("cpu"))["loss"]
        assert got["quantize"] == fmt and abs(got["loss"] - want) < 1e-5 and got["loss"] != plain["loss"]
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "text.txt"), "--quantize", "int2"]) == 2


def test_weight_bytes_by_hand():
    assert weight_bytes((64, 128), "bf16") == 64 * 128 * 2
    assert weight_bytes((64, 128), "int4") == 64 * 128 // 2 + 2 * 64
    assert weight_bytes((64, 128), "int4_b32") == 64 * 128 // 2 + 2 * 64 * 4
    assert weight_bytes((8, 64, 128), "fp8") == 8 * 64 * 128 + 2 * 8 * 64


def test_memory_table_by_hand():
    """`moelab inspect`'s memory table for the tiny Qwen3-MoE and Gemma 3 configs,
    computed here from their dimensions."""
    import experts  # noqa: F401

    from arch.accounting import memory_table

    def matrix(rows, cols, fmt):  # rows x cols weights, bf16 scales
        return {"bf16": 2 * rows * cols, "int4": rows * cols // 2 + 2 * rows,
                "int4_b32": rows * cols // 2 + 2 * rows * -(-cols // 32), "fp8": rows * cols + 2 * rows}[fmt]

    # qwen3_moe: d 64, 4 heads x 16 (1 kv head), vocab 256, 2 layers of 8 experts x 32, untied head
    cfg = tiny_recipe("qwen3_moe").model
    table = memory_table(cfg, context=100)
    for fmt in ("bf16", "int4", "int4_b32", "fp8"):
        layer = (matrix(64, 64, fmt) + 2 * matrix(16, 64, fmt) + matrix(64, 64, fmt)  # q, k, v, o
                 + matrix(8, 64, fmt)  # router
                 + 8 * (matrix(64, 64, fmt) + matrix(64, 32, fmt)))  # experts: [gate; up], down
        norms = 2 * (2 * 64 + 2 * 16) + 64  # block norms, q/k norms, final norm: bf16
        weights = 2 * layer + 2 * matrix(256, 64, fmt) + 2 * norms
        kv = 2 * (2 * 1 * 16 * 2) * 100  # layers x (k, v) x kv heads x head_dim x bf16 x tokens
        assert table[fmt] == {"weights": weights, "with_kv": weights + kv, "with_kv_all_global": weights + kv}
    from arch import count

    for name in ("qwen3_moe", "qwen3", "gemma3"):  # bf16: 2 bytes x every parameter
        cfg = tiny_recipe(name).model
        assert memory_table(cfg, 10)["bf16"]["weights"] == 2 * count(cfg).params_total
    # gemma3 (7 layers: 6 local with window 8, 1 global; 2 kv heads x 16): windows honoured or not
    t = memory_table(tiny_recipe("gemma3").model, context=100)["bf16"]
    per_token_layer = 2 * 2 * 16 * 2
    assert t["with_kv"] - t["weights"] == per_token_layer * (6 * 8 + 100)
    assert t["with_kv_all_global"] - t["weights"] == per_token_layer * 7 * 100
