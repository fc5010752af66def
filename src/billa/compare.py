"""Compare pipeline variants: the table (markdown + JSON) and chart a stage-merging ablation sweep ends with.

``python train.py -m pipeline=three_stage,merge_2_3,skip_2`` runs one pipeline per sweep point; each writes
``<point>/pipeline.json``. When the sweep ends, ``CompareCallback`` collects them into ``comparison.md``,
``comparison.json`` and ``comparison.png`` in the sweep directory: final validation loss per source kind, per variant,
with what each variant trained and reused. ``python -m billa.compare <dir>`` redraws them for any directory of runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from billa.utils.logging import get_logger, setup_logging

log = get_logger(__name__)

KIND_LABELS = {"text": "LM text", "translation": "translation", "task": "task", "instruction": "dialogue"}


def collect(root: str | Path) -> list[dict]:
    """Every ``pipeline.json`` under ``root`` (one per sweep point), in sweep order."""
    runs = []
    for path in sorted(Path(root).rglob("pipeline.json"), key=lambda p: (len(p.parts), str(p))):
        summary = json.loads(path.read_text())
        if "validation" in summary:
            runs.append({**summary, "run_dir": str(path.parent)})
    return runs


def _table(runs: list[dict], kinds: list[str]) -> str:
    header = ["variant", "stages", *[KIND_LABELS.get(k, k) for k in kinds], "all", "trained steps", "reused stages"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        stages = [s for s in run["steps"] if s.get("stage")]
        row = [
            run["pipeline"],
            " -> ".join(s["stage"] for s in stages),
            *[f"{run['validation']['by_kind'].get(k, float('nan')):.4f}" for k in kinds],
            f"{run['validation']['overall']:.4f}",
            str(run["trained_steps"]),
            ", ".join(s["step"] for s in stages if s.get("reused")) or "-",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


HEADLINE = ("/conditional_generation/bits_per_char", "/loglik/acc", "/generative/acc")  # evaluate.py metrics shown


def _evaluation_table(runs: list[dict]) -> str:
    """Headline evaluate.py metrics per variant (bits/char per language, multiple-choice accuracy), if any ran."""
    columns = sorted(
        {
            f"{task}/{key}"
            for run in runs
            for task, metrics in (run.get("evaluation") or {}).items()
            for key in metrics
            if key.endswith(HEADLINE)
        }
    )
    if not columns:
        return ""
    lines = ["| variant | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for run in runs:
        evaluation = run.get("evaluation") or {}
        values = []
        for column in columns:
            task, key = column.split("/", 1)
            value = evaluation.get(task, {}).get(key)
            values.append("-" if value is None else f"{value:.4f}")
        lines.append(f"| {run['pipeline']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _chart(runs: list[dict], kinds: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(kinds), 3.6))
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        values = [run["validation"]["by_kind"].get(k, float("nan")) for k in kinds]
        ax.bar([j + i * width for j in range(len(kinds))], values, width, label=run["pipeline"])
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(kinds))])
    ax.set_xticklabels([KIND_LABELS.get(k, k) for k in kinds])
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Final validation loss per source kind")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(root: str | Path) -> dict | None:
    """Write ``comparison.{md,json,png}`` in ``root`` from the pipelines run under it; None when there are none."""
    runs = collect(root)
    if not runs:
        return None
    kinds = sorted({k for run in runs for k in run["validation"]["by_kind"]})
    root = Path(root)
    table = _table(runs, kinds)
    evaluation = _evaluation_table(runs)
    text = "# Pipeline comparison\n\nFinal validation loss (lower is better).\n\n" + table
    if evaluation:
        text += "\nevaluate.py on the final export (bits per character: lower is better; accuracy: higher).\n\n"
        text += evaluation
    (root / "comparison.md").write_text(text)
    result = {
        "kinds": kinds,
        "variants": [
            {
                "pipeline": run["pipeline"],
                "run_dir": run["run_dir"],
                "stages": [s["stage"] for s in run["steps"] if s.get("stage")],
                "validation": run["validation"],
                "trained_steps": run["trained_steps"],
                "reused": [s["step"] for s in run["steps"] if s.get("reused") and s.get("stage")],
                **({"evaluation": run["evaluation"]} if "evaluation" in run else {}),
            }
            for run in runs
        ],
    }
    (root / "comparison.json").write_text(json.dumps(result, indent=1))
    _chart(runs, kinds, root / "comparison.png")
    log.info("Pipeline comparison (%s):\n%s", root / "comparison.md", table)
    return result


class CompareCallback(Callback):
    """Hydra callback: at the end of a multirun, compare the pipelines its points ran (no-op for other sweeps)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        setup_logging()
        write_comparison(config.hydra.sweep.dir)


if __name__ == "__main__":  # python -m billa.compare <directory of pipeline runs>
    setup_logging()
    if write_comparison(sys.argv[1] if len(sys.argv) > 1 else ".") is None:
        raise SystemExit("billa.compare: no pipeline.json with validation results under that directory")
