"""The layers stay layers: imports go one way, objects come from config by parameter name, the pipeline has its own
run directory and reads the command line's overrides by key."""

from __future__ import annotations

import ast
from collections import defaultdict

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from .conftest import CONF, ROOT

SRC = ROOT / "src" / "billa"
# unit -> units it must never import (upward or sideways across layers)
FORBIDDEN = {
    "train": {"pipeline", "cli", "inspect_masks"},
    "data": {"model", "tokenizer.sample", "sample", "train", "pipeline"},
    "tokenizer": {"data", "sample", "train", "pipeline"},
    "model": {"train", "pipeline", "evaluate"},
    "evaluate": {"pipeline", "train", "cli"},
    "templates": {"data", "tokenizer"},
    "utils": {"data", "model", "train", "pipeline", "evaluate", "tokenizer"},
}


def _unit_imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        unit = path.relative_to(SRC).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("billa."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("billa.")]
            for name in names:
                target = name.split(".")[1]
                if target != unit:
                    edges[unit].add(target)
    return edges


def test_imports_go_one_way():
    """Bugs caught: the pipeline dispatched from inside training again (train -> pipeline -> train: the old circle),
    tokenizer/ reading corpora through data/, data/ reaching into model/, a circle between any two units."""
    edges = _unit_imports()
    assert {"data", "model", "train", "pipeline", "evaluate"} <= set(edges)  # the walk saw the package
    for unit, forbidden in FORBIDDEN.items():
        assert not edges.get(unit, set()) & forbidden, (unit, edges.get(unit, set()) & forbidden)
    circles = {tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, set())}
    assert not circles


def _compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "overrides,prefix",
    [([], "outputs/pretrain/"), (["stage=sft"], "outputs/sft/"), (["pipeline=billa"], "outputs/pipeline-billa/"),
     (["pipeline=skip_2"], "outputs/pipeline-skip_2/")],
)  # fmt: skip
def test_a_pipeline_run_gets_its_own_run_directory(overrides, prefix):
    """Bug caught: `pipeline=billa` writing pipeline.json under outputs/pretrain/<date>/, where a stage-1 run lives."""
    assert str(_compose_with_hydra(overrides).hydra.run.dir).startswith(prefix)


def test_pipeline_reads_overrides_by_key_not_by_prefix():
    """Bug caught: filtering command-line strings by prefix, which drops `stage_name=...`-like keys or keeps
    `+stage=...`; the pipeline must drop exactly the `pipeline` and `stage` choices it makes itself."""
    from billa.pipeline import _select

    overrides = [
        "pipeline=billa",
        "+stage=sft",
        "stage_name=x",
        "trainer.max_steps=3",
        "pipelines_note=1",
        "model=tiny",
    ]
    kept = _select(overrides, lambda key: key not in ("pipeline", "stage"))
    assert kept == ["stage_name=x", "trainer.max_steps=3", "pipelines_note=1", "model=tiny"]


def test_a_new_data_option_is_one_parameter_and_one_yaml_line(compose, sample_tokenizer_dir):
    """Every key of the `data:` node reaches BillaDataModule by name (no hand-written list in between): a key the
    DataModule lacks is refused by its signature, and every parameter it has is settable from the YAML.

    Bug caught: a `data.*` option that is composed but never handed to the data module (an option with no effect)."""
    import inspect

    from billa.config import ConfigError
    from billa.data.datamodule import BillaDataModule
    from billa.train import stage_datamodule

    cfg = compose(["data.num_proc=3", "data.layout=pack", "data.val_max_records=5"])
    datamodule = stage_datamodule(cfg, sample_tokenizer_dir)
    assert (datamodule.num_proc, datamodule.layout, datamodule.val_max_records) == (3, "pack", 5)
    params = set(inspect.signature(BillaDataModule).parameters)
    yaml_keys = {k for k in cfg.data if not k.startswith("_")}
    assert yaml_keys <= params  # every YAML key is a parameter
    with pytest.raises(ConfigError, match=r"`data.no_such_option` is not an option of .*BillaDataModule.*num_proc"):
        stage_datamodule(compose(["+data.no_such_option=1"]), sample_tokenizer_dir)
