"""Compare evaluation runs: a table of chosen metrics across models/checkpoints and a PNG bar chart."""

from __future__ import annotations

import fnmatch
import glob
import json
import math
from pathlib import Path

from billa.evaluate.results import Table, TaskResult
from billa.utils.logging import get_logger

log = get_logger(__name__)

RESULTS_FILE = "results.json"  # written by billa.evaluate.run into every evaluation output directory
DEFAULT_METRICS = (
    "ppl/*/conditional_generation/bits_per_char",
    "*/loglik/acc_norm",
    "*/generative/acc",
    "judge/*/mean",
)


def _load_run(path: str) -> dict:
    file = Path(path) if str(path).endswith(".json") else Path(path) / RESULTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"report.runs: {path} has no {RESULTS_FILE} (is it an evaluate.py output directory?)")
    data = json.loads(file.read_text(encoding="utf-8"))
    flat = {f"{task}/{k}": v for task, metrics in data.get("metrics", {}).items() for k, v in metrics.items()}
    return {
        "label": data.get("label") or data.get("model_id") or file.parent.name,
        "dir": str(file.parent),
        "metrics": flat,
    }


def report(
    output_dir: str,
    runs: list[str] | None = None,
    runs_glob: str = "outputs/evaluate/*",
    metrics: list[str] = DEFAULT_METRICS,
    labels: list[str] | None = None,
    chart: str = "report.png",
) -> TaskResult:
    """Table and chart of ``metrics`` (fnmatch patterns over ``<task>/<metric>`` keys) for several runs.

    Args:
        output_dir: this run's directory (the chart is written there).
        runs: evaluation output directories (or their results.json) to compare, in order; null: every directory
            matching ``runs_glob`` that has results, oldest first.
        runs_glob: where to look when ``runs`` is null.
        metrics: patterns of the metrics to show.
        labels: one label per run (default: each run's model id).
        chart: the PNG file name.
    """
    if not runs:
        runs = sorted(
            (p for p in glob.glob(runs_glob) if Path(p, RESULTS_FILE).is_file()),
            key=lambda p: Path(p, RESULTS_FILE).stat().st_mtime,
        )
        runs = [p for p in runs if Path(p).resolve() != Path(output_dir).resolve()]
    if not runs:
        raise FileNotFoundError(f"report.runs is empty and no directory matching {runs_glob!r} has {RESULTS_FILE}")
    loaded = [_load_run(r) for r in runs]
    if labels:
        if len(labels) != len(loaded):
            raise ValueError(f"report.labels has {len(labels)} entries for {len(loaded)} runs")
        for run, label in zip(loaded, labels, strict=True):
            run["label"] = label
    keys = sorted({k for run in loaded for k in run["metrics"] if any(fnmatch.fnmatch(k, p) for p in metrics)})
    if not keys:
        raise ValueError(f"report.metrics: none of {list(metrics)} matches a metric of the runs")
    rows = [[k, *[run["metrics"].get(k, float("nan")) for run in loaded]] for k in keys]
    png = Path(output_dir) / chart
    draw_chart(png, keys, [run["label"] for run in loaded], [[run["metrics"].get(k) for k in keys] for run in loaded])
    return TaskResult(
        tables={"comparison": Table(["metric", *[run["label"] for run in loaded]], rows)},
        details={"runs": [{"label": r["label"], "dir": r["dir"]} for r in loaded]},
        files=[str(png)],
    )


def draw_chart(path: Path, keys: list[str], labels: list[str], values: list[list[float | None]]) -> None:
    """One horizontal bar group per metric, one bar per run; missing values are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.35 * len(keys) * max(1, len(labels) / 2)))
    for i, (label, series) in enumerate(zip(labels, values, strict=True)):
        ys = [k + i * height for k in range(len(keys))]
        xs = [v if v is not None and math.isfinite(v) else 0.0 for v in series]
        ax.barh(ys, xs, height=height, label=label)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(keys))], keys, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("value (bits/char: lower is better; accuracy, judge scores: higher is better)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
