"""lit_modules.tools.trace_overlap on hand-made traces: each state's milliseconds."""
import json

import pytest

from lit_modules.tools.trace_overlap import format_summary, main, summarize


def _k(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_states_split_the_window():
    events = [
        _k("gemm", 0, 1000), _k("gemm", 500, 1000),  # two streams: compute 0-1500, counted once
        _k("ncclDevKernel_AllGather", 1200, 800),    # 1200-1500 beside compute, 1500-2000 alone
        _k("Memset (Device)", 3000, 500, cat="gpu_memset"),  # compute again after 1 ms idle
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9000},  # host: ignored
    ]
    s = summarize(events)
    assert s["window_ms"] == pytest.approx(3.5)
    assert s["compute_only_ms"] == pytest.approx(1.7)  # 0-1200 and 3000-3500
    assert s["overlapped_ms"] == pytest.approx(0.3)
    assert s["comm_only_ms"] == pytest.approx(0.5)
    assert s["idle_ms"] == pytest.approx(1.0)
    assert s["comm_ms"] == pytest.approx(0.8)
    text = format_summary(s)
    assert "| collective only (exposed) | 0.50 | 14.3% |" in text
    assert "38% of it beside compute" in text


def test_a_trace_without_kernels_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="no GPU kernels"):
        summarize([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}])


def test_command_line(tmp_path, capsys):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [_k("gemm", 0, 2000)]}))
    assert main([str(path)]) == 0
    assert "no collectives in the trace" in capsys.readouterr().out
