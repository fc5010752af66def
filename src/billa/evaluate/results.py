"""What every task returns, and how it is written: ``<output_dir>/<task>.json`` + ``<task>.md`` + the logger."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from billa.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class Table:
    """A result table: column names and rows (one list per row)."""

    columns: list[str]
    rows: list[list]

    def markdown(self) -> str:
        def cell(value) -> str:
            if value is None:
                return ""
            if isinstance(value, float):
                return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
            return str(value).replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class TaskResult:
    """One task's outcome.

    Attributes:
        metrics: flat scalar metrics, logged as ``<task>/<key>`` (e.g. ``ppl/zh/ppl``).
        tables: named tables, written to markdown and logged as W&B tables.
        item_tables: per-item tables (each question's prediction, each judge verdict): logged as W&B tables beside
            the run's metrics, not written to markdown (``details`` keeps the same items in the JSON).
        details: anything else worth keeping in the JSON (per-item predictions, settings, files read).
        files: other files the task wrote (answer files, charts).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    item_tables: dict[str, Table] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def write_result(output_dir: str | Path, task: str, result: TaskResult, header: str = "") -> dict[str, str]:
    """Write ``<task>.json`` (metrics, tables, details) and ``<task>.md`` (the tables) under ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": task,
        "metrics": result.metrics,
        "tables": {name: {"columns": t.columns, "rows": t.rows} for name, t in result.tables.items()},
        "details": result.details,
        "files": result.files,
    }
    json_path, md_path = out / f"{task}.json", out / f"{task}.md"
    json_path.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
    sections = [f"# {task}", header] if header else [f"# {task}"]
    sections += [f"## {name}\n\n{table.markdown()}" for name, table in result.tables.items()]
    md_path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return {"json": str(json_path), "markdown": str(md_path)}


def log_result(logger, task: str, result: TaskResult) -> None:
    """Send the metrics (``<task>/<key>``) and tables (W&B tables, where the logger has them) to the logger."""
    if not logger:
        return
    metrics = {f"{task}/{k}": v for k, v in result.metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
    if metrics:
        logger.log_metrics(metrics)
    if hasattr(logger, "log_table"):
        for name, table in {**result.tables, **result.item_tables}.items():
            logger.log_table(key=f"{task}/{name}", columns=table.columns, data=_typed_rows(table))


def item_table(items: list[dict], columns: list[str]) -> Table:
    """A per-item table of ``columns`` from item dictionaries (a missing field is an empty cell)."""
    return Table(columns, [[item.get(c) for c in columns] for item in items])


def _typed_rows(table: Table) -> list[list]:
    """Rows whose columns each hold one type (W&B tables require it): a column with any text becomes text."""
    columns = list(zip(*table.rows, strict=True)) if table.rows else []
    numeric = [all(v is None or isinstance(v, int | float) for v in col) for col in columns]
    return [[v if numeric[i] else ("" if v is None else str(v)) for i, v in enumerate(row)] for row in table.rows]
