"""The model under evaluation: load an exported HF directory once, then score and generate in batches.

Everything a task needs from a model goes through ``EvalLM``: per-token log-likelihoods of (input_ids, labels)
sequences (perplexity), log P(continuation | context) as lm-evaluation-harness computes it (multiple choice), and
batched greedy or sampled generation (generative multiple choice, answers). Batches are sorted by length so padding
is small; every result is returned in input order and does not depend on the batch size.
"""

from __future__ import annotations

import glob
import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from billa.config import ConfigError
from billa.data.objectives import IGNORE
from billa.model.loss import labelled_token_nll
from billa.utils.logging import get_logger

log = get_logger(__name__)

PRECISION_DTYPES = {  # hardware.precision -> weights dtype for inference ("mixed": weights in that dtype)
    "32-true": torch.float32,
    "32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}


def find_export(model_path: str | None, pretrained_path: str | None, exports_glob: str) -> Path:
    """The HF model directory to evaluate.

    ``model_path`` when set; else ``model.pretrained_path``; else the newest ``<exports_glob>`` directory holding a
    ``config.json`` (what ``python train.py`` writes as ``outputs/<stage>/<date>/hf``).

    Raises:
        FileNotFoundError: naming ``model_path`` when nothing is found.
    """
    if model_path:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model_path={model_path}: not a Hugging Face model directory (no config.json); point model_path at "
                "an export such as outputs/<stage>/<date>/hf"
            )
        return path
    if pretrained_path:
        return find_export(pretrained_path, None, exports_glob)
    exports = [Path(p) for p in glob.glob(exports_glob) if Path(p, "config.json").is_file()]
    if not exports:
        raise FileNotFoundError(
            f"model_path is not set and no export matches {exports_glob!r} (run `python train.py` first, which writes "
            "outputs/<stage>/<date>/hf), or pass model_path=<HF model directory>"
        )
    newest = max(exports, key=lambda p: (Path(p, "config.json").stat().st_mtime, str(p)))
    log.info("model_path not set: evaluating the newest export %s", newest)
    return newest


def _device_map(accelerator: str, devices: int) -> tuple[str | dict | None, torch.device]:
    """Where the weights go: CPU, one GPU, or (devices > 1) split layer-wise over the first ``devices`` GPUs."""
    if accelerator == "cpu":
        return None, torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"hardware.accelerator={accelerator!r} but no CUDA device is visible; use hardware=cpu")
    if devices > torch.cuda.device_count():
        raise ConfigError(f"hardware.devices={devices} but only {torch.cuda.device_count()} GPUs are visible")
    if devices == 1:
        return None, torch.device("cuda:0")
    # a 7B model in bf16 (13.7 GB) is split by layers over the GPUs (accelerate's device_map); inputs enter on GPU 0
    return "auto", torch.device("cuda:0")


@dataclass
class EvalLM:
    """A loaded causal LM + tokenizer with batched scoring and generation.

    Attributes:
        model: the HF causal LM (eval mode).
        tokenizer: its tokenizer (``AutoTokenizer`` of the same directory).
        device: where inputs go.
        batch_size: sequences per forward pass.
        max_length: the longest sequence the model takes (its ``max_position_embeddings`` unless set).
        add_bos: start every sequence with BOS (how billa trains; lm-evaluation-harness ``add_bos_token=True``).
        name: the model id written into outputs (directory name by default).
        path: the model directory.
        share_prefix: score the options of a question from one pass over their shared context (KV cache).
    """

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    batch_size: int
    max_length: int
    add_bos: bool = True
    name: str = "model"
    path: str = ""
    share_prefix: bool = True

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.unk_token_id or 0)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (BOS first when ``add_bos``), no EOS."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        use_bos = self.add_bos if bos is None else bos
        return [self.tokenizer.bos_token_id, *ids] if use_bos else ids

    def _batches(self, order: list[int], desc: str | None) -> Iterator[list[int]]:
        progress = tqdm(total=len(order), desc=desc, unit="seq", disable=desc is None or len(order) < 2)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            yield chunk
            progress.update(len(chunk))
        progress.close()

    def _right_padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def token_nll(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str | None = None) -> list:
        """Negative log-likelihood (nats) of every labelled token, per example.

        Args:
            examples: (input_ids, labels) pairs as the objectives build them (label -100: not scored).

        Returns:
            one float64 tensor per example: the NLL of each target token, in order.
        """
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
        out: list = [None] * len(examples)
        for chunk in self._batches(order, desc):
            ids, mask = self._right_padded([examples[i][0] for i in chunk])
            labels = torch.full_like(ids, IGNORE)  # (B, T)
            for row, i in enumerate(chunk):
                labels[row, : len(examples[i][1])] = torch.as_tensor(examples[i][1], dtype=torch.long)
            nll, rows = labelled_token_nll(self.model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
            per_row = nll.double().cpu().split(torch.bincount(rows, minlength=len(chunk)).tolist())  # row-major order
            for row, i in enumerate(chunk):
                out[i] = per_row[row]
        return out

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness's split of (context, continuation) into token ids.

        Trailing spaces of the context move to the continuation; ``context + continuation`` is encoded as one string
        and the continuation's tokens are those past the context's own token count. (Encoding ``" " + option`` on its
        own would add a word-boundary piece the model never sees after the prompt, and change every score.)
        """
        if context == "":
            return [self.tokenizer.bos_token_id], self.encode(continuation, bos=False)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids) :]

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str | None = None) -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding would produce it, per (context, continuation).

        Scored as lm-evaluation-harness's ``HFLM._loglikelihood_tokens``: the input is ``(context + continuation)``
        left-truncated to ``max_length + 1`` tokens minus its last token; the continuation's log-probabilities are
        summed in fp32. Longest first, right padding: results do not depend on the batch size.
        """
        pairs = [self.encode_pair(c, k) for c, k in requests]
        return self.loglikelihood_tokens(pairs, desc)

    @torch.no_grad()
    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], desc: str | None = None
    ) -> list[tuple[float, bool]]:
        """``loglikelihood`` on already encoded (context_ids, continuation_ids) pairs.

        With ``share_prefix`` the options of one question are scored from one pass over their common context: its
        key/value cache is reused for every continuation (the same tokens and positions, so the same scores up to
        float rounding, at a fraction of the FLOPs). Pairs that lm-evaluation-harness would left-truncate take the
        plain path.
        """
        out: list = [None] * len(pairs)
        fits = [len(ctx) + len(cont) <= self.max_length + 1 and len(ctx) > 0 for ctx, cont in pairs]
        plain = [i for i in range(len(pairs)) if not (self.share_prefix and fits[i])]
        if plain:
            for i, result in zip(plain, self._loglikelihood_plain([pairs[i] for i in plain], desc), strict=True):
                out[i] = result
        groups: dict[tuple, list[int]] = {}
        for i in range(len(pairs)):
            if self.share_prefix and fits[i]:
                groups.setdefault(tuple(pairs[i][0]), []).append(i)
        for chunk in self._group_batches(groups, desc):
            for i, result in self._loglikelihood_shared(chunk, pairs):
                out[i] = result
        return out

    def _score(self, logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """Sum of log-probabilities of ``cont`` under ``logits`` (C, V) and whether each token is the argmax."""
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (C, V)
        target = torch.as_tensor(cont, device=logprobs.device)
        return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())

    def _loglikelihood_plain(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str | None):
        """lm-evaluation-harness's own layout: one right-padded row per pair, longest first."""
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]
        order = sorted(range(len(pairs)), key=lambda i: (-len(inputs[i]), i))
        out: list = [None] * len(pairs)
        for chunk in self._batches(order, desc):
            ids, mask = self._right_padded([inputs[i] for i in chunk])
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            for row, i in enumerate(chunk):
                cont, end = pairs[i][1], len(inputs[i])
                out[i] = self._score(logits[row, end - len(cont) : end], cont)
        return out

    def _group_batches(self, groups: dict[tuple, list[int]], desc: str | None) -> Iterator[list[tuple]]:
        """Groups (context, pair indices), longest context first, packed so a batch holds <= batch_size options."""
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[0]), kv[1][0]))
        progress = tqdm(total=sum(len(v) for v in groups.values()), desc=desc, unit="option", disable=desc is None)
        chunk: list[tuple] = []
        for group in ordered:
            if chunk and sum(len(g[1]) for g in chunk) + len(group[1]) > self.batch_size:
                yield chunk
                progress.update(sum(len(g[1]) for g in chunk))
                chunk = []
            chunk.append(group)
        if chunk:
            yield chunk
            progress.update(sum(len(g[1]) for g in chunk))
        progress.close()

    def _loglikelihood_shared(self, chunk: list[tuple], pairs) -> list[tuple[int, tuple[float, bool]]]:
        """One forward over the chunk's contexts (with cache), one over all their continuations (minus last token)."""
        contexts = [list(context) for context, _ in chunk]
        ctx_ids, ctx_mask = self._right_padded(contexts)  # (G, Tc)
        last = sorted({len(c) - 1 for c in contexts})  # only each context's last position predicts an option token
        first = self.model(
            input_ids=ctx_ids, attention_mask=ctx_mask, use_cache=True, logits_to_keep=torch.tensor(last)
        )  # logits (G, len(last), V): not (G, Tc, V), which for a 7B model's vocabulary would be gigabytes
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        rows = [(g, i) for g, (_, members) in enumerate(chunk) for i in members]  # one row per option
        tails = [pairs[i][1][:-1] for _, i in rows]  # the continuation's tokens that are inputs
        out = []
        if any(tails):
            cache = getattr(first, "cache", None) or first.past_key_values  # transformers >= 5.2x calls it `cache`
            cache.batch_select_indices(torch.tensor([g for g, _ in rows]))  # (R, ...): one cache row per option
            # (CPU indices: with the model split over GPUs, the cache's layers live on different devices)
            tail_ids, tail_mask = self._right_padded([t or [self.pad_id] for t in tails])  # (R, Tk)
            tail_mask[[r for r, t in enumerate(tails) if not t]] = 0
            starts = torch.tensor([len(contexts[g]) for g, _ in rows], device=self.device)
            positions = starts[:, None] + torch.arange(tail_ids.shape[1], device=self.device)[None, :]  # (R, Tk)
            mask = torch.cat([ctx_mask[[g for g, _ in rows]], tail_mask], dim=1)  # (R, Tc + Tk)
            logits = self.model(
                input_ids=tail_ids, attention_mask=mask, position_ids=positions, **{cache_arg: cache}
            ).logits  # (R, Tk, V)
        for r, (g, i) in enumerate(rows):
            cont = pairs[i][1]
            at = last.index(len(contexts[g]) - 1)
            last_ctx = first.logits[g, at : at + 1]  # (1, V): predicts the option's first token
            both = torch.cat([last_ctx, logits[r, : len(cont) - 1]]) if len(cont) > 1 else last_ctx  # (C, V)
            out.append((i, self._score(both, cont)))
        return out

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        desc: str | None = None,
    ) -> list[str]:
        """Continuations of ``prompts`` (decoded, special tokens dropped), generated in left-padded batches.

        Prompts longer than ``max_length - max_new_tokens`` keep their last tokens (a warning says how many).
        Sampling is seeded per batch from ``seed`` and the batch's first prompt index.
        """
        encoded = [self.encode(p) for p in prompts]
        room = self.max_length - max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {self.max_length}")
        truncated = sum(len(e) > room for e in encoded)
        if truncated:
            log.warning(
                "%d of %d prompts were longer than %d tokens: kept their last tokens", truncated, len(encoded), room
            )
        encoded = [e[-room:] for e in encoded]
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        out: list = [None] * len(encoded)
        for chunk in self._batches(order, desc):
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # (B, T) left padded
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, width - len(encoded[i]) :] = torch.as_tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            kwargs = {"do_sample": do_sample}
            if do_sample:
                torch.manual_seed(seed * 1_000_003 + chunk[0])
                kwargs.update(temperature=temperature, top_p=top_p)
            generated = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **kwargs,
            )
            for row, i in enumerate(chunk):
                out[i] = self.tokenizer.decode(generated[row, width:], skip_special_tokens=True)
        return out


def load_lm(
    path: str | os.PathLike,
    accelerator: str = "cpu",
    devices: int = 1,
    precision: str = "32-true",
    batch_size: int = 8,
    max_length: int | None = None,
    add_bos: bool = True,
    name: str | None = None,
) -> EvalLM:
    """Load a HF model directory for evaluation on the configured hardware.

    Args:
        path: HF model directory (config.json, safetensors, tokenizer files).
        accelerator: ``hardware.accelerator`` (``cpu`` or ``gpu``).
        devices: ``hardware.devices``; more than one GPU splits the model by layers.
        precision: ``hardware.precision``; a key of ``PRECISION_DTYPES``.
        batch_size: sequences per forward pass.
        max_length: longest sequence fed to the model (default: its ``max_position_embeddings``).
        add_bos: start sequences with BOS.
        name: model id for outputs (default: the directory path).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(precision) not in PRECISION_DTYPES:
        raise ConfigError(f"hardware.precision={precision!r}: expected one of {sorted(PRECISION_DTYPES)}")
    dtype = PRECISION_DTYPES[str(precision)]
    device_map, device = _device_map(accelerator, devices)
    if device_map == "auto":
        max_memory = {i: torch.cuda.get_device_properties(i).total_memory for i in range(devices)}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = max_length or model.config.max_position_embeddings
    log.info("Loaded %s (%s, %s, %s parameters)", path, device, dtype, f"{model.num_parameters():,}")
    return EvalLM(model, tokenizer, device, batch_size, limit, add_bos, name or str(path), str(path))
