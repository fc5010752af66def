"""The LightningDataModule: sources (data/) x mix and objectives (stage/) -> mixed, tokenised batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from billa.config import ConfigError
from billa.data.cache import ObjectiveSettings, settings_key, tokenize_source
from billa.data.collate import PackCollator, PadCollator
from billa.data.mixing import MixedDataset, MixSchedule, StreamSampler
from billa.data.objectives import IGNORE, OBJECTIVES, load_prompts
from billa.data.packing import MASK, packed_layout
from billa.data.readers import expand_paths, record_kind
from billa.data.stream import (
    STATE_FILE,
    STREAM_FORMAT,
    STREAM_OBJECTIVES,
    Feeder,
    StreamSource,
    start_of,
    state_of,
    tokenise_file,
)
from billa.data.tokenise import UNMAPPED
from billa.tokenizer.load import load_tokenizer
from billa.utils.errors import EmptyDataError
from billa.utils.logging import get_logger

log = get_logger(__name__)

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[3] / "conf" / "prompts"


def _slice_bound(part: str, names: list[str]) -> int | None:
    """A slice bound: empty (open), an index into the sorted files, or a file name (the index of the first file whose
    name sorts at or after it: ``10017.jsonl`` starts where BiLLa's ``file_start: 10017`` does)."""
    part = part.strip()
    if not part:
        return None
    if "." in part:
        return sum(name < part for name in names)
    return int(part)


class BillaDataModule(L.LightningDataModule):
    """Reads every source the stage's mix names, applies the objective of its record kind, mixes by round robin.

    Built from the ``data:`` node of ``conf/train.yaml`` (``_target_`` + ``_partial_: true``): every key of that node
    is a parameter here, and ``billa.train`` completes the partial with the run-time values by name
    (``tokenizer_dir``, ``micro_batch_size``, ``global_batch_size``, ``num_samples``, ``seed``, ``num_workers``).
    The defaults below are the only ones in code; a new option is one parameter here and one line in the YAML.

    Args:
        sources: ``data.sources``: name -> {kind, format, train, val, **reader options}.
        mix: ``data.mix``: name -> integer weight.
        objectives: ``data.objectives``: record kind -> objective name (a key of ``OBJECTIVES``).
        tokenizer_dir: HF tokenizer directory (with ``tokenizer.model``). Run time.
        max_seq_length: truncate every example to this many tokens.
        micro_batch_size: sequences per device per forward pass. Run time (the batch plan).
        num_samples: length of the training stream (max_steps x global batch). Run time.
        global_batch_size: sequences per optimizer step over all devices (for the resume position). Run time.
        seed: drives cut points, prompts, directions and the per-source permutations. Run time (``seed``).
        val_max_records: at most this many validation records per source.
        build: optional callable that creates the files (the sample corpus); run once on rank 0.
        prompts_dir: directory of ``*.prompt`` files (``data.prompts_dir``); default ``conf/prompts``. BiLLa's layout
            (``<type>.pre.prompt`` / ``<type>.post.prompt``) is read as it is.
        translation_extra_newline: stage 2's translation prefix, ``source.rstrip() + "\\n" + prompt + "\\n"``.
        num_workers: dataloader workers per device. Run time (``hardware.num_workers``).
        on_error: ``raise`` at the first malformed record (naming file and line), or ``skip``: count, report, log.
        token_cache_dir: where tokenised Arrow shards are kept (``billa.data.cache``).
        num_proc: tokenisation worker processes.
        layout: ``pad`` (truncate and pad each sample, BiLLa) or ``pack`` (several samples per row, see PackCollator).
        mix_mode: ``round_robin`` (integer weights, exact per cycle; BiLLa) or ``probability`` (weights as odds).
        slice: the stage's slice name (``data.slice``): a source with ``slices: {<name>: "start:stop"}`` trains
            on that range of its sorted train files only (stage 2 reads LM files stage 1 did not).
        prompt_types: ``data.prompt_types``: record ``type`` -> prompt-file stem, for types without their own files.
        prompt_language: ``data.prompt_language``: ``match`` draws a task prompt line from those in the record's
            language (the file's lines when it has none in it); ``any`` from every line.
        translation_prompts: ``data.translation_prompts``: ``en2zh`` / ``zh2en`` -> prompt file; default
            ``<prompts_dir>/translation.<direction>.prompt``.
        exact_mix_per_rank: every rank's micro batch holds the exact mix; checked against the batch plan by
            ``billa.config.validate`` before any data is read (the stream itself is the same either way).
        root: the directory the source paths of a data config are written under (``${data.root}``); logged only.
        streams_from: where the stream sources (``order: stream``, the default of text and translation sources) start:
            ``auto`` continues where the previous stage stopped reading them (``<init_from>/billa_data_state.json``,
            written beside every export), a path names such a file, null starts at their first file.
        init_from: the stage's starting HF directory (``init_from``). Run time.
        loss_group_size: ``loss.normalization=rank_token_mean``: every training sample carries the label tokens of
            its block of this many consecutive samples of the step (``MixedDataset``). Run time (``loss_grouping``).
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
        on_error: str = "raise",
        token_cache_dir: str | None = None,
        num_proc: int = 1,
        layout: str = "pad",
        mix_mode: str = "round_robin",
        slice: str | None = None,  # the YAML key data.slice (shadows the builtin only in here)
        prompt_types: Mapping[str, str] | None = None,
        prompt_language: str = "match",
        translation_prompts: Mapping[str, str] | None = None,
        exact_mix_per_rank: bool = False,
        root: str | None = None,
        streams_from: str | None = "auto",
        init_from: str | None = None,
        loss_group_size: int | None = None,
    ):
        super().__init__()
        # Global rank 0 tokenises first, alone: nodes sharing the cache on one file system would otherwise tokenise
        # the same files at once and pull each other's pieces away (``setup`` covers a node-local cache).
        self.prepare_data_per_node = False
        self.sources = {name: dict(spec) for name, spec in sources.items()}
        self.mix = dict(mix)
        self.objectives = dict(objectives)
        self.tokenizer_dir = tokenizer_dir
        self.max_seq_length = max_seq_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size or micro_batch_size
        self.loss_group_size = loss_group_size
        self.resume_samples = 0  # samples consumed before a resume (restored from the checkpoint)
        self.num_samples = num_samples
        self.seed = seed
        self.val_max_records = val_max_records
        self.build = build
        self.prompts_dir = prompts_dir or str(DEFAULT_PROMPTS_DIR)
        self.prompt_types = dict(prompt_types or {})
        if prompt_language not in ("match", "any"):
            raise ConfigError(
                f"data.prompt_language={prompt_language!r}: expected match (task prompt lines in the record's "
                "language) or any (every line of the prompt file, as BiLLa drew)"
            )
        self.prompt_language = prompt_language
        self.translation_prompts = dict(translation_prompts or {})
        self._prompts: dict[str, list[str]] | None = None
        self.translation_extra_newline = translation_extra_newline
        self.num_workers = num_workers
        self.on_error = on_error
        self.token_cache_dir = token_cache_dir or str(Path.home() / ".cache" / "billa" / "tokenized")
        self.num_proc = num_proc
        if layout not in ("pad", "pack"):
            raise ConfigError(f"`data.layout`={layout!r}: expected pad (BiLLa: one sample per row) or pack")
        self.layout = layout
        self.mix_mode = mix_mode
        self.data_slice = slice
        self.exact_mix_per_rank = exact_mix_per_rank
        self.root = root
        self.streams_from = streams_from
        self.init_from = init_from
        self._prefetch_to = 0  # prepare_only: tokenise up to the stage's last sample
        self.feeder: Feeder | None = None
        self.train_set: MixedDataset | None = None
        self.val_set: list[dict] | None = None
        self.stats: dict[str, dict] = {}

    def _settings(self, name: str) -> ObjectiveSettings:
        spec = self.sources[name]
        kind = spec.get("kind") or record_kind(spec["format"])
        objective = self.objectives.get(kind)
        if objective not in OBJECTIVES:
            raise KeyError(
                f"data.objectives.{kind}={objective!r} (needed by source {name!r}); "
                f"known objectives: {sorted(OBJECTIVES)}"
            )
        options = tuple(
            sorted(
                (k, v if not isinstance(v, list) else tuple(v))
                for k, v in spec.items()
                if k not in ("kind", "format", "train", "val", "slices", "order")
            )
        )
        types = tuple(sorted(self.prompt_types.items())) if objective in ("task", "dialogue") else ()
        return ObjectiveSettings(
            source=name,
            fmt=spec["format"],
            objective=objective,
            max_len=self.max_seq_length,
            seed=self.seed,
            translation_extra_newline=self.translation_extra_newline,
            reader_options=options,
            on_error=self.on_error,
            prompt_types=types,
            prompt_language=self.prompt_language if objective in ("task", "dialogue") else "match",
        )

    @property
    def prompts(self) -> dict[str, list[str]]:
        """The prompt set: ``prompts_dir``'s files and the translation prompt files, read once."""
        if self._prompts is None:
            self._prompts = load_prompts(self.prompts_dir, self.translation_prompts)
        return self._prompts

    def files(self, name: str, split: str) -> list[str]:
        """The files of a source's split; for ``train``, only the stage's slice of them (``data.slice``)."""
        key = f"data.sources.{name}.{split}"
        files = expand_paths(self.sources[name][split], key)
        slices = self.sources[name].get("slices") or {}
        if split != "train" or self.data_slice is None or self.data_slice not in slices:
            return files
        spec = str(slices[self.data_slice])
        names = [Path(f).name for f in files]
        try:
            start, stop = (_slice_bound(part, names) for part in spec.split(":"))
        except ValueError:
            raise ConfigError(
                f"data.sources.{name}.slices.{self.data_slice}={spec!r}: expected 'start:stop' with file indices "
                "(0:8) or file names (10017.jsonl: = from that file on, as BiLLa's file_start)"
            ) from None
        chosen = files[start:stop]
        if not chosen:
            raise ConfigError(
                f"data.sources.{name}.slices.{self.data_slice}={spec!r} selects no file: {key} has {len(files)} "
                f"files ({files[0]} ... {files[-1]}). Set the slice to this layout's file counts."
            )
        return chosen

    def streamed(self, name: str) -> bool:
        """Whether source ``name`` is read as a stream (file order, tokenised while training; ``data.stream``):
        ``data.sources.<name>.order``, by default ``stream`` for text and translation sources, ``shuffle`` else."""
        spec = self.sources[name]
        kind = spec.get("kind") or record_kind(spec["format"])
        order = spec.get("order") or ("stream" if kind in ("text", "translation") else "shuffle")
        if order not in ("stream", "shuffle"):
            raise ConfigError(f"data.sources.{name}.order={order!r}: expected stream (file order) or shuffle")
        if order == "stream" and self.objectives.get(kind) not in STREAM_OBJECTIVES:
            raise ConfigError(
                f"data.sources.{name}.order=stream: the objective {self.objectives.get(kind)!r} of its records is "
                f"not streamed (stream objectives: {', '.join(STREAM_OBJECTIVES)}); set order: shuffle"
            )
        return order == "stream"

    def state_path(self) -> str | None:
        """The data-state file the stream sources continue from (``data.streams_from``), or None."""
        if self.streams_from in (None, "none", "null"):
            return None
        if self.streams_from == "auto":
            path = Path(self.init_from or "", STATE_FILE)
            return str(path) if self.init_from and path.is_file() else None
        if not Path(self.streams_from).is_file():
            raise ConfigError(
                f"data.streams_from={self.streams_from}: no such file (expected a {STATE_FILE} written beside an "
                "export; auto: the init_from directory's, null: start at the first file)"
            )
        return str(self.streams_from)

    def _val_stream(self, name: str) -> StreamSource:
        """The validation split of stream source ``name``: its first ``val_max_records`` usable records in file
        order, tokenised now (in this process) as far as needed, never the whole split (PILE's val is 1.4 GB)."""
        from billa.data.tokenise import _Worker, tokenizer_spec

        files, settings = self.files(name, "val"), self._settings(name)
        root = Path(self.token_cache_dir) / name / settings_key(settings, self.tokenizer_dir, self.prompts)
        spec = tokenizer_spec(load_tokenizer(self.tokenizer_dir))
        source = StreamSource(
            name, files, settings, root / STREAM_FORMAT, (0, 1), self.prompts, spec["bos_id"], spec["eos_id"]
        )
        worker, rows = None, 0
        for index, path in enumerate(files):
            if rows >= self.val_max_records:
                break
            worker = worker or _Worker(spec, self.prompts)
            wanted = self.val_max_records - rows
            rows += tokenise_file(path, settings, str(source.file_dir(index)), worker=worker, max_rows=wanted)["rows"]
        if rows == 0:
            raise EmptyDataError(f"data.sources.{name}.val: no usable examples in {self.sources[name]['val']}")
        source.val_rows = min(rows, self.val_max_records)
        source.locate(source.val_rows - 1)  # read the pieces' markers: the split's stats
        self.stats[f"{name}/val"] = source.stats()
        return source

    def _stream(self, name: str) -> StreamSource:
        """Source ``name`` as a ``StreamSource``, starting where ``data.streams_from`` says."""
        import json

        from billa.data.tokenise import tokenizer_spec

        files = self.files(name, "train")
        start, state = (0, 1), self.state_path()
        entry = json.loads(Path(state).read_text())["sources"].get(name) if state else None
        if entry is not None:
            start = start_of(state, name, files, entry)
            if entry.get("epoch"):
                log.warning(
                    "%s: the previous stage read all of it (%d passes); this stage continues its stream, so its "
                    "records repeat",
                    name,
                    entry["epoch"],
                )
        settings = self._settings(name)
        root = Path(self.token_cache_dir) / name / settings_key(settings, self.tokenizer_dir, self.prompts)
        if not hasattr(self, "_spec"):
            self._spec = tokenizer_spec(load_tokenizer(self.tokenizer_dir))
        return StreamSource(
            name, files, settings, root / STREAM_FORMAT, start, self.prompts, self._spec["bos_id"], self._spec["eos_id"]
        )

    def streams_used(self) -> list[str]:
        """The sources of the mix read as streams."""
        return [name for name in self.mix if self.streamed(name)]

    def check_streams(self) -> None:
        """Resolve every stream source's files and start now, so that a data-state file or slice that does not fit
        the run stops it before any work (``billa: error:`` naming the file or key)."""
        for name in self.streams_used():
            self._stream(name)

    def _position(self) -> int:
        """Samples the stage has consumed: what the feeder keeps the tokenisation ahead of."""
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else 0
        return max(step * self.global_batch_size, self.resume_samples, self._prefetch_to)

    def start_feeder(self) -> Feeder:
        """Start tokenising the stream sources ahead of the trainer (one feeder per node's first process)."""
        if self.feeder is None:
            schedule = MixSchedule(self.mix, self.num_samples, self.seed, self.mix_mode)
            margin = 2 * self.global_batch_size  # the step being read and the next one

            def need(name: str, samples: int) -> int:
                return max(0, schedule.occurrences(name, min(samples + margin, self.num_samples)) - 1)

            sources = {name: self._stream(name) for name in self.mix if self.streamed(name)}
            if sources:
                self.feeder = Feeder(
                    sources, need, self._position, self._spec, self.prompts, self.num_proc, self.num_samples
                ).start()
        return self.feeder

    def _wait_for_streams(self, samples: int = 0) -> None:
        """Block until every stream source has its rows for the first ``samples`` samples (at least its first row)."""
        import time

        if self.feeder is None:
            return
        schedule = MixSchedule(self.mix, self.num_samples, self.seed, self.mix_mode)
        for name in self.feeder.sources:
            source = self._stream(name)
            row = max(0, schedule.occurrences(name, samples) - 1)
            while source.locate(row, block=False) is None:
                if self.feeder.error is not None:
                    raise self.feeder.error
                if not self.feeder.alive():
                    source.locate(row)  # the feeder finished: the rows are there (or a failure is raised)
                time.sleep(0.05)
            self.stats[f"{name}/train"] = source.stats()

    def teardown(self, stage: str | None = None) -> None:
        for name, source in (self.train_set.sources if self.train_set is not None else {}).items():
            if isinstance(source, StreamSource):
                self.stats[f"{name}/train"] = source.stats()  # the pieces read so far
        if self.feeder is not None:
            self.feeder.stop()
            self.feeder = None

    def data_state(self, samples: int) -> dict:
        """Where each stream source stopped after the stage's first ``samples`` samples: the next stage's start
        (``billa_data_state.json`` beside the export)."""
        schedule = MixSchedule(self.mix, self.num_samples, self.seed, self.mix_mode)
        sources = {}
        for name in self.mix:
            if self.streamed(name):
                stream = self.train_set.sources[name] if self.train_set is not None else self._stream(name)
                sources[name] = state_of(stream, schedule.occurrences(name, samples))
        return {"samples": samples, "sources": sources}

    def _tokenized(self, name: str, split: str):
        """The source's split, tokenised once into the Arrow cache (reused when nothing changed)."""
        dataset, stats = tokenize_source(
            self.files(name, split),
            self._settings(name),
            self.tokenizer_dir,
            self.prompts,
            self.token_cache_dir,
            self.num_proc,
            f"data.sources.{name}.{split}",
        )
        self.stats[f"{name}/{split}"] = stats
        if stats.get("skipped_malformed"):
            log.warning(
                "%s/%s: skipped %d malformed records (data.on_error=skip), e.g. %s",
                name,
                split,
                stats["skipped_malformed"],
                stats["skipped_examples"],
            )
        unmapped = {k.removeprefix(UNMAPPED): v for k, v in stats.items() if k.startswith(UNMAPPED)}
        if unmapped:
            log.warning(
                "%s/%s: task records of types with no prompt file trained without a prompt (data.prompt_types): %s",
                name,
                split,
                unmapped,
            )
        if stats.get("no_target_after_truncation"):
            log.warning(
                "%s/%s: %d records had no target token left after truncation to %d tokens; skipped",
                name,
                split,
                stats["no_target_after_truncation"],
                self.max_seq_length,
            )
        if len(dataset) == 0:
            raise EmptyDataError(f"data.sources.{name}.{split}: no usable examples in {self.sources[name][split]}")
        return dataset

    def _splits(self):
        for name in self.mix:
            yield name, "train"
            if self.sources[name].get("val"):
                yield name, "val"

    def prepare_data(self) -> None:
        """On global rank 0 (``setup`` then on every other node): build the sample corpus if configured, tokenise
        every shuffled source and every validation split into the cache, and start the stream sources' feeder,
        returning once each of them has its first rows (training starts while the feeder goes on)."""
        if self.build is not None:
            self.build()
        for name, split in self._splits():
            if not self.streamed(name):
                self._tokenized(name, split)
            elif split == "val":
                self._val_stream(name)
        self.start_feeder()
        self._wait_for_streams()

    def prepare_stage(self) -> None:
        """``prepare_only=true``: tokenise everything the stage reads (the stream sources up to the stage's last
        sample), then stop."""
        self._prefetch_to = self.num_samples
        self.prepare_data()
        self._wait_for_streams(self.num_samples)
        self.teardown()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        trainer = self.trainer
        if trainer is not None and trainer.num_nodes > 1:
            # After rank 0's pass: one rank per other node reuses the shared cache, or fills a node-local one, before
            # that node's other ranks read it.
            if trainer.node_rank > 0 and trainer.local_rank == 0:
                self.prepare_data()
            trainer.strategy.barrier("billa-node-token-cache")
        if trainer is not None and getattr(trainer, "local_rank", 0) == 0:
            self.start_feeder()  # every node tokenises ahead (a shared cache: the file claims keep them apart)
        train = {
            name: self._stream(name) if self.streamed(name) else self._tokenized(name, "train") for name in self.mix
        }
        self.train_set = MixedDataset(
            train,
            self.mix,
            self.num_samples,
            self.seed,
            self.mix_mode,
            step_size=self.global_batch_size,
            group_size=self.loss_group_size,
        )
        self.setup_validation()
        for name, source in train.items():
            if isinstance(source, StreamSource):
                source.locate(0)  # its first piece (prepare_data waited for it): the stats say what is ready
                self.stats[f"{name}/train"] = source.stats()
        log.info("Data: %s", {key: value["examples"] for key, value in self.stats.items()})

    def setup_validation(self) -> list[dict]:
        """The validation examples of every source in the mix (at most ``val_max_records`` each), tokenised once."""
        tokenizer = load_tokenizer(self.tokenizer_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        self.val_set = []
        for name, split in self._splits():
            if split == "val":
                if self.streamed(name):
                    val = self._val_stream(name)
                    rows = [val.at(q) for q in range(val.val_rows)]
                else:
                    val = self._tokenized(name, "val")
                    rows = [val.example(index, visit=0) for index in range(min(len(val), self.val_max_records))]
                for row in rows:
                    chars = label_characters(tokenizer, row["labels"])
                    self.val_set.append({**row, "source": name, "label_chars": chars})
        return self.val_set

    def train_dataloader(self) -> DataLoader:
        # The stream is already mixed and permuted; each rank takes its interleaved share from the resume position.
        # (Trainer(use_distributed_sampler=False): Lightning must not re-wrap this sampler.)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StreamSampler(len(self.train_set), rank, world, self.resume_samples, block=self.micro_batch_size)
        return DataLoader(
            self.train_set,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=PackCollator(self.pad_id, self.max_seq_length, mask=self._pack_mask())
            if self.layout == "pack"
            else PadCollator(self.pad_id),
            num_workers=self.num_workers,
        )

    def _pack_mask(self) -> bool:
        """Whether packed rows need the 4D mask: not on a GPU with SDPA or flash-attention (``data/packing.py``)."""
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        model = getattr(module, "model", None)
        if model is None:
            return True
        impl = getattr(model.config, "_attn_implementation", None)
        return packed_layout(trainer.strategy.root_device.type, impl) == MASK

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

    @property
    def val_sources(self) -> list[str]:
        """Names of the sources with a validation split, in mix order (the same list on every rank)."""
        return [name for name, split in self._splits() if split == "val"]

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the validation set: every ``world_size``-th example, padded to equal length.

        Every rank runs the same number of batches (ZeRO-3 forwards are collective); a padding example carries no
        label, so the summed metrics (``BillaLM.on_validation_epoch_end``) do not depend on the number of ranks.
        """
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(
            rank_share(self.val_set, rank, world),
            batch_size=self.micro_batch_size,
            shuffle=False,
            collate_fn=PadCollator(self.pad_id),
            num_workers=self.num_workers,
        )


def label_characters(tokenizer, labels) -> int:
    """Characters that the labelled tokens of one example (``labels[1:]`` not ignored) decode to."""
    ids = [int(t) for t in labels[1:] if t != IGNORE]
    return len(tokenizer.decode(ids, skip_special_tokens=True)) if ids else 0


def rank_share(examples: list[dict], rank: int, world_size: int) -> list[dict]:
    """Examples ``rank, rank + world_size, ...``, padded with label-free copies so every rank gets as many."""
    share = examples[rank::world_size]
    per_rank = -(-len(examples) // world_size)  # ceil
    if share or per_rank:
        filler = examples[0]
        padding = {**filler, "labels": [IGNORE] * len(filler["labels"]), "label_chars": 0}
        share = share + [padding] * (per_rank - len(share))
    return share
