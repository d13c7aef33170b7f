"""`moelab bench --vs-hf` of the Qwen3-Next proxy: the twin is transformers'
Qwen3NextForCausalLM (fused in_proj_qkvz / in_proj_ba rebuilt from moelab's weights),
and both train to the same losses."""
from __future__ import annotations

import json

import pytest

from lit_modules.cli import main


def test_vs_hf_qwen3_next_same_weights_same_losses(capsys):
    pytest.importorskip("transformers")
    argv = ["proxies/qwen3_next_tiny", "model.moe.balance.aux_scope=pooled", "train.seq_len=48",
            "train.micro_batch_size=2", "--steps", "2", "--warmup", "1", "--vs-hf", "--json", "--device", "cpu"]
    assert main(["bench", *argv]) == 0
    d = json.loads(capsys.readouterr().out)
    ours, hf = d["results"]
    assert hf["detail"].startswith("Qwen3NextForCausalLM")
    assert abs(d["vs_hf"]["first_step_loss_diff"]) < 1e-5
    assert d["vs_hf"]["max_ce_diff_all_steps"] < 1e-4  # the gradients matched too
    assert hf["losses"][0] != hf["losses"][-1]
