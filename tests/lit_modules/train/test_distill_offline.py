"""train.distill.mode = offline: the cached targets give the online loss and gradients,
the cache covers every rank's batches in the data module's order (resume included), is
written atomically, and every mismatch is one sentence."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from arch import RecipeError, load_recipe
from arch.distill import _cap, cached_distill_loss, fused_distill_loss, sparse_target
from lit_modules.train.distill_cache import build_cache, check_cache, CachedTeacher
from lit_modules.train.run import check_train, train

from conftest import RECIPE, overrides
from test_train_distill import _teacher_dir


def _problem(seed=0, N=24, D=16, V=40, cap_t=None):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, D, generator=g, requires_grad=True)
    w_s = torch.randn(V, D, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(N, 12, generator=g) * 2, torch.randn(V, 12, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    return h_s, w_s, h_t, w_t, y


def _targets(h_t, w_t, y, kind, k, tau, seed, cap_t=None, dtype=torch.float32):
    """What the cache builder stores, from the same teacher logits."""
    z = _cap((h_t @ w_t.T).float(), cap_t)
    gen = torch.Generator().manual_seed(seed)
    ids, w = sparse_target(z, kind, k, tau, gen)
    if kind != "sampled_counts":
        w = w / w.sum(-1, keepdim=True)
    nll = torch.logsumexp(z, -1) - z.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    return ids.to(torch.int32), w.to(dtype), nll


def _grads(out, h_s, w_s):
    gh, gw = torch.autograd.grad(out["loss"], (h_s, w_s))
    return out["loss"].detach(), out["teacher_ce"], gh, gw


@pytest.mark.parametrize("kind", ["topk", "sampled", "sampled_counts"])
def test_cached_targets_give_the_online_loss_and_gradients(kind):
    """Same draws (one seed, one chunk), float32 slots: equal to rounding; the cache's
    float16 probabilities: within float16's precision (counts are exact integers)."""
    h_s, w_s, h_t, w_t, y = _problem()
    tau, alpha, k = 1.5, 0.6, 8
    online = _grads(fused_distill_loss(h_s, w_s, h_t, w_t, y, kind, k, tau, alpha, softcap_s=5.0, softcap_t=3.0,
                                       chunk=64, generator=torch.Generator().manual_seed(7)), h_s, w_s)
    ids, w, nll = _targets(h_t, w_t, y, kind, k, tau, 7, cap_t=3.0)
    offline = _grads(cached_distill_loss(h_s, w_s, ids, w, nll, y, tau, alpha, softcap_s=5.0, chunk=5), h_s, w_s)
    for a, b in zip(online, offline):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ids, w16, nll = _targets(h_t, w_t, y, kind, k, tau, 7, cap_t=3.0, dtype=torch.float16)
    stored = _grads(cached_distill_loss(h_s, w_s, ids, w16, nll, y, tau, alpha, softcap_s=5.0, chunk=5), h_s, w_s)
    tol = dict(rtol=0, atol=0) if kind == "sampled_counts" else dict(rtol=2e-3, atol=2e-4)
    for a, b in zip(offline, stored):
        torch.testing.assert_close(a, b, **tol)
    # a target from other draws is another loss: the comparison above can fail
    if kind != "topk":
        ids2, w2, _ = _targets(h_t, w_t, y, kind, k, tau, 8, cap_t=3.0)
        other = cached_distill_loss(h_s, w_s, ids2, w2, nll, y, tau, alpha, softcap_s=5.0)["loss"]
        assert (other - offline[0]).abs() > 1e-4


def test_sparse_slots_are_compact_and_distinct():
    z = torch.randn(6, 30) * 3
    ids, counts = sparse_target(z, "sampled_counts", 16, 1.0, torch.Generator().manual_seed(0))
    assert ids.shape == counts.shape == (6, 16) and (counts.sum(-1) == 16).all()
    for i, c in zip(ids, counts):
        kept = i[c > 0]
        assert len(set(kept.tolist())) == len(kept)  # each drawn id once, with its count
        assert (c[len(kept):] == 0).all()


def _kd(cache, runs, teacher, *extra):
    return overrides(cache, runs, "train.max_steps=4", "train.grad_accum=2", "train.micro_batch_size=2",
                     "train.val_every=0", "train.ckpt_every=2", "train.keep_checkpoints=0", "train.log_every=1",
                     f"train.distill.teacher={teacher}", "train.distill.k=16", "train.distill.kind=topk", *extra)


@pytest.fixture(scope="module")
def offline_setup(cache, tmp_path_factory):
    from lit_modules.data.datamodule import TokenDataModule

    tmp = tmp_path_factory.mktemp("offline")
    runs = tmp / "runs"
    dm = TokenDataModule(load_recipe(RECIPE, overrides(cache, runs)), verbose=False)
    teacher = _teacher_dir(tmp / "teacher", dm.tokenizer_path)
    ov = _kd(cache, runs, teacher, "train.distill.mode=offline")
    folder = build_cache(load_recipe(RECIPE, ov), world=1, device="cpu", verbose=False)
    return tmp, runs, teacher, ov, folder


def test_the_cache_holds_every_step_in_the_data_order(offline_setup, cache):
    """Rows of step s are the windows the data module hands out at step s, for each
    rank of two (rows r::2 of a step built for two ranks)."""
    from lit_modules.data.datamodule import TokenDataModule

    tmp, runs, teacher, ov, _ = offline_setup
    folder = build_cache(load_recipe(RECIPE, ov + [f"train.distill.cache={tmp / 'two'}"]), world=2, device="cpu",
                         verbose=False)
    meta = json.loads((folder / "meta.json").read_text())
    tokens, ids = np.load(folder / meta["files"]["tokens"]), np.load(folder / meta["files"]["ids"], mmap_mode="r")
    T = load_recipe(RECIPE, ov).train.seq_len
    assert tokens.shape == (4, 8, T + 1) and ids.shape == (4, 8, T, 16) and ids.dtype == np.int32
    assert np.load(folder / meta["files"]["weights"], mmap_mode="r").dtype == np.float16
    for rank in (0, 1):
        dm = TokenDataModule(load_recipe(RECIPE, ov), verbose=False, rank=rank, world_size=2)
        for s, batch in zip(range(4), dm.train_dataloader()):
            assert np.array_equal(tokens[s, rank::2], batch.numpy()), (rank, s)
    assert not list(tmp.glob("two.tmp-*"))


def test_offline_training_matches_online_and_resumes(offline_setup, cache):
    """topk (no draws): the offline run logs the online run's losses at every step
    (float16 targets); resumed at step 2 from its checkpoint, it reads rows 3 and 4
    and ends on the uninterrupted run's loss, bit for bit."""
    from test_train import scalars

    tmp, runs, teacher, ov, folder = offline_setup
    off = train(RECIPE, ov + ["train.run_name=off"])
    on = train(RECIPE, _kd(cache, runs, teacher, "train.run_name=on"))

    def losses(s, tag="train/loss"):
        return [e.value for e in scalars(Path(s["run_dir"])).Scalars(tag)]

    assert len(losses(off)) == 4
    np.testing.assert_allclose(losses(off), losses(on), rtol=2e-4)
    # 1e-5 on a CPU; on a GPU machine the teacher's CE differs by ~1.3e-5 (its logits' own rounding)
    np.testing.assert_allclose(losses(off, "train/teacher_ce_loss"), losses(on, "train/teacher_ce_loss"), rtol=1e-4)
    resumed = train(RECIPE, ov + ["train.run_name=resumed",
                                  f"train.resume={Path(off['run_dir']) / 'checkpoints' / 'step00000002.ckpt'}"])
    assert resumed["steps"] == 4 and resumed["train_loss"] == off["train_loss"]


def test_a_batch_from_another_step_is_refused(offline_setup):
    tmp, runs, teacher, ov, folder = offline_setup
    cfg = load_recipe(RECIPE, ov).train.distill
    t = CachedTeacher(folder, cfg, None, 0, 1, 4, torch.device("cpu"))
    batch = torch.from_numpy(np.load(folder / "tokens.npy")[1].astype(np.int64))
    with pytest.raises(RecipeError, match="tokens of step 1 differ from the batch"):
        t.begin_step(0, batch)
    t.begin_step(1, batch)  # the right step
    with pytest.raises(RecipeError, match=r"holds 4 windows a step, this run takes 8 \(4 a rank x 2 rank"):
        CachedTeacher(folder, cfg, None, 0, 2, 4, torch.device("cpu"))


def test_refusals_are_one_sentence(offline_setup, cache, tmp_path):
    from lit_modules.data.datamodule import TokenDataModule

    _, runs, teacher, ov, folder = offline_setup
    for extra, words in [(["train.distill.kind=full"], "kind = full cannot be cached offline"),
                         (["train.stages=[{steps: 2}, {steps: 2, seq_len: 64}]"], "does not support train.stages")]:
        with pytest.raises(RecipeError, match=words):
            check_train(load_recipe(RECIPE, ov + extra))
    recipe = load_recipe(RECIPE, ov + ["train.distill.k=8"])
    dm = TokenDataModule(recipe, verbose=False)
    with pytest.raises(RecipeError, match="no complete teacher cache at .*distill-.* build it first with moelab "
                                          "distill-cache"):
        check_cache(recipe, dm)
    recipe = load_recipe(RECIPE, ov + ["train.distill.k=8", f"train.distill.cache={folder}"])
    with pytest.raises(RecipeError, match=r"was made for another teacher, data or settings \(settings.k: 16 cached, "
                                          r"8 wanted\)"):
        check_cache(recipe, dm)
    with pytest.raises(RecipeError, match="no complete teacher cache"):  # stops before the run directory
        train(RECIPE, ov + ["train.distill.temperature=2.0", "train.run_name=nocache"])
    assert not (runs / "nocache").exists()
    # an index naming a file outside its folder
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"]["ids"] = "../ids.npy"
    (bad / "meta.json").write_text(json.dumps(meta))
    cfg = load_recipe(RECIPE, ov).train.distill
    with pytest.raises(RecipeError, match="names the file '../ids.npy', outside its folder"):
        CachedTeacher(bad, cfg, None, 0, 1, 4, torch.device("cpu"))


def test_a_killed_build_leaves_no_cache(offline_setup, cache, monkeypatch):
    """A build that dies midway leaves neither the folder nor its temporary copy; a
    folder without meta.json is no cache."""
    import lit_modules.train.distill_cache as dc

    tmp, runs, teacher, ov, _ = offline_setup
    target = tmp / "killed"
    recipe = load_recipe(RECIPE, ov + [f"train.distill.cache={target}"])

    def dies(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dc, "_write", dies)
    with pytest.raises(KeyboardInterrupt):
        build_cache(recipe, device="cpu", verbose=False)
    assert not target.exists() and not list(tmp.glob("killed.tmp-*"))
    target.mkdir()
    (target / "ids.npy").write_bytes(b"")
    from lit_modules.data.datamodule import TokenDataModule

    with pytest.raises(RecipeError, match="no complete teacher cache"):
        check_cache(recipe, TokenDataModule(recipe, verbose=False))


def test_the_command(offline_setup, capsys):
    """`moelab distill-cache` finds the cache built for the same overrides; without
    mode=offline it says so in one line."""
    from lit_modules.cli import main

    _, _, _, ov, folder = offline_setup
    assert main(["distill-cache", RECIPE, *ov, "--world", "1", "--device", "cpu"]) == 0
    assert f"distill-cache: cached, {folder}" in capsys.readouterr().out
    assert main(["distill-cache", RECIPE, *[o for o in ov if "mode=" not in o]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab distill-cache: error: moelab distill-cache needs") and "\n" not in err


def test_topk_past_the_vocabulary_pads_empty_slots(offline_setup):
    """k larger than the vocabulary: every id once, the rest empty (weight 0)."""
    tmp, _, _, ov, _ = offline_setup
    k = load_recipe(RECIPE, ov).model.vocab_size + 8
    folder = build_cache(load_recipe(RECIPE, ov + [f"train.distill.k={k}", "train.max_steps=1",
                                                   f"train.distill.cache={tmp / 'wide'}"]), device="cpu",
                         verbose=False)
    w = np.load(folder / "weights.npy")
    assert w.shape[-1] == k and (w[..., -8:] == 0).all()
    np.testing.assert_allclose(w.astype(np.float32).sum(-1), 1.0, atol=2e-3)


@pytest.mark.slow
def test_ddp_offline_matches_one_process(tmp_path):
    """One cache of 8 windows a step serves one process (1 x 8) and two gloo ranks
    (2 micro-batches of 2 each, rows r::2): the same losses at every step."""
    from lit_modules.data.datamodule import TokenDataModule

    from test_scale import ONE, TINY, TWO, losses, run

    cache = tmp_path / "cache"
    dm = TokenDataModule(load_recipe(RECIPE, TINY + [f"data.cache_dir={cache}"]), verbose=False)
    teacher = _teacher_dir(tmp_path / "teacher", dm.tokenizer_path)
    kd = [f"train.distill.teacher={teacher}", "train.distill.kind=sampled_counts", "train.distill.k=32",
          "train.distill.mode=offline", "train.distill.chunk=50"]
    build_cache(load_recipe(RECIPE, TINY + ONE + kd + [f"data.cache_dir={cache}", "train.max_steps=3"]),
                device="cpu", verbose=False)
    one = losses(run(tmp_path, "one", 3, *ONE, *kd))
    ddp = losses(run(tmp_path, "ddp", 3, *TWO, "train.strategy=ddp", *kd))
    assert sorted(one) == sorted(ddp) == [1, 2, 3]
    for step in (1, 2, 3):
        assert ddp[step] == pytest.approx(one[step], abs=1e-5), (step, ddp, one)
