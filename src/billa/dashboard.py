"""The W&B workspace a researcher opens first, made in code: ``python -m billa.dashboard [key=value ..]``.

The view is data first (``build_spec``: sections -> panels -> metric keys, built from a data config's sources and
their kinds and from evaluate.py's tasks), then W&B objects (``to_workspace``: ``wandb_workspaces`` sections and
panels). With W&B configured the view is saved to the project; without it the specification is written to a JSON file
and the command that saves it later is printed. ``render=<png>`` draws the view's line panels from the offline runs
under a directory (the picture in the README). docs/wandb.md lists the keys and sections.

    python -m billa.dashboard                                  # project billa, every run, data=sample's sources
    python -m billa.dashboard group=sweep-2026-01-01_10-00-00 sweep_dir=multirun/2026-01-01_10-00-00
    python -m billa.dashboard apply=billa-dashboard.json       # save a specification written earlier
    python -m billa.dashboard render=docs/wandb_workspace.png runs=outputs/pipeline-billa/<date>
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from billa.compare import KIND_LABELS
from billa.config import ConfigError
from billa.utils.logging import get_logger, setup_logging

log = get_logger(__name__)

# Keys logged only where the hardware measures them; the other keys are in every run's history (tests check that).
CONDITIONAL_KEYS = {
    "train/mfu": "hardware.peak_tflops set (a GPU config)",
    "train/gpu_mem_gb": "CUDA devices",
}
# evaluate.py headline metric per task and subset (conf/task/<task>.yaml); lower bits/char, higher accuracy is better
EVAL_HEADLINES = {"ppl": "conditional_generation/bits_per_char", "logiqa2": "loglik/acc", "c3": "loglik/acc"}
DEFAULTS = {
    "project": "billa",
    "entity": None,
    "group": None,
    "data": "sample",
    "sweep_dir": None,
    "out": "billa-dashboard.json",
    "apply": None,
    "render": None,
    "runs": None,
}


def _line(title: str, keys: Iterable[str]) -> dict:
    return {"type": "line", "title": title, "keys": list(keys)}


def _bar(title: str, keys: Iterable[str]) -> dict:
    return {"type": "bar", "title": title, "keys": list(keys)}


def build_spec(
    sources: Mapping[str, str],
    eval_subsets: Mapping[str, Iterable[str]],
    project: str = "billa",
    entity: str | None = None,
    group: str | None = None,
    comparison: str | None = None,
) -> dict:
    """The workspace as data: sections of panels, each panel a type, a title and the metric keys it plots.

    Args:
        sources: data source name -> kind (``text``, ``translation``, ``task``, ``instruction``), as in
            ``data.sources.<name>.kind``: the per-source keys (``val/loss/<source>``, ``train/mix/<source>`` ...).
        eval_subsets: evaluate.py task -> its subsets (languages for ``ppl``, files for ``logiqa2`` / ``c3``).
        project, entity: where the view is saved (entity None: the API key's default).
        group: a pipeline's or a sweep's W&B group: the view shows only its runs and adds the ablation section.
        comparison: ``comparison.md`` of the sweep (``billa.compare``): each variant's stages, trained and reused.

    Returns:
        ``{"project", "entity", "group", "name", "conditional_keys", "sections": [{"name", "panels": [...]}]}``;
        a panel is ``{"type": "line"|"bar"|"runs"|"markdown", "title", "keys"}`` (markdown: ``"text"``).
    """
    kinds = sorted({*sources.values()}, key=lambda k: list(KIND_LABELS).index(k) if k in KIND_LABELS else 99)
    by_kind = {kind: sorted(name for name, k in sources.items() if k == kind) for kind in kinds}
    names = sorted(sources)
    sections = [
        {
            "name": "Loss by source kind",
            "panels": [_line("All sources: train and validation loss", ["train/loss", "val/loss"])]
            + [
                _line(
                    f"{KIND_LABELS.get(kind, kind)}: train loss and validation loss per source",
                    ["train/loss", *[f"val/loss/{name}" for name in by_kind[kind]]],
                )  # fmt: skip
                for kind in kinds
            ],
        },
        {
            "name": "Data mix: realised against configured",
            "panels": [
                _line("Realised share of samples per source", [f"train/mix/{n}" for n in names]),
                _line("Realised minus configured share", [f"train/mix_error/{n}" for n in names]),
                _line("Tokens trained per source", [f"train/tokens/{n}" for n in names]),
            ],
        },
        {
            "name": "Throughput and memory",
            "panels": [
                _line("Tokens per second (all devices)", ["train/tokens_per_s"]),
                _line("Tokens per second per device", ["train/tokens_per_s_per_device"]),
                _line("Model FLOPs utilisation", ["train/mfu"]),
                _line("TFLOP/s per device", ["train/tflops_per_device"]),
                _line(
                    "Step time: data wait, forward-backward, optimizer (s)",
                    ["train/step_time/data", "train/step_time/compute", "train/step_time/optimizer"],
                ),  # fmt: skip
                _line("GPU memory, max allocated (GB)", ["train/gpu_mem_gb"]),
                _line("Learning rate", ["train/lr"]),
                _line("Gradient norm", ["train/grad_norm"]),
            ],
        },
        {
            "name": "Validation bits per character per language",
            "panels": [
                _line("Bits/char per LM source (during training)", [f"val/bpc/{n}" for n in by_kind.get("text", [])]),
                _bar(
                    "Bits/char per language, evaluate.py task=ppl",
                    [f"ppl/{lang}/{EVAL_HEADLINES['ppl']}" for lang in eval_subsets.get("ppl", [])],
                ),  # fmt: skip
            ],
        },
    ]
    if group:
        sections.append(_ablation_section(kinds, eval_subsets, comparison))
    for section in sections:
        section["panels"] = [p for p in section["panels"] if p.get("keys") or p["type"] in ("runs", "markdown")]
    return {
        "project": project,
        "entity": entity,
        "group": group,
        "name": f"billa: {group}" if group else f"billa: {project}",
        "conditional_keys": CONDITIONAL_KEYS,
        "sections": sections,
    }


def _ablation_section(kinds: list[str], eval_subsets: Mapping[str, Iterable[str]], comparison: str | None) -> dict:
    eval_keys = [
        f"{task}/{subset}/{EVAL_HEADLINES[task]}"
        for task, subsets in eval_subsets.items()
        if task in EVAL_HEADLINES
        for subset in subsets
    ]
    stages = comparison or (
        "Each variant's stages, which were trained and which reused: `comparison.md` in the sweep directory "
        "(`python -m billa.dashboard group=<group> sweep_dir=<sweep dir>` puts it here)."
    )
    return {
        "name": "Ablation: variants side by side",
        "panels": [
            _bar(
                "Final validation loss per source kind (evaluate.py task=val_loss)",
                [f"val_loss/kind/{kind}/loss" for kind in kinds] + ["val_loss/loss"],
            ),  # fmt: skip
            _bar("evaluate.py headline metrics per variant", eval_keys),
            {"type": "runs", "title": "Variants: config and final metrics, differences only", "keys": []},
            {"type": "markdown", "title": "Stages per variant: trained and reused", "keys": [], "text": stages},
        ],
    }


def panel_keys(spec: Mapping) -> set[str]:
    """Every metric key a panel of ``spec`` plots."""
    return {key for section in spec["sections"] for panel in section["panels"] for key in panel["keys"]}


def to_workspace(spec: Mapping):
    """``spec`` as a ``wandb_workspaces`` Workspace (built offline; ``.save()`` needs W&B access)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    def panel(p: Mapping):
        if p["type"] == "line":
            return wr.LinePlot(title=p["title"], y=list(p["keys"]))
        if p["type"] == "bar":
            return wr.BarPlot(title=p["title"], metrics=list(p["keys"]), orientation="v")
        if p["type"] == "runs":
            return wr.RunComparer(diff_only="split")
        return wr.MarkdownPanel(markdown=f"### {p['title']}\n\n{p['text']}")

    sections = [
        ws.Section(name=s["name"], panels=[panel(p) for p in s["panels"]], is_open=True) for s in spec["sections"]
    ]
    runset = ws.RunsetSettings(filters=[expr.Metric("Group") == spec["group"]] if spec.get("group") else [])
    return ws.Workspace(
        entity=spec.get("entity") or _default_entity(),
        project=spec["project"],
        name=spec["name"],
        sections=sections,
        settings=ws.WorkspaceSettings(group_by_prefix="first", max_runs=30),
        runset_settings=runset,
    )


def _default_entity() -> str:
    """The W&B entity of the configured API key (the workspace needs one), or a placeholder offline."""
    from billa.utils.loggers import wandb_configured

    if not wandb_configured():
        return "offline"
    import wandb

    return wandb.Api().default_entity


def data_sources(data: str = "sample") -> dict[str, str]:
    """``data.sources.<name>.kind`` of ``conf/data/<data>.yaml`` (the kind read from the format where unset)."""
    from billa.data.readers import record_kind
    from billa.utils.compose import compose

    cfg = compose("train", [f"data={data}"])
    return {
        name: source.get("kind") or record_kind(source["format"])
        for name, source in cfg.data.sources.items()
        if source is not None
    }


def eval_subsets() -> dict[str, list[str]]:
    """evaluate.py's default tasks -> their subsets: ``ppl``'s languages, ``logiqa2`` / ``c3``'s files."""
    from billa.utils.compose import compose

    cfg = compose("evaluate", ["task=[ppl,logiqa2,c3]"])
    return {
        "ppl": sorted({source.lang for source in cfg.task.ppl.sources.values()}),
        "logiqa2": sorted(cfg.task.logiqa2.files),
        "c3": sorted(cfg.task.c3.files),
    }


def write_spec(spec: Mapping, path: str | Path) -> Path:
    """Write ``spec`` as JSON to ``path`` (the file ``apply=`` saves later)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1, ensure_ascii=False))
    return path


def view_name(spec: Mapping) -> str:
    """The view's fixed W&B name (``nw-<11 hex>-v``), derived from project and view title: saving the same view again
    (a later run of ``billa.dashboard`` for the project or the sweep group) updates it instead of adding a copy."""
    digest = hashlib.sha1(f"{spec['project']}/{spec['name']}".encode()).hexdigest()[:11]
    return f"nw-{digest}-v"


def save_view(spec: Mapping):
    """Create the W&B view of ``spec``, or update it when a view of the same name exists (needs W&B access)."""
    from wandb_workspaces.workspaces import internal

    workspace = to_workspace(spec)
    workspace._internal_name = view_name(spec)
    try:  # the view's id makes the upsert an update
        workspace._internal_id = internal.get_view_dict(
            workspace.entity, workspace.project, workspace._internal_name[3:-2]
        )["id"]
    except ValueError:  # no such view (or project) yet: created
        workspace._internal_id = ""
    return workspace.save()


def save_or_write(spec: Mapping, out: str | Path) -> str:
    """Save the view to W&B when it is configured here; else write ``spec`` to ``out``. Returns what was done."""
    from billa.utils.loggers import wandb_configured

    if wandb_configured():
        return f"W&B view saved: {save_view(spec).url}"
    path = write_spec(spec, out)
    return (
        f"W&B is not configured here: wrote the view's specification to {path}. On a machine with W&B access "
        f"(`wandb login`), save it with:\n  python -m billa.dashboard apply={path}"
    )


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments over ``DEFAULTS``; a key not in ``DEFAULTS`` is a ``ConfigError`` naming them."""
    options = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            raise ConfigError(
                f"billa.dashboard: {arg!r}: expected key=value with key one of {', '.join(DEFAULTS)} "
                "(e.g. `python -m billa.dashboard project=billa group=<sweep group>`)"
            )
        options[key] = value or None
    return options


def main(argv: list[str]) -> str:
    """``python -m billa.dashboard``: build the view, then save it, write it, apply a file, or render a picture."""
    options = parse_args(argv)
    if options["apply"]:
        path = Path(options["apply"])
        if not path.is_file():
            raise ConfigError(f"apply: {path}: no such file (write one with `python -m billa.dashboard out={path}`)")
        return f"W&B view saved: {save_view(json.loads(path.read_text())).url}"
    comparison = None
    if options["sweep_dir"]:
        table = Path(options["sweep_dir"]) / "comparison.md"
        if not table.is_file():
            raise ConfigError(f"sweep_dir: {table}: no such file (a sweep over pipelines writes it when it ends)")
        comparison = table.read_text()
    spec = build_spec(
        data_sources(options["data"]),
        eval_subsets(),
        project=options["project"],
        entity=options["entity"],
        group=options["group"],
        comparison=comparison,
    )
    if options["render"]:
        if not options["runs"]:
            raise ConfigError("runs: render= draws the offline W&B runs under a directory: add runs=<directory>")
        from billa.utils.loggers import pipeline_run_dirs

        histories = read_histories(pipeline_run_dirs(options["runs"]))
        if not histories:
            raise ConfigError(f"runs: no offline W&B runs under {options['runs']} (run with logger=wandb)")
        return f"Wrote {render(spec, histories, options['render'])}"
    return save_or_write(spec, options["out"])


# --- the offline runs' data: history read from the run files, and a picture of the view drawn from it -----------------


_BLOCK, _HEADER = 32768, 7  # the .wandb file: LevelDB log blocks; a record header is crc32 (4), length (2), type (1)


def _records(path: Path) -> Iterable[bytes]:
    """The records of a ``.wandb`` transaction log (a 7-byte file header, then LevelDB-log blocks)."""
    data, pos, chunks = path.read_bytes(), 7, []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too short for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + _HEADER : pos + _HEADER + length], pos + _HEADER + length
        if kind == 0:  # zero fill at the end of a block
            continue
        chunks.append(chunk)
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield b"".join(chunks)
            chunks = []


def read_history(run_dir: str | Path) -> tuple[str, list[dict]]:
    """The run name and the logged rows (``{key: value}``, ``_step`` included) of one offline W&B run directory."""
    from wandb.proto import wandb_internal_pb2

    name, rows = Path(run_dir).name, []
    for path in sorted(Path(run_dir).glob("*.wandb")):
        for data in _records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run" and record.run.display_name:
                name = record.run.display_name
            elif kind == "history":
                rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                             for item in record.history.item})  # fmt: skip
    return name, rows


def read_histories(dirs: Iterable[str | Path]) -> dict[str, list[dict]]:
    """``read_history`` of every offline run under ``dirs`` (``<dir>/wandb/offline-run-*``), by run name."""
    from billa.utils.loggers import offline_runs

    out: dict[str, list[dict]] = {}
    for run in offline_runs(dirs):
        name, rows = read_history(run)
        out.setdefault(name, []).extend(rows)
    return out


def logged_keys(histories: Mapping[str, list[dict]]) -> set[str]:
    """Every metric key with a numeric value in ``histories``."""
    return {k for rows in histories.values() for row in rows for k, v in row.items() if isinstance(v, int | float)}


def render(spec: Mapping, histories: Mapping[str, list[dict]], path: str | Path, columns: int = 4) -> Path:
    """Draw the view's panels (lines over steps, bars of last values) from ``histories`` into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s["name"], p) for s in spec["sections"] for p in s["panels"] if p["type"] in ("line", "bar")]
    panels = [(name, p) for name, p in panels if any(_series(histories, k) for k in p["keys"])]
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.6 * rows), squeeze=False)
    for ax, (section, p) in zip(axes.flat, panels, strict=False):
        for key in p["keys"]:
            for run, (steps, values) in _series(histories, key).items():
                label = f"{run}: {key}" if len(p["keys"]) > 1 else run
                if p["type"] == "bar":
                    ax.bar(label, values[-1])
                else:
                    ax.plot(steps, values, label=label, linewidth=1)
        ax.set_title(f"{section}\n{p['title']}", fontsize=7)
        ax.tick_params(labelsize=6)
        if p["type"] == "bar":
            ax.tick_params(axis="x", labelrotation=60)
        elif len(ax.lines) <= 8:
            ax.legend(fontsize=4)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(spec["name"], fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def _series(histories: Mapping[str, list[dict]], key: str) -> dict[str, tuple[list, list]]:
    out = {}
    for run, rows in histories.items():
        points = [
            (row.get("_step", i), row[key]) for i, row in enumerate(rows) if isinstance(row.get(key), int | float)
        ]
        if points:
            out[run] = ([s for s, _ in points], [v for _, v in points])
    return out


if __name__ == "__main__":
    from billa.utils.errors import exit_on_error

    setup_logging()
    with exit_on_error():
        from rich.console import Console

        Console().print(main(sys.argv[1:]), markup=False, highlight=False)  # what was done, for the user
