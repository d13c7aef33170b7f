"""`moelab analyze`: the routing numbers against independent counts on hand-made
routings, the capture hooks against the routers' own outputs, and the command end to
end on a tiny trained run (JSON contents, PNGs, the run's training history)."""
from __future__ import annotations

import io
import itertools
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_modules.tools import routing_analysis as ra

from conftest import RECIPE, overrides, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ hand-made routings

IDS = np.array([[0, 1], [1, 2], [0, 1], [3, 0], [2, 1], [1, 0]])  # 6 tokens, top-2 of 4 experts


def test_coselection_counts_pairs_within_a_token():
    want = np.zeros((4, 4), dtype=int)
    for row in IDS.tolist():
        for i in row:
            want[i, i] += 1
        for i, j in itertools.permutations(row, 2):
            want[i, j] += 1
    got = ra.coselection(IDS, 4)
    assert got.tolist() == want.tolist()
    assert got[0, 1] == 3 and got[1, 2] == 2 and got[0, 3] == 1 and got[2, 3] == 0
    lift = ra.coselection_lift(got, len(IDS))
    assert lift[0, 1] == pytest.approx(3 * 6 / (4 * 5))  # C N / (load_0 load_1)
    assert math.isnan(lift[0, 0]) and lift[2, 3] == 0


def test_transitions_and_nmi():
    b = np.array([[2, 3], [0, 3], [2, 3], [1, 0], [0, 1], [0, 3]])
    want = np.zeros((4, 4), dtype=int)
    for ra_, rb in zip(IDS.tolist(), b.tolist()):
        for i in ra_:
            for j in rb:
                want[i, j] += 1
    got = ra.transitions(IDS, b, 4, 4)
    assert got.tolist() == want.tolist() and got.sum() == 6 * 2 * 2

    x = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    assert ra.nmi(x, (x + 1) % 4, 4, 4) == pytest.approx(1.0)  # a relabelling: one determines the other
    grid = np.array(list(itertools.product(range(3), range(4))))  # every pair once: independent
    assert ra.nmi(grid[:, 0], grid[:, 1], 3, 4) == pytest.approx(0.0, abs=1e-12)
    # an uneven joint, against the definition written out
    y = np.array([0, 1, 1, 1, 2, 0, 2, 3])
    joint = np.zeros((4, 4))
    for i, j in zip(x, y):
        joint[i, j] += 1 / len(x)
    px, py = joint.sum(1), joint.sum(0)
    mi = sum(joint[i, j] * math.log(joint[i, j] / (px[i] * py[j])) for i in range(4) for j in range(4) if joint[i, j])
    hx, hy = -sum(p * math.log(p) for p in px if p), -sum(p * math.log(p) for p in py if p)
    assert ra.nmi(x, y, 4, 4) == pytest.approx(mi / math.sqrt(hx * hy))


def test_top_tokens_rank_by_lift_not_frequency():
    """Token 5 is everywhere and spread over experts; token 9 (rarer) always goes to
    expert 2; token 4 goes to expert 2 only once in 10. Expert 2 lists 9 first with
    lift 1 / P(expert 2); token 3, seen twice, is below min_count."""
    rows, toks = [], []
    for n in range(40):
        rows.append([n % 4, (n + 1) % 4])
        toks.append(5)
    for n in range(10):
        rows.append([2, 0])
        toks.append(9)
    for n in range(10):
        rows.append([2 if n == 0 else 1, 3])
        toks.append(4)
    rows += [[2, 1], [2, 1]]
    toks += [3, 3]
    ids, tokens = np.array(rows), np.array(toks)
    top = ra.top_tokens(ids, tokens, 4, n=3, min_count=5, decode=lambda i: f"t{i}")
    p2 = (ids == 2).any(1).mean()
    assert [t["id"] for t in top[2]] == [9, 5, 4]
    assert top[2][0] == {"token": "t9", "id": 9, "count": 10, "token_count": 10, "share": 1.0,
                         "lift": pytest.approx(1 / p2)}
    assert top[2][1]["count"] == 20 and top[2][1]["share"] == 0.5  # token 5: half its positions
    assert all(t["id"] != 3 for row in top for t in row)


def test_analyze_routing_json():
    b = np.array([[2, 3], [0, 3], [2, 3], [1, 0], [0, 1], [0, 3]])
    tokens = np.array([1, 2, 1, 2, 1, 2])
    out = ra.analyze_routing({0: IDS, 3: b}, {0: 4, 3: 4}, tokens, entropy_sum={0: 3.0, 3: 1.2},
                             probs_sum={0: np.ones(4) * 1.5, 3: np.ones(4) * 1.5}, dropped={0: 0, 3: 3},
                             min_count=1)
    json.dumps(out)  # plain types only
    l0, l3 = out["layers"]
    assert out["tokens"] == 6 and l0["layer"] == 0 and l3["layer"] == 3
    assert l0["tokens_per_expert"] == [4, 5, 2, 1]
    assert l0["load_max_over_mean"] == pytest.approx(5 / 3)
    assert l0["router_entropy"] == pytest.approx(0.5) and l3["dropped_fraction"] == pytest.approx(3 / 12)
    assert l0["load_entropy"] == pytest.approx(-sum(p * math.log(p) for p in np.array([4, 5, 2, 1]) / 12))
    assert l0["coselection"] == ra.coselection(IDS, 4).tolist()
    (adj,) = out["adjacent"]
    assert (adj["from"], adj["to"]) == (0, 3)
    assert adj["transitions"] == ra.transitions(IDS, b, 4, 4).tolist()
    assert adj["nmi_first_choice"] == pytest.approx(ra.nmi(IDS[:, 0], b[:, 0], 4, 4))


# ------------------------------------------------------------------ capture


def test_capture_sees_the_routers_choices_and_changes_nothing():
    from experts.layers import named_moe_layers

    model = tiny_model("qwen3_moe", "model.moe.capacity_factor=1.0")
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {}  # layer index -> the router's input, to route again independently
    handles = [layer.router.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].clone()))
               for i, (_, layer) in enumerate(named_moe_layers(model))]
    with torch.no_grad():
        plain = model(x).logits
    for h in handles:
        h.remove()
    cap, tokens = ra.run_batches(model, [x], "cpu")
    with torch.no_grad():
        again = model(x).logits
    assert torch.equal(plain, again)  # the hooks are gone and changed nothing
    assert tokens.tolist() == x.flatten().tolist()
    for i, (key, layer) in enumerate(cap.layers):
        with torch.no_grad():
            r = layer.router(inputs[i])
        assert np.array_equal(cap.ids[key][0], r.ids_TK.numpy())
        p = r.probs_TE
        assert cap.entropy_sum[key] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
        assert cap.dropped[key] == int(layer.stats["dropped_tokens"])
    assert sum(cap.dropped.values()) > 0  # capacity 1.0 drops some slots


# ------------------------------------------------------------------ the command on a run


@pytest.fixture(scope="session")
def tiny_run(cache, tmp_path_factory):
    """A 6-step run of the tiny MoE with a load record every 2 steps."""
    from lit_modules.train.run import train

    runs = tmp_path_factory.mktemp("analyze_runs")
    summary = train(RECIPE, overrides(cache, runs, "train.run_name=tiny", "train.max_steps=6",
                                      "train.micro_batch_size=4", "train.val_every=0", "train.ckpt_every=0",
                                      "train.expert_image_every=2"))
    return Path(summary["run_dir"])


def analyze(*argv):
    from lit_modules.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["analyze", *map(str, argv), "--device", "cpu"])
    return rc, out.getvalue()


def test_analyze_run_validation_batches(tiny_run, tmp_path):
    out_dir = tmp_path / "a"
    rc, text = analyze(tiny_run, "--batches", "2", "--out", out_dir)
    assert rc == 0, text
    res = json.loads((out_dir / "analysis.json").read_text())
    final, hist = res["final"], res["history"]
    assert res["batches"] == 2 and final["tokens"] == 2 * 4 * 64  # batches x micro_batch_size x seq_len
    assert [r["layer"] for r in final["layers"]] == [0, 1]
    for r in final["layers"]:
        c = np.array(r["coselection"])
        assert np.diag(c).tolist() == r["tokens_per_expert"] and sum(r["tokens_per_expert"]) == final["tokens"] * 2
        assert 0 < r["router_entropy"] <= math.log(8) + 1e-6 and r["dropped_slots"] == 0
    assert len(final["adjacent"]) == 1

    # the history: router_loads.jsonl's records (steps 2, 4, 6) and the TensorBoard scalars (steps 1..6)
    lines = [json.loads(ln) for ln in (tiny_run / "router_loads.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [2, 4, 6]
    for key in ("0", "1"):
        rec = hist["layers"][key]["records"]
        assert rec["step"] == [2, 4, 6]
        assert rec["tokens_per_expert"] == [ln["layers"][key]["tokens_per_expert"] for ln in lines]
        loads = np.array(rec["tokens_per_expert"])
        assert rec["load_max_over_mean"] == pytest.approx((loads.max(1) / loads.mean(1)).tolist())
        assert loads.sum(1).tolist() == [2 * 4 * 64 * 2] * 3  # 2 steps x 256 tokens x top-2 per record
        s = hist["layers"][key]["scalars"]
        assert s["max_over_mean_load"]["step"] == [1, 2, 3, 4, 5, 6]
        assert s["dropped_fraction"]["value"] == [0.0] * 6

    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(["analysis.json", "load_over_steps.png", "balance_over_steps.png", "load_final.png",
                            "router_entropy.png", "coselection.png", "layer_agreement.png",
                            "top_tokens_layer0.png", "top_tokens_layer1.png"])
    for n in names:
        if n.endswith(".png"):
            assert (out_dir / n).read_bytes()[:8] == PNG
    assert "NMI with next" in text and "wrote 9 file(s)" in text


def test_analyze_text_file_against_independent_counts(tiny_run, tmp_path):
    """--data FILE: the same windows routed by hand (hooks written here) give the
    co-selection counts, transitions and top-token counts of analysis.json."""
    from tokenizers import Tokenizer

    from experts.layers import named_moe_layers
    from lit_modules.checkpoints.model_dir import load_model

    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n" * 12)
    rc, out = analyze(tiny_run, "--data", text, "--seq-len", "32", "--batch-size", "3", "--batches", "2",
                      "--min-count", "2", "--out", tmp_path / "a")
    assert rc == 0, out
    res = json.loads((tmp_path / "a" / "analysis.json").read_text())

    ids = Tokenizer.from_file(str(tiny_run / "tokenizer.json")).encode(text.read_text()).ids
    assert len(ids) > 6 * 32
    x = torch.tensor(ids[:6 * 32]).view(6, 32)  # 2 batches of 3 full windows
    _, model, _ = load_model(tiny_run)
    chosen = {}
    for path, layer in named_moe_layers(model):
        layer.router.register_forward_hook(lambda m, a, r, p=path: chosen.setdefault(p, []).append(r.ids_TK))
    with torch.no_grad():
        model(x[:3]), model(x[3:])
    picks = [torch.cat(v).tolist() for v in chosen.values()]
    tokens = x.flatten().tolist()
    assert res["final"]["tokens"] == len(tokens)
    for layer, got in zip(picks, res["final"]["layers"]):
        pairs = {}
        for row in layer:
            for i, j in itertools.product(row, row):
                pairs[i, j] = pairs.get((i, j), 0) + 1
        assert got["coselection"] == [[pairs.get((i, j), 0) for j in range(8)] for i in range(8)]
        for e, top in enumerate(got["top_tokens"]):
            for t in top:
                assert t["count"] == sum(1 for row, v in zip(layer, tokens) if v == t["id"] and e in row)
                assert t["token_count"] == tokens.count(t["id"]) >= 2
    trans = {}
    for ra_, rb in zip(*picks):
        for i, j in itertools.product(ra_, rb):
            trans[i, j] = trans.get((i, j), 0) + 1
    assert res["final"]["adjacent"][0]["transitions"] == [[trans.get((i, j), 0) for j in range(8)] for i in range(8)]


def test_analyze_without_matplotlib_writes_the_json(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(ra, "have_matplotlib", lambda: False)
    rc, text = analyze(tiny_run, "--batches", "0", "--out", tmp_path / "a")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["analysis.json"]
    res = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert "final" not in res and res["history"]["layers"]["0"]["records"]["step"] == [2, 4, 6]
    assert "plots skipped: matplotlib is not installed (pip install 'moelab[plots]')" in text


def test_analyze_errors(tiny_run, tmp_path, capsys):
    from lit_modules.cli import main

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "recipe.yaml").write_text((tiny_run / "recipe.yaml").read_text())
    assert main(["analyze", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"moelab analyze: error: {model_dir} is not a run directory, so it has no validation data of "
                   f"its own; pass --data FILE (a UTF-8 text file to route).")
    assert main(["analyze", str(tiny_run), "--batches", "-1"]) == 2
    assert "--batches -1 must be at least 0" in capsys.readouterr().err
