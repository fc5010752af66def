"""Mixing: BiLLa's integer-weight round robin, so that source ratios hold exactly inside every global batch.

A cycle holds each source ``weight`` times, interleaved (4:4:2 -> zh en tr zh en zh en tr zh en). Sample ``i`` of the
stream is slot ``i % len(cycle)``; within a source, samples are taken in a seeded permutation that is redrawn each
time the source is exhausted. The stream is a pure function of ``i``, so ranks can take disjoint shares of it and a
resumed run can start at any sample.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache

import numpy as np
from torch.utils.data import Dataset, Sampler

from billa.data.objectives import IGNORE, Example
from billa.utils.errors import EmptyDataError


def label_tokens(labels) -> int:
    """Tokens that carry a loss in one sample: ``labels[1:]`` not ignored (position t predicts token t + 1).

    The same count in both layouts: packing masks the first label of every sample after the first in a row, which is
    the sample's own ``labels[0]``, never a predicted position.
    """
    return int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE))


def round_robin_cycle(weights: Mapping[str, int]) -> list[str]:
    """Interleave sources so that each appears ``weight`` times, spread evenly (smooth weighted round robin)."""
    slots = [((k + 0.5) / w, order, name) for order, (name, w) in enumerate(weights.items()) for k in range(w)]
    return [name for _, _, name in sorted(slots)]


class MixSchedule:
    """Which source each sample of the stream comes from, and how many times that source was drawn before it.

    ``mode="round_robin"`` (BiLLa): integer weights, exact ratios in every cycle. ``mode="probability"``: each sample's
    source is drawn with probability proportional to its weight (a seeded draw for the whole stream). Either way a
    pure function of the sample index, independent of the sources' contents.
    """

    def __init__(self, weights: Mapping[str, float], num_samples: int, seed: int, mode: str = "round_robin"):
        if mode not in ("round_robin", "probability"):
            raise ValueError(f"data.mix_mode={mode!r}: expected round_robin or probability")
        self.weights, self.num_samples, self.mode = dict(weights), num_samples, mode
        if mode == "round_robin":
            self.cycle = round_robin_cycle(self.weights)
            # occurrence of each slot's source before it in the cycle: slot -> k-th time this source appears
            self._rank_in_cycle = [self.cycle[:slot].count(name) for slot, name in enumerate(self.cycle)]
        else:
            names = list(self.weights)
            p = np.array([self.weights[n] for n in names], dtype=np.float64)
            draw = np.random.default_rng([seed, 0x6D6978]).choice(len(names), size=num_samples, p=p / p.sum())
            self._names = names
            self._source_of = draw.astype(np.int16)
            self._occurrence = np.empty(num_samples, dtype=np.int64)
            for k in range(len(names)):
                where = np.nonzero(draw == k)[0]
                self._occurrence[where] = np.arange(len(where))

    def locate(self, index: int) -> tuple[str, int]:
        """(source name, occurrence): sample ``index`` is the ``occurrence``-th sample drawn from that source."""
        if self.mode == "probability":
            return self._names[self._source_of[index]], int(self._occurrence[index])
        cycle_no, slot = divmod(index, len(self.cycle))
        name = self.cycle[slot]
        return name, cycle_no * self.weights[name] + self._rank_in_cycle[slot]

    def occurrences(self, name: str, n: int) -> int:
        """How many of the first ``n`` samples come from ``name``."""
        if self.mode == "probability":
            n = min(n, self.num_samples)
            return int(np.count_nonzero(self._source_of[:n] == self._names.index(name)))
        full, rest = divmod(n, len(self.cycle))
        return full * int(self.weights[name]) + self.cycle[:rest].count(name)


class MixedDataset(Dataset):
    """``num_samples`` samples drawn from per-source example lists, by round robin or by probability (``MixSchedule``).

    With ``step_size`` (the global batch), every sample also carries ``step_label_tokens``: the number of label
    tokens in its whole optimizer step (all micro batches, all ranks). With ``group_size`` as well
    (``loss.normalization=rank_token_mean``), it carries ``group_label_tokens``: the label tokens of its group, the
    contiguous block of ``group_size`` samples of its step it belongs to (BiLLa's batch of one GPU).

    A source is a ``StreamSource`` (read in file order: the ``k``-th draw is its ``k``-th row, ``data.stream``) or a
    tokenised list read in a seeded permutation that is redrawn each time the source is exhausted.
    """

    def __init__(
        self,
        sources: Mapping[str, Sequence],
        weights: Mapping[str, float],
        num_samples: int,
        seed: int,
        mode: str = "round_robin",
        step_size: int | None = None,
        group_size: int | None = None,
    ):
        empty = [name for name in weights if not hasattr(sources.get(name), "at") and not sources.get(name)]
        if empty:
            raise EmptyDataError(
                f"data.mix: sources {empty} have no usable examples; every source in data.mix needs at least one"
            )
        self.schedule = MixSchedule(weights, num_samples, seed, mode)
        self.sources = sources
        self.weights = dict(weights)
        self.mode = mode
        self.num_samples = num_samples
        self.seed = seed
        self.step_size = step_size
        if group_size is not None and (not step_size or step_size % group_size):
            raise ValueError(f"loss group of {group_size} samples does not divide the global batch of {step_size}")
        self.group_size = group_size

    def __len__(self) -> int:
        return self.num_samples

    @lru_cache(maxsize=64)  # noqa: B019 - the dataset lives as long as the run; a few permutations per source
    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        salt = zlib.crc32(name.encode())  # stable across processes, unlike hash()
        return np.random.default_rng([self.seed, salt, epoch]).permutation(len(self.sources[name]))

    def locate(self, index: int) -> tuple[str, int]:
        """(source name, example index within the source) of stream sample ``index``."""
        name, example_index, _ = self.locate_visit(index)
        return name, example_index

    def locate_visit(self, index: int) -> tuple[str, int, int]:
        """(source name, example index, visit) of stream sample ``index``; visit = how many times the source was
        exhausted before (its epoch), so a record's random choices are redrawn on every pass over its source. For a
        stream source the example index is the row of this stage's stream (its epoch is found in the stream)."""
        name, occurrence = self.schedule.locate(index)
        if hasattr(self.sources[name], "at"):
            return name, occurrence, 0
        epoch, within = divmod(occurrence, len(self.sources[name]))
        return name, int(self._permutation(name, epoch)[within]), int(epoch)

    def _sample(self, index: int) -> dict:
        name, example_index, visit = self.locate_visit(index)
        source = self.sources[name]
        if hasattr(source, "at"):  # a StreamSource: its own epochs and per-visit draws
            return {**source.at(example_index), "source": name}
        if hasattr(source, "example"):  # a VariantSource: the record's random choices are drawn for this visit
            return {**source.example(example_index, visit), "source": name}
        example = source[example_index]
        if isinstance(example, Example):
            return {"input_ids": example.input_ids, "labels": example.labels, "source": name}
        return {"input_ids": example["input_ids"], "labels": example["labels"], "source": name}  # an Arrow row

    @lru_cache(maxsize=4)  # noqa: B019 - every micro batch of a step asks for the same total
    def step_label_tokens(self, step: int) -> int:
        """Label tokens of optimizer step ``step``: samples ``[step x step_size, (step + 1) x step_size)``.

        The stream is a pure function of the index, so every rank and every micro batch of a step computes the same
        total without communicating: the loss of each micro batch is divided by it (``BillaLM.training_step``).
        """
        indices = range(step * self.step_size, min((step + 1) * self.step_size, len(self)))
        return sum(label_tokens(self._sample(i)["labels"]) for i in indices)

    @lru_cache(maxsize=4)  # noqa: B019 - every micro batch of a step asks for the same totals
    def group_label_tokens(self, step: int) -> tuple[int, ...]:
        """Label tokens of each group of ``group_size`` consecutive samples of optimizer step ``step``."""
        first = step * self.step_size
        groups = range(first, min(first + self.step_size, len(self)), self.group_size)
        return tuple(
            sum(label_tokens(self._sample(i)["labels"]) for i in range(start, min(start + self.group_size, len(self))))
            for start in groups
        )

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        sample = self._sample(index)
        if self.step_size:
            step, within = divmod(index, self.step_size)
            sample["step_label_tokens"] = self.step_label_tokens(step)
            if self.group_size:
                sample["group_label_tokens"] = self.group_label_tokens(step)[within // self.group_size]
        return sample


class StreamSampler(Sampler[int]):
    """This rank's share of the stream ``[start, num_samples)`` in blocks of ``block`` (the micro batch).

    The stream is walked in rounds of ``world_size x block`` samples; in each round rank ``r`` takes the block
    ``[r x block, (r + 1) x block)``. Ranks get disjoint shares that together cover every index once, and each micro
    batch is a contiguous slice of the round-robin stream: when the micro batch is a multiple of the mix cycle
    (BiLLa: 20 = 10 LM/translation + 10 task), every micro batch holds the exact ratio; otherwise every global batch
    that is a multiple of the cycle does. ``start`` is the number of samples all ranks consumed before a resume
    (optimizer steps x global batch), so a resumed run continues with exactly the batches of an uninterrupted one.
    Dataloader workers split this rank's batches between them (disjoint, complete) as usual.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, start: int = 0, block: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if start % (world_size * block):
            raise ValueError(f"resume position {start} is not a whole number of rounds of {world_size} x {block}")
        self.num_samples, self.rank, self.world_size, self.start, self.block = (
            num_samples,
            rank,
            world_size,
            start,
            block,
        )

    def __iter__(self) -> Iterator[int]:
        round_size = self.world_size * self.block
        for round_start in range(self.start, self.num_samples, round_size):
            first = round_start + self.rank * self.block
            yield from range(first, min(first + self.block, self.num_samples))

    def __len__(self) -> int:
        """This rank's share of the whole stream, from sample 0 even after a resume: Lightning restores how many
        batches of the epoch were already done and runs ``len - done`` more, which are exactly the batches ``__iter__``
        yields from ``start``. (Counting only what is left ended a resumed epoch early, and the next epoch replayed
        the batches after the resume point.)"""
        round_size = self.world_size * self.block
        full, rest = divmod(self.num_samples, round_size)
        return full * self.block + min(self.block, max(0, rest - self.rank * self.block))

    def remaining(self) -> int:
        """Indices ``__iter__`` yields: this rank's share of ``[start, num_samples)``."""
        round_size = self.world_size * self.block
        full, rest = divmod(max(0, self.num_samples - self.start), round_size)
        return full * self.block + min(self.block, max(0, rest - self.rank * self.block))
