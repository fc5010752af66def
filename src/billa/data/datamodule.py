"""The LightningDataModule: sources (data/) x mix and objectives (stage/) -> mixed, tokenised batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from billa.data.collate import PadCollator
from billa.data.mixing import MixedDataset, StreamSampler
from billa.data.objectives import OBJECTIVES, Example, ObjectiveContext, load_prompts, record_rng
from billa.data.readers import ReadStats, read_records, record_kind
from billa.tokenizer.load import load_tokenizer
from billa.utils.logging import get_logger

log = get_logger(__name__)

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[3] / "conf" / "prompts"


class BillaDataModule(L.LightningDataModule):
    """Reads every source the stage's mix names, applies the objective of its record kind, mixes by round robin.

    Args:
        sources: ``data.sources``: name -> {kind, format, train, val, **reader options}.
        mix: ``data.mix``: name -> integer weight.
        objectives: ``data.objectives``: record kind -> objective name (a key of ``OBJECTIVES``).
        tokenizer_dir: HF tokenizer directory (with ``tokenizer.model``).
        max_seq_length: truncate every example to this many tokens.
        micro_batch_size: sequences per device per forward pass.
        global_batch_size: sequences per optimizer step over all devices (for the resume position).
        num_samples: length of the training stream (max_steps x global batch).
        seed: drives cut points, prompts, directions and the per-source permutations.
        val_max_records: at most this many validation records per source.
        build: optional callable that creates the files (the sample corpus); run once on rank 0.
        prompts_dir: directory of ``*.prompt`` files; default ``conf/prompts``.
    """

    def __init__(
        self,
        sources: Mapping,
        mix: Mapping[str, int],
        objectives: Mapping[str, str],
        tokenizer_dir: str,
        max_seq_length: int,
        micro_batch_size: int,
        num_samples: int,
        global_batch_size: int | None = None,
        seed: int = 0,
        val_max_records: int = 1000,
        build: Callable[[], object] | None = None,
        prompts_dir: str | None = None,
        translation_extra_newline: bool = False,
        num_workers: int = 0,
    ):
        super().__init__()
        self.sources = {name: dict(spec) for name, spec in sources.items()}
        self.mix = dict(mix)
        self.objectives = dict(objectives)
        self.tokenizer_dir = tokenizer_dir
        self.max_seq_length = max_seq_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size or micro_batch_size
        self.resume_samples = 0  # samples consumed before a resume (restored from the checkpoint)
        self.num_samples = num_samples
        self.seed = seed
        self.val_max_records = val_max_records
        self.build = build
        self.prompts_dir = prompts_dir or str(DEFAULT_PROMPTS_DIR)
        self.translation_extra_newline = translation_extra_newline
        self.num_workers = num_workers
        self.train_set: MixedDataset | None = None
        self.val_set: list[dict] | None = None
        self.stats: dict[str, dict] = {}

    def prepare_data(self) -> None:
        if self.build is not None:
            self.build()

    def _context(self):
        tokenizer = load_tokenizer(self.tokenizer_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        return ObjectiveContext(
            encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            max_len=self.max_seq_length,
            prompts=load_prompts(self.prompts_dir),
            translation_extra_newline=self.translation_extra_newline,
        )

    def _examples(self, name: str, split: str, ctx: ObjectiveContext, limit: int | None = None) -> list[Example]:
        spec = self.sources[name]
        kind = spec.get("kind") or record_kind(spec["format"])
        objective_name = self.objectives.get(kind)
        if objective_name not in OBJECTIVES:
            raise KeyError(
                f"data.objectives.{kind}={objective_name!r} (needed by source {name!r}); "
                f"known objectives: {sorted(OBJECTIVES)}"
            )
        objective = OBJECTIVES[objective_name]
        options = {k: v for k, v in spec.items() if k not in ("kind", "format", "train", "val")}
        stats = ReadStats()
        examples, too_long = [], 0
        for record in read_records(spec[split], spec["format"], f"data.sources.{name}.{split}", stats, **options):
            example = objective(record.fields, ctx, record_rng(self.seed, name, record.where))
            if example is None:
                too_long += 1  # the prompt alone fills max_seq_length: counted and reported, never silent
            else:
                examples.append(example)
            if limit is not None and len(examples) >= limit:
                break
        self.stats[f"{name}/{split}"] = {
            "records": stats.read,
            "examples": len(examples),
            "filtered": stats.filtered,
            "no_target_after_truncation": too_long,
        }
        if too_long:
            log.warning(
                "%s/%s: %d records had no target token left after truncation to %d tokens; skipped",
                name,
                split,
                too_long,
                self.max_seq_length,
            )
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        ctx = self._context()
        train = {name: self._examples(name, "train", ctx) for name in self.mix}
        self.train_set = MixedDataset(train, self.mix, self.num_samples, self.seed)
        self.val_set = []
        for name in self.mix:
            if self.sources[name].get("val"):
                for example in self._examples(name, "val", ctx, self.val_max_records):
                    self.val_set.append({"input_ids": example.input_ids, "labels": example.labels, "source": name})
        log.info("Data: %s", {key: value["examples"] for key, value in self.stats.items()})

    def train_dataloader(self) -> DataLoader:
        # The stream is already mixed and permuted; each rank takes its interleaved share from the resume position.
        # (Trainer(use_distributed_sampler=False): Lightning must not re-wrap this sampler.)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StreamSampler(len(self.train_set), rank, world, start=self.resume_samples)
        return DataLoader(
            self.train_set,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=PadCollator(self.pad_id),
            num_workers=self.num_workers,
        )

    def state_dict(self) -> dict:
        """Saved in every checkpoint: where in the stream the run is (optimizer steps x global batch)."""
        step = self.trainer.global_step if self.trainer is not None else 0
        return {"consumed_samples": step * self.global_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning(
                "Resuming with seed %s; the checkpoint used %s: the data stream differs", self.seed, state["seed"]
            )
        self.resume_samples = int(state.get("consumed_samples", 0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.micro_batch_size,
            shuffle=False,
            collate_fn=PadCollator(self.pad_id),
            num_workers=self.num_workers,
        )
