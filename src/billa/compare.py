"""Compare pipeline variants: the table (markdown + JSON) and chart a stage-merging ablation sweep ends with.

``python train.py -m pipeline=three_stage,merge_2_3,skip_2`` runs one pipeline per sweep point; each writes
``<point>/pipeline.json``. When the sweep ends, ``CompareCallback`` collects them into ``comparison.md``,
``comparison.json`` and ``comparison.png`` in the sweep directory: final validation loss per source kind, per variant,
with what each variant trained and reused. ``python -m billa.compare <dir>`` redraws them for any directory of runs.

Seeds are a sweep dimension (``python train.py -m pipeline=three_stage,merge_2_3 seed=1,2,3``): the runs of one
variant are summarised as mean +- standard deviation over its seeds, and a variant whose mean is closer to the best
variant's than the seed-to-seed spread is marked ``~`` (the difference is not established). An evaluation set whose
items cannot resolve the differences between the variants is flagged with its item count. With ``logger=wandb`` the
table and chart also go to the sweep's W&B group, as a run of job type ``comparison``.
"""

from __future__ import annotations

import json
import math
import statistics
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


HEADLINE = ("/conditional_generation/bits_per_char", "/loglik/acc", "/generative/acc")  # evaluate.py metrics shown
SPREAD_MARK = "~"  # beside a variant whose distance to the best is smaller than the seed-to-seed spread


def higher_is_better(column: str) -> bool:
    """Accuracies rise with quality; losses and bits per character fall."""
    return column.endswith("/acc")


def _stats(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one seed) and count of one variant's values in one column."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}  # fmt: skip


def mark_seed_spread(column: dict[str, dict], higher_better: bool) -> float | None:
    """Set ``within_seed_spread`` on every variant's stats of one column; return the column's seed spread.

    The spread is the seed-to-seed standard deviation pooled over the variants that ran more than one seed (the root
    mean of their variances). A variant other than the best whose mean is closer to the best mean than that spread
    is marked: with this many seeds the two are not told apart. Without repeated seeds nothing is marked.
    """
    variances = [s["std"] ** 2 for s in column.values() if s["std"] is not None]
    spread = math.sqrt(statistics.fmean(variances)) if variances else None
    finite = {name: s["mean"] for name, s in column.items() if not math.isnan(s["mean"])}
    best = (max if higher_better else min)(finite, key=finite.get) if finite else None
    for name, s in column.items():
        s["within_seed_spread"] = bool(
            spread is not None and name != best and name in finite and abs(s["mean"] - finite[best]) < spread
        )
    return spread


def small_eval_set(column: dict[str, dict], items: int | None) -> float | None:
    """The resolution of an accuracy over ``items`` items, 1/sqrt(items) (the 95% interval's half width at 50%,
    1.96 x 0.5 / sqrt(n)), when the variants' means lie closer together than it; else None."""
    means = [s["mean"] for s in column.values() if not math.isnan(s["mean"])]
    if not items or len(means) < 2:
        return None
    resolution = 1 / math.sqrt(items)
    return resolution if max(means) - min(means) < resolution else None


def variants(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs grouped by pipeline variant, in sweep order; each variant's runs are its seeds."""
    grouped: dict[str, list[dict]] = {}
    for run in runs:
        grouped.setdefault(run["pipeline"], []).append(run)
    return grouped


def _evaluation_columns(runs: list[dict]) -> list[str]:
    """Headline evaluate.py metrics of any run (bits/char per language, multiple-choice accuracy)."""
    return sorted(
        {
            f"{task}/{key}"
            for run in runs
            for task, metrics in (run.get("evaluation") or {}).items()
            for key in metrics
            if key.endswith(HEADLINE)
        }
    )


def _value(run: dict, column: str) -> float | None:
    if column.startswith("validation/"):
        key = column.removeprefix("validation/")
        return run["validation"]["overall"] if key == "all" else run["validation"]["by_kind"].get(key)
    task, key = column.split("/", 1)
    return (run.get("evaluation") or {}).get(task, {}).get(key)


def _items(runs: list[dict], column: str) -> int | None:
    """Items behind an accuracy column (``<task>/<subset>/items``, the fewest over the runs), None for others."""
    if not higher_is_better(column):
        return None
    task, subset = column.split("/")[:2]
    counts = [(run.get("evaluation") or {}).get(task, {}).get(f"{subset}/items") for run in runs]
    counts = [int(c) for c in counts if c is not None]
    return min(counts) if counts else None


def summarise(runs: list[dict]) -> dict:
    """Per variant and column (validation loss per kind and overall, headline evaluation metrics): mean +- std over
    seeds, the seed-spread marks, each column's seed spread and the evaluation sets too small to separate variants."""
    grouped = variants(runs)
    kinds = sorted({k for run in runs for k in run["validation"]["by_kind"]})
    columns = [*(f"validation/{k}" for k in kinds), "validation/all", *_evaluation_columns(runs)]
    table = {c: {name: _stats([_value(r, c) for r in seeds]) for name, seeds in grouped.items()} for c in columns}
    spread = {c: mark_seed_spread(table[c], higher_is_better(c)) for c in columns}
    small = {}
    for column in columns:
        items = _items(runs, column)
        resolution = small_eval_set(table[column], items)
        if resolution is not None:
            small[column] = {"items": items, "resolution": resolution}
    return {"kinds": kinds, "columns": columns, "table": table, "seed_spread": spread, "small_eval_sets": small}


def _cell(stats: dict) -> str:
    if stats["n"] == 0:
        return "-"
    text = f"{stats['mean']:.4f}" if stats["std"] is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"
    return f"{text} {SPREAD_MARK}" if stats.get("within_seed_spread") else text


def _header(column: str, small: dict) -> str:
    name = column.removeprefix("validation/")
    name = "all" if name == "all" else KIND_LABELS.get(name, name) if column.startswith("validation/") else name
    if column in small:
        name += f" (n={small[column]['items']}: too few items, ±{small[column]['resolution']:.2f})"
    return name


def _markdown_table(names: list[str], first: list[str], columns: list[str], summary: dict, last: dict) -> str:
    header = ["variant", *first, *[_header(c, summary["small_eval_sets"]) for c in columns], *last]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        row = [name, *[first[k][name] for k in first], *[_cell(summary["table"][c][name]) for c in columns]]
        lines.append("| " + " | ".join([*row, *[last[k][name] for k in last]]) + " |")
    return "\n".join(lines) + "\n"


def _table(runs: list[dict], summary: dict) -> tuple[str, str]:
    """The validation table and the evaluation table ('' when no evaluation task ran), as markdown."""
    grouped = variants(runs)
    names = list(grouped)
    stages = {n: " -> ".join(s["stage"] for s in seeds[0]["steps"] if s.get("stage")) for n, seeds in grouped.items()}
    first = {"stages": stages}
    if any(len(seeds) > 1 for seeds in grouped.values()):
        first["seeds"] = {n: ", ".join(str(r.get("seed", "?")) for r in seeds) for n, seeds in grouped.items()}
    reused = {
        n: ", ".join(dict.fromkeys(s["step"] for r in seeds for s in r["steps"] if s.get("stage") and s.get("reused")))
        or "-"
        for n, seeds in grouped.items()
    }
    last = {"trained steps": {n: str(sum(r["trained_steps"] for r in seeds)) for n, seeds in grouped.items()},
            "reused stages": reused}  # fmt: skip
    validation = [c for c in summary["columns"] if c.startswith("validation/")]
    evaluation = [c for c in summary["columns"] if not c.startswith("validation/")]
    val_table = _markdown_table(names, first, validation, summary, last)
    eval_table = _markdown_table(names, {}, evaluation, summary, {}) if evaluation else ""
    return val_table, eval_table


def _chart(names: list[str], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = summary["kinds"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(kinds), 3.6))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        stats = [summary["table"][f"validation/{k}"][name] for k in kinds]
        errors = [s["std"] or 0.0 for s in stats]  # one seed: no error bar
        label = name + (f" (mean ± std of {stats[0]['n']} seeds)" if stats and stats[0]["n"] > 1 else "")
        xs = [j + i * width for j in range(len(kinds))]
        bars = ax.bar(xs, [s["mean"] for s in stats], width, yerr=errors, capsize=3, label=label)
        for bar, s in zip(bars, stats, strict=True):
            if s.get("within_seed_spread"):  # not told apart from the best variant by these seeds
                ax.annotate(SPREAD_MARK, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=12)  # fmt: skip
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(kinds))])
    ax.set_xticklabels([KIND_LABELS.get(k, k) for k in kinds])
    ax.set_ylabel("validation loss (nats/token)")
    title = "Final validation loss per source kind"
    ax.set_title(title + (f" ({SPREAD_MARK}: within the seed spread of the best)" if summary["seed_spread"] else ""),
                 fontsize="medium")  # fmt: skip
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LEGEND = (
    f"Mean ± standard deviation over the seeds each variant ran. {SPREAD_MARK}: closer to the best variant in that "
    "column than the seed-to-seed spread (the standard deviation pooled over variants): not told apart by these seeds."
)


def write_comparison(root: str | Path) -> dict | None:
    """Write ``comparison.{md,json,png}`` in ``root`` from the pipelines run under it; None when there are none."""
    runs = collect(root)
    if not runs:
        return None
    root = Path(root)
    summary = summarise(runs)
    names = list(variants(runs))
    table, evaluation = _table(runs, summary)
    text = "# Pipeline comparison\n\nFinal validation loss (lower is better).\n\n"
    if any(s is not None for s in summary["seed_spread"].values()):
        text += LEGEND + "\n\n"
    text += table
    if evaluation:
        text += "\nevaluate.py on the final export (bits per character: lower is better; accuracy: higher).\n\n"
        text += evaluation
    for column, small in summary["small_eval_sets"].items():
        text += (
            f"\n{column}: {small['items']} items resolve an accuracy to about ±{small['resolution']:.2f}, more than "
            "the variants differ by: a larger evaluation set is needed to rank them.\n"
        )
    (root / "comparison.md").write_text(text)
    result = {
        "kinds": summary["kinds"],
        "variants": [
            {
                "pipeline": run["pipeline"],
                "seed": run.get("seed"),
                "run_dir": run["run_dir"],
                "stages": [s["stage"] for s in run["steps"] if s.get("stage")],
                "validation": run["validation"],
                "trained_steps": run["trained_steps"],
                "reused": [s["step"] for s in run["steps"] if s.get("reused") and s.get("stage")],
                **({"evaluation": run["evaluation"]} if "evaluation" in run else {}),
            }
            for run in runs
        ],
        "summary": {name: {c: summary["table"][c][name] for c in summary["columns"]} for name in names},
        "seed_spread": summary["seed_spread"],
        "small_eval_sets": summary["small_eval_sets"],
    }
    (root / "comparison.json").write_text(json.dumps(result, indent=1))
    _chart(names, summary, root / "comparison.png")
    log.info("Pipeline comparison (%s):\n%s", root / "comparison.md", table)
    return result


def sweep_group(config: DictConfig) -> str:
    """The W&B group every stage of the sweep logged to (``billa.pipeline.default_group`` in a multirun)."""
    return config.pipeline.get("group") or f"sweep-{Path(config.hydra.sweep.dir).name}"


def log_comparison(config: DictConfig, root: str | Path) -> None:
    """With ``logger=wandb``: the comparison table and chart as a run of job type ``comparison`` in the sweep's group.

    The logger is built from the sweep's own ``logger:`` node (project, mode, entity), renamed and saved in the sweep
    directory; other loggers have no place for it and the files in ``root`` are the comparison.
    """
    node = config.get("logger")
    if not node or "wandb" not in str(node.get("_target_", "")):
        return
    from hydra.utils import instantiate

    root = Path(root)
    result = json.loads((root / "comparison.json").read_text())
    group = sweep_group(config)
    logger = instantiate(
        node, name=f"{group}-comparison", group=group, job_type="comparison", save_dir=str(root), tags=["comparison"]
    )
    columns = ["variant", "column", "mean", "std", "seeds", "within_seed_spread", "items"]
    rows = [
        [name, column, s["mean"], s["std"], s["n"], s["within_seed_spread"],
         result["small_eval_sets"].get(column, {}).get("items")]
        for name, per_column in result["summary"].items()
        for column, s in per_column.items()
    ]  # fmt: skip
    logger.log_table(key="comparison/table", columns=columns, data=rows)
    logger.log_image(key="comparison/chart", images=[str(root / "comparison.png")])
    logger.experiment.finish()
    log.info("Comparison logged to W&B group %s (job type comparison)", group)


class CompareCallback(Callback):
    """Hydra callback: at the end of a multirun, compare the pipelines its points ran (no-op for other sweeps)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        setup_logging()
        if write_comparison(config.hydra.sweep.dir) is not None:
            log_comparison(config, config.hydra.sweep.dir)


if __name__ == "__main__":  # python -m billa.compare <directory of pipeline runs>
    setup_logging()
    if write_comparison(sys.argv[1] if len(sys.argv) > 1 else ".") is None:
        raise SystemExit("billa.compare: no pipeline.json with validation results under that directory")
