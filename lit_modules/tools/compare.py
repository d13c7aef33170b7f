"""`moelab compare RUN RUN ...`: the curves of several runs on common axes, and a
table of their final figures.

What a run directory holds (lit_modules/train/run.py): recipe.yaml, the TensorBoard
scalars under tb/ (train/ce_loss, train/loss every log_every steps; val/loss at each
validation; perf/tokens), and summary.json once it finished. Curves come from the
TensorBoard scalars, read with tensorboard's EventAccumulator (a resumed run's
purged steps are dropped by it); a run without summary.json (still running,
interrupted) is compared on what it logged so far.

Axes: tokens = step x tokens per optimizer step (summary.json, else TensorBoard's
perf/tokens, else the recipe's batch on one device), and training FLOPs = tokens x
the recipe's FLOPs per token (arch.count: 6 x active matmul parameters + causal
attention), so a dense and an MoE run of equal active size meet on the FLOPs axis.
The training curve is the cross-entropy (train/ce_loss), without the balancing
losses, so runs with and without experts compare on the same quantity.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from arch import count, load_recipe
from arch.registry import RecipeError
from lit_modules.checkpoints import layout


class CompareError(RecipeError):
    """A run that cannot be compared; the message says which and why."""


PLOT_FIX = "pip install 'moelab[plots]' (or matplotlib), or pass --no-plot for the table alone"

Curve = List[Tuple[int, float]]  # (optimizer step, value)


@dataclass
class RunRecords:
    label: str
    path: Path
    recipe_name: str
    params_total: int
    params_active: int
    flops_per_token: float
    tokens_per_step: float
    tokens_per_step_source: str  # where tokens_per_step came from
    train: Curve = field(default_factory=list)
    val: Curve = field(default_factory=list)
    summary: Dict = field(default_factory=dict)

    def tokens(self, step: int) -> float:
        return step * self.tokens_per_step

    def flops(self, step: int) -> float:
        return self.tokens(step) * self.flops_per_token

    def final(self) -> Dict:
        """The figures of the table: the last logged values, and the best validation loss."""
        steps = max([s for s, _ in self.train + self.val], default=0)
        steps = max(steps, int(self.summary.get("steps") or 0))
        last_val = self.val[-1] if self.val else None
        best_val = min(self.val, key=lambda sv: sv[1]) if self.val else None
        return {
            "run": self.label, "recipe": self.recipe_name, "path": str(self.path),
            "params_total": self.params_total, "params_active": self.params_active,
            "steps": steps, "tokens": self.tokens(steps), "flops": self.flops(steps),
            "flops_per_token": self.flops_per_token,
            "train_loss": self.train[-1][1] if self.train else None,
            "val_loss": last_val[1] if last_val else None,
            "val_ppl": math.exp(min(last_val[1], 80.0)) if last_val else None,
            "val_step": last_val[0] if last_val else None,
            "best_val_loss": best_val[1] if best_val else None,
            "best_val_step": best_val[0] if best_val else None,
            "tokens_per_s": self.summary.get("tokens_per_s"),
            "wall_seconds": self.summary.get("wall_seconds"),
            "finished": bool(self.summary),
        }


def _scalars(tb_dir: Path) -> Dict[str, Curve]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # the last write of a step wins
        out[tag] = sorted(by_step.items())
    return out


def read_run(path, label: Optional[str] = None) -> RunRecords:
    """A run directory's recipe, curves and summary, or one CompareError naming it."""
    path = Path(path)
    recipe_file = path / layout.RECIPE_FILE
    tb_dir = path / layout.TB_DIR
    if not path.is_dir() or not recipe_file.is_file():
        raise CompareError(f"{path} is not a run directory (it has no {layout.RECIPE_FILE}); give directories "
                           f"written by `moelab train` (train.run_dir/<run name>).")
    recipe = load_recipe(recipe_file)
    summary = {}
    summary_file = path / layout.SUMMARY_FILE
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except ValueError:
            raise CompareError(f"{summary_file} is not JSON; it was cut short or edited: remove it to compare "
                               f"the run on its TensorBoard records alone.") from None
        if not isinstance(summary, dict):
            raise CompareError(f"{summary_file} is not a JSON object; remove it to compare the run on its "
                               f"TensorBoard records alone.")
    scalars = _scalars(tb_dir) if tb_dir.is_dir() else {}
    train = scalars.get("train/ce_loss") or scalars.get("train/loss") or []
    val = scalars.get("val/loss") or [(h["step"], h["loss"]) for h in summary.get("val_history", [])]
    if not train and not val:
        raise CompareError(f"{path} has no training or validation records yet ({layout.TB_DIR}/ holds no "
                           f"train/ce_loss or val/loss, and there is no {layout.SUMMARY_FILE}); let it log a "
                           f"step first (train.log_every) or leave it out.")
    t = recipe.train
    if summary.get("steps"):
        tps, where = summary["tokens"] / summary["steps"], "summary.json"
    elif scalars.get("perf/tokens"):
        step, tokens = scalars["perf/tokens"][-1]
        tps, where = tokens / step, "TensorBoard perf/tokens"
    else:
        devices = t.devices if isinstance(t.devices, int) else len(t.devices) if isinstance(t.devices, list) else 1
        tps = t.micro_batch_size * t.grad_accum * t.seq_len * devices * t.num_nodes
        where = "the recipe's batch (devices 'auto' counted as one)"
    acc = count(recipe.model, seq_len=t.seq_len)
    return RunRecords(label or path.name, path, recipe.name, acc.params_total, acc.params_active,
                      float(summary.get("flops_per_token") or acc.flops_per_token), float(tps), where,
                      train=list(train), val=list(val), summary=summary)


def read_runs(paths: Sequence) -> List[RunRecords]:
    if len(paths) < 1:
        raise CompareError("moelab compare needs at least one run directory.")
    paths = [Path(p) for p in paths]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):  # runs of the same name in different folders
        labels = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    return [read_run(p, lab) for p, lab in zip(paths, labels)]


# ------------------------------------------------------------------ outputs


def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "int":
        from lit_modules.commands.inspect_cmd import human

        return human(v)
    if kind == "flops":
        return f"{v:.3g}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


TABLE = [("run", "run", ""), ("params", "params_total", "int"), ("active", "params_active", "int"),
         ("steps", "steps", ""), ("tokens", "tokens", "int"), ("train FLOPs", "flops", "flops"),
         ("train CE", "train_loss", ""), ("val loss", "val_loss", ""), ("val ppl", "val_ppl", ""),
         ("best val", "best_val_loss", ""), ("tokens/s", "tokens_per_s", "int")]


def markdown_table(rows: List[Dict]) -> str:
    head = "| " + " | ".join(h for h, _, _ in TABLE) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(TABLE))) + "|"
    body = ["| " + " | ".join(_fmt(r[k], kind) for _, k, kind in TABLE) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise CompareError(f"moelab compare draws its plot with matplotlib, which is not installed; "
                           f"{PLOT_FIX}.") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot(runs: List[RunRecords], path: Path) -> Path:
    """One PNG: validation (top) and training (bottom) loss against tokens (left) and
    training FLOPs (right), one colour per run."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    for run in runs:
        for row, (curve, style) in enumerate(((run.val, "o-"), (run.train, "-"))):
            if not curve:
                continue
            steps = [s for s, _ in curve]
            values = [v for _, v in curve]
            axes[row, 0].plot([run.tokens(s) for s in steps], values, style, label=run.label, markersize=3)
            axes[row, 1].plot([run.flops(s) for s in steps], values, style, label=run.label, markersize=3)
    for row, what in enumerate(("validation loss", "training cross-entropy")):
        axes[row, 0].set_ylabel(what)
        for col, axis in enumerate(("tokens", "training FLOPs")):
            ax = axes[row, col]
            ax.set_xlabel(axis)
            ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    fig.suptitle("moelab compare: " + ", ".join(r.label for r in runs), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(paths: Sequence, out_dir, draw: bool = True) -> Dict:
    """Read the runs, write OUT_DIR/compare.md, compare.json and (draw) compare.png.
    Returns {"rows", "table", "files"}; matplotlib is asked for before any reading."""
    if draw:
        require_matplotlib()
    runs = read_runs(paths)
    rows = [r.final() for r in runs]
    table = markdown_table(rows)
    out = Path(out_dir)
    from lit_modules.disk import writing

    with writing("the comparison", out, "choose another --out folder"):
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "compare.md", out / "compare.json"]
        files[0].write_text(table + "\n")
        curves = {r.label: {"tokens_per_step": r.tokens_per_step, "tokens_per_step_from": r.tokens_per_step_source,
                            "flops_per_token": r.flops_per_token, "train": r.train, "val": r.val} for r in runs}
        files[1].write_text(json.dumps({"runs": rows, "curves": curves}, indent=2) + "\n")
        if draw:
            files.append(plot(runs, out / "compare.png"))
    return {"rows": rows, "table": table, "files": files}
