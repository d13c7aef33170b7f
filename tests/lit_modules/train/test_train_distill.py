"""train.distill around the loss: the recipe's checks, the teacher's tokenizer check,
the student's forward with the teacher's head loss, and `moelab train` with a teacher
(grad accumulation, an MoE student's balancing losses, TensorBoard, checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arch import RecipeError, build_model, load_recipe
from arch.config import DistillConfig
from arch.distill import plain_distill_loss
from lit_modules.checkpoints.model_dir import save_model_dir
from lit_modules.data.tokenizer import save_atomic, train_bpe
from lit_modules.train.distill import Teacher, check_teacher
from lit_modules.train.run import check_train, train

from conftest import RECIPE, overrides, tiny_model

TEACHER = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.attention.n_heads=2",
           "model.attention.n_kv_heads=1", "model.attention.head_dim=16", "model.ffn.d_ff=64",
           "model.max_seq_len=128"]


def _teacher_dir(path: Path, tokenizer_path) -> Path:
    recipe = load_recipe("proxies/dense_tiny", TEACHER)
    torch.manual_seed(1)
    save_model_dir(build_model(recipe.model, device="cpu"), recipe, path, tokenizer_path=tokenizer_path)
    return path


def _bpe(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.json"
    save_atomic(train_bpe([text] * 3, 300), path)
    return path


@pytest.mark.parametrize("override, words", [
    ("train.distill.kind=sample", "not a distillation kind (did you mean 'sampled'?)"),
    ("train.distill.mode=offline train.distill.kind=full", "kind = full cannot be cached offline"),
    ("train.distill.mode=later", "not a mode"),
])
def test_bad_kind_or_mode_is_one_sentence(override, words):
    recipe = load_recipe(RECIPE, ["train.distill.teacher=somewhere", *override.split()])
    with pytest.raises(RecipeError, match=words.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        check_train(recipe)


@pytest.mark.parametrize("override", ["train.distill.alpha=1.5", "train.distill.temperature=0",
                                      "train.distill.k=0"])
def test_numbers_out_of_range(override):
    with pytest.raises(RecipeError, match=override.split("=")[0]):
        load_recipe(RECIPE, [override])


def test_tokenizer_mismatch_is_refused(tmp_path):
    ours = _bpe(tmp_path, "ours", "def add(a, b):\n    return a + b\n" * 50)
    theirs = _bpe(tmp_path, "theirs", "the quick brown fox jumps over the lazy dog\n" * 50)
    from tokenizers import Tokenizer

    recipe = load_recipe(RECIPE, [f"train.distill.teacher={_teacher_dir(tmp_path / 't', theirs)}",
                                  "train.seq_len=64"])
    with pytest.raises(RecipeError, match="uses another tokenizer than the student .*differing; .*data.tokenizer="):
        check_teacher(recipe, Tokenizer.from_file(str(ours)))
    check_teacher(recipe, Tokenizer.from_file(str(theirs)))  # the same one passes
    # the same tokens and size, two ids swapped: refused too (the ids are compared, not the size)
    spec = json.loads(theirs.read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100], list(vocab)[110]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(spec))
    n = Tokenizer.from_file(str(theirs)).get_vocab_size(with_added_tokens=True)
    with pytest.raises(RecipeError, match=rf"\({n} vs {n} tokens, 2 differing; the student's token"):
        check_teacher(recipe, Tokenizer.from_file(str(swapped)))
    recipe.train.distill.teacher = str(_teacher_dir(tmp_path / "bare", None))
    with pytest.raises(RecipeError, match="has no tokenizer.json beside it"):
        check_teacher(recipe, Tokenizer.from_file(str(ours)))
    recipe.train.distill.teacher = str(tmp_path / "missing")
    with pytest.raises(RecipeError, match="no such file or directory"):
        check_teacher(recipe, Tokenizer.from_file(str(ours)))
    recipe.train.distill.teacher = str(tmp_path)  # a folder that is no checkpoint
    with pytest.raises(RecipeError, match=r"^train.distill.teacher = .*: .* is not a moelab checkpoint"):
        check_teacher(recipe, Tokenizer.from_file(str(ours)))
    (tmp_path / "t" / "tokenizer.json").write_text("{not json")
    recipe.train.distill.teacher = str(tmp_path / "t")
    with pytest.raises(RecipeError, match="its tokenizer .* cannot be read"):
        check_teacher(recipe, Tokenizer.from_file(str(ours)))


@pytest.mark.parametrize("kind", ["topk", "full"])
def test_student_forward_with_the_teacher_head_loss(kind):
    """An MoE student's forward with the teacher's head loss: the plain loss on both
    models' full logits, the same gradients for every student parameter, none for
    the teacher, and the student's balancing losses still there."""
    student = tiny_model("qwen3_moe", "model.moe.balance.aux_coef=0.01").train()
    teacher = Teacher(tiny_model("qwen3", "model.d_model=32", "model.attention.head_dim=8", seed=2),
                      DistillConfig(teacher="x", kind=kind, k=7, temperature=2.0, alpha=0.4, chunk=9), None, 256)
    teacher.model.requires_grad_(False)
    x, y = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    head = teacher.head_loss(x, y)
    out = student(x, return_logits=False, head_loss=head)
    assert out.aux and set(head.parts) == {"ce_loss", "distill_loss", "teacher_ce_loss"}
    params = [p for p in student.parameters()]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)

    ref_out = student(x, return_logits=False, return_hidden=True)
    h_t = teacher.model(x, return_hidden=True, return_logits=False).hidden
    ref = plain_distill_loss(ref_out.hidden.flatten(0, 1), student.head_weight(), h_t.flatten(0, 1),
                             teacher.model.head_weight(), y.flatten(), kind, k=7, temperature=2.0, alpha=0.4)
    torch.testing.assert_close(out.loss, ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.parts["ce_loss"], ref["ce"], rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad(ref["loss"], params, allow_unused=True)
    for a, b in zip(got, want):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.model.parameters())


@torch.no_grad()
def test_the_teacher_sees_the_students_documents():
    """train.document_mask: the teacher's hidden states come from the same document
    masks and positions as the student's forward."""
    from arch.documents import document_ids, document_positions

    teacher = Teacher(tiny_model("qwen3", "model.d_model=32", "model.attention.head_dim=8", seed=2),
                      DistillConfig(teacher="x", kind="full"), None, 256)
    x, y = torch.randint(4, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    x[:, 4] = 3
    doc = document_ids(x, 3)
    docs = {"doc_ids": doc, "positions": document_positions(doc)}
    want = teacher.model(x, return_hidden=True, return_logits=False, **docs).hidden.flatten(0, 1)
    torch.testing.assert_close(teacher.head_loss(x, y, docs).h_t, want, rtol=0, atol=0)
    assert (teacher.head_loss(x, y).h_t - want).abs().max() > 1e-3


def test_train_with_a_teacher(cache, tmp_path):
    """Three steps of two micro-batches each, distilled from a saved teacher with the
    corpus's tokenizer: the parts are logged apart, the MoE student's balancing losses
    too, and the checkpoint holds the student alone. A teacher with another tokenizer
    stops the run before its directory exists."""
    from lit_modules.data.datamodule import TokenDataModule

    from test_train import scalars

    runs = tmp_path / "runs"
    dm = TokenDataModule(load_recipe(RECIPE, overrides(cache, runs)), verbose=False)
    teacher = _teacher_dir(tmp_path / "teacher", dm.tokenizer_path)
    summary = train(RECIPE, overrides(cache, runs, "train.run_name=kd", "train.max_steps=3", "train.grad_accum=2",
                                      "train.micro_batch_size=2", "train.val_every=3", "train.ckpt_every=0",
                                      f"train.distill.teacher={teacher}", "train.distill.k=16"))
    tags = set(scalars(Path(summary["run_dir"])).Tags()["scalars"])
    assert {"train/loss", "train/ce_loss", "train/distill_loss", "train/teacher_ce_loss", "val/loss"} <= tags
    assert any(t.startswith("train/") and "aux" in t for t in tags), tags
    ckpt = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])

    other = _teacher_dir(tmp_path / "other", _bpe(tmp_path, "other", "lorem ipsum dolor sit amet\n" * 40))
    with pytest.raises(RecipeError, match="uses another tokenizer than the student"):
        train(RECIPE, overrides(cache, runs, "train.run_name=bad", f"train.distill.teacher={other}"))
    assert not (runs / "bad").exists()


def test_qat_distilled_from_its_own_starting_weights(cache, tmp_path):
    """Gemma 3's QAT recipe: the run starts from a model's weights (train.init_from) and
    distils from the same model, unquantized, while its own forward is fake-quantized.
    Without QAT the student is its teacher at step 1: the same next-token loss, and a
    `full` distillation loss of the teacher's entropy alone (KL 0). With QAT the teacher
    stays the float model: the student's quantized forward differs from it, so the KL
    term, and the distillation loss, grow."""
    from lit_modules.data.datamodule import TokenDataModule

    from test_train import scalars

    runs = tmp_path / "runs"
    recipe = load_recipe(RECIPE, overrides(cache, runs))
    dm = TokenDataModule(recipe, verbose=False)
    torch.manual_seed(3)
    model = build_model(recipe.model, device="cpu")
    with torch.no_grad():  # larger weights than an initialisation's: peaked outputs, which int4 visibly moves
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    start = tmp_path / "start"
    save_model_dir(model, recipe, start, tokenizer_path=dm.tokenizer_path)

    def step1(name, *extra):
        # float32 on the CPU, where the student equals its teacher exactly; on a GPU the run
        # would train in bf16-mixed beside a bf16 teacher, 5e-4 apart at step 1
        summary = train(RECIPE, overrides(cache, runs, f"train.run_name={name}", "train.max_steps=1",
                                          "train.accelerator=cpu", "train.precision=32-true",
                                          "train.val_every=0", "train.ckpt_every=-1", f"train.init_from={start}",
                                          f"train.distill.teacher={start}", "train.distill.kind=full",
                                          "train.distill.alpha=1.0", *extra))
        acc = scalars(Path(summary["run_dir"]))
        return {k: acc.Scalars(f"train/{k}")[0].value for k in ("ce_loss", "teacher_ce_loss", "distill_loss")}

    plain = step1("plain")
    assert plain["ce_loss"] == pytest.approx(plain["teacher_ce_loss"], abs=1e-5)
    qat = step1("qat", "train.qat.format=int4", "train.qat.start_step=0")
    assert qat["teacher_ce_loss"] == pytest.approx(plain["teacher_ce_loss"], abs=1e-6)  # the teacher is not quantized
    assert abs(qat["ce_loss"] - qat["teacher_ce_loss"]) > 1e-4
    assert qat["distill_loss"] > plain["distill_loss"] + 1e-3, (qat, plain)


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process(tmp_path):
    """The same global batch of 8 sequences, distilled (topk: no sampling, so every
    split draws nothing): one process (1 x 8) and two gloo ranks x 2 micro-batches x 2,
    under DDP and FSDP2, give the same losses; the MoE student's global-batch balancing
    loss is part of them."""
    from lit_modules.data.datamodule import TokenDataModule

    from test_scale import ONE, TINY, TWO, losses, run

    cache = tmp_path / "cache"
    dm = TokenDataModule(load_recipe(RECIPE, TINY + [f"data.cache_dir={cache}"]), verbose=False)
    teacher = _teacher_dir(tmp_path / "teacher", dm.tokenizer_path)
    kd = [f"train.distill.teacher={teacher}", "train.distill.kind=topk", "train.distill.k=32",
          "train.distill.temperature=2.0", "train.distill.chunk=50"]
    one = losses(run(tmp_path, "one", 3, *ONE, *kd))
    ddp_dir = run(tmp_path, "ddp", 3, *TWO, "train.strategy=ddp", *kd)
    ddp = losses(ddp_dir)
    fsdp = losses(run(tmp_path, "fsdp", 3, *TWO, "train.strategy=fsdp", *kd))
    assert sorted(one) == sorted(ddp) == sorted(fsdp) == [1, 2, 3]
    for step in (1, 2, 3):
        assert ddp[step] == pytest.approx(one[step], abs=1e-5), (step, ddp, one)
        assert fsdp[step] == pytest.approx(one[step], abs=1e-5), (step, fsdp, one)
    assert len({round(v, 4) for v in one.values()}) > 1
    from test_train import scalars

    assert "train/distill_loss" in scalars(ddp_dir).Tags()["scalars"]


def test_hugging_face_teacher(tmp_path):
    """A Hugging Face directory serves as a teacher as it is: its tokenizer is checked,
    and the model loaded from it computes the moelab teacher's hidden states."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from lit_modules.checkpoints.hf import export_hf

    tok = _bpe(tmp_path, "tok", "def add(a, b):\n    return a + b\n" * 50)
    ours = _teacher_dir(tmp_path / "ours", tok)
    export_hf(ours, tmp_path / "hf")
    recipe = load_recipe(RECIPE, [f"train.distill.teacher={tmp_path / 'hf'}", "train.seq_len=64"])
    check_teacher(recipe, Tokenizer.from_file(str(tok)))
    teacher = Teacher.load(recipe.train.distill, torch.device("cpu"), None, 512)
    from lit_modules.checkpoints.model_dir import load_model

    reference = load_model(ours)[1]
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        want = reference(x, return_logits=False, return_hidden=True).hidden
    torch.testing.assert_close(teacher.head_loss(x, x).h_t, want.flatten(0, 1))
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
