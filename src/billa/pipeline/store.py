"""The stage store: one directory per trained stage, named by a key of everything that determines its result.

A stage's key hashes the resolved stage config (without output paths, loggers and progress settings), the content
of every data file it reads and the key of the stage it starts from. So a directory holding ``DONE.json`` is a
finished stage that any pipeline with the same key reuses (sweeps that share stage 1 train it once); any change
upstream gives a new key; a directory without ``DONE.json`` but with checkpoints is a stage to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from billa.data.cache import file_fingerprint
from billa.data.readers import expand_paths

DONE = "DONE.json"
# Keys that name where a run writes or how it reports, not what it trains: left out of a stage's key.
_NOT_IN_KEY = ("output_dir", "export", "logger", "resume", "ckpt_path", "prepare_only", "stop_after_steps", "pipeline")
_NOT_IN_KEY_TRAINER = ("enable_progress_bar", "log_every_n_steps")


def digest(payload: object) -> str:
    """A short stable hash of a JSON-able payload (16 hex digits)."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def data_fingerprints(cfg: DictConfig) -> dict:
    """Content hashes of every file the stage reads (hashed once per file; see billa.data.cache.file_fingerprint)."""
    if cfg.data.get("build"):
        instantiate(cfg.data.build)()  # the sample data is built on first use
    cache_root = Path(cfg.data.token_cache_dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    prints = {}
    for name in cfg.data.mix:
        spec = cfg.data.sources[name]
        for split in ("train", "val"):
            if spec.get(split):
                files = expand_paths(spec[split], f"data.sources.{name}.{split}")
                prints[f"{name}/{split}"] = [file_fingerprint(f, cache_root) for f in files]
    return prints


def stage_key(cfg: DictConfig, parent_key: str | None) -> str:
    """What determines a stage's result: resolved config (minus paths and loggers), data content, the parent stage."""
    resolved = OmegaConf.to_container(cfg, resolve=False)
    resolved = {k: v for k, v in resolved.items() if k not in _NOT_IN_KEY}
    resolved["trainer"] = {k: v for k, v in resolved["trainer"].items() if k not in _NOT_IN_KEY_TRAINER}
    return digest(
        {
            "config": OmegaConf.to_container(OmegaConf.create(resolved), resolve=True),
            "data": data_fingerprints(cfg),
            "parent": parent_key,
        }
    )


@dataclass(frozen=True)
class StageDir:
    """One stage's directory in the store."""

    path: Path

    @property
    def done(self) -> dict | None:
        """The finished stage's summary, or None while it is unfinished."""
        done = self.path / DONE
        return json.loads(done.read_text()) if done.is_file() else None

    @property
    def resumable(self) -> bool:
        """A started stage: checkpoints exist (``resume=auto`` continues from the newest complete one)."""
        checkpoints = self.path / "checkpoints"
        return checkpoints.is_dir() and any(checkpoints.iterdir())

    def finish(self, summary: dict) -> None:
        """Write ``DONE.json`` last and atomically: a stage without it is unfinished."""
        tmp = (self.path / DONE).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(self.path / DONE)


class StageStore:
    """Finished and unfinished stages under ``root`` (``pipeline.store_dir``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def stage(self, step_name: str, stage: str, key: str) -> StageDir:
        return StageDir(self.root / f"{step_name}-{stage}-{key}")

    def vocab(self, node: dict) -> Path:
        """The directory of an ``expand_vocab`` op's output, keyed by the op's resolved node."""
        return self.root / f"vocab-{digest(node)}"
