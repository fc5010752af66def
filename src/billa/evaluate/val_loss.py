"""Validation loss of a model on every source of a training data config, per source and per source kind.

The pipeline's final score (``pipeline.json``'s ``validation``) and ``python evaluate.py task=val_loss``. The data
module is the training one, built from the same ``data:`` node of ``conf/train.yaml`` (so ``data.on_error``, the
stage's translation newline and every reader option are training's own), and every token is scored by the same
function as training's validation (``billa.model.loss.labelled_token_nll``): for the sources of a stage's mix the
losses equal that stage's ``val/loss/<source>`` on the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from billa.config import complete
from billa.data.collate import PadCollator
from billa.data.readers import record_kind
from billa.evaluate.lm import EvalLM
from billa.evaluate.results import Table, TaskResult
from billa.model.loss import labelled_token_nll
from billa.utils.compose import compose

EVAL_OBJECTIVES = {  # the objective each record kind trains with in its own stage
    "text": "conditional_generation",
    "translation": "translation",
    "task": "task",
    "instruction": "dialogue",
}


def validation_examples(lm: EvalLM, overrides: list[str], objectives: Mapping[str, str]):
    """The data module of ``train.yaml`` composed with ``overrides``, over every source with a validation split."""
    cfg = compose("train", list(overrides))
    with_val = [name for name, spec in cfg.data.sources.items() if spec.get("val")]
    runtime = {"tokenizer_dir": lm.path, "micro_batch_size": lm.batch_size, "num_samples": 1, "seed": cfg.seed}
    datamodule = complete(
        cfg.data, runtime, key="data", mix={name: 1 for name in with_val}, objectives=dict(objectives)
    )
    if datamodule.build is not None:
        datamodule.build()
    return datamodule, datamodule.setup_validation()


@torch.no_grad()
def loss_by_kind(lm: EvalLM, overrides: list[str] = (), objectives: Mapping[str, str] = EVAL_OBJECTIVES) -> TaskResult:
    """Token-weighted validation loss of ``lm`` per source, per source kind and over all sources.

    Args:
        lm: the model (its directory holds the tokenizer it was trained with).
        overrides: ``train.py`` overrides that choose the data config (``stage=sft``, ``data=billa``,
            ``data.on_error=skip``...); the pipeline passes those of its final stage.
        objectives: record kind -> objective; each kind with the objective of the stage that trains it, so every
            variant of an ablation is scored on the same examples.

    Returns:
        metrics ``<source>/loss``, ``kind/<kind>/loss``, ``loss`` and ``ppl``; details ``by_source``
        (``{name: {loss, tokens, kind}}``), ``by_kind``, ``overall`` and ``ppl`` (the pipeline's ``validation``).
    """
    datamodule, rows = validation_examples(lm, overrides, objectives)
    collate = PadCollator(datamodule.pad_id)
    totals: dict[str, list[float]] = {}  # source -> [NLL sum, tokens]
    for start in range(0, len(rows), lm.batch_size):
        batch = collate(rows[start : start + lm.batch_size])
        tensors = {k: batch[k].to(lm.device) for k in ("input_ids", "attention_mask", "labels")}
        nll, row_of = labelled_token_nll(lm.model, tensors)
        sums = torch.zeros(len(batch["source"]), dtype=torch.float64).index_add_(0, row_of.cpu(), nll.double().cpu())
        counts = torch.bincount(row_of.cpu(), minlength=len(batch["source"]))
        for row, name in enumerate(batch["source"]):
            total = totals.setdefault(name, [0.0, 0])
            total[0] += float(sums[row])
            total[1] += int(counts[row])
    return _result(totals, datamodule.sources)


def _result(totals: dict[str, list[float]], sources: Mapping[str, Mapping]) -> TaskResult:
    def kind(name: str) -> str:
        return sources[name].get("kind") or record_kind(sources[name]["format"])

    by_source = {
        name: {"loss": nll / max(tokens, 1), "tokens": tokens, "kind": kind(name)}
        for name, (nll, tokens) in sorted(totals.items())
    }
    kinds: dict[str, list[float]] = {}
    for name, (nll, tokens) in totals.items():
        kind_total = kinds.setdefault(kind(name), [0.0, 0])
        kind_total[0] += nll
        kind_total[1] += tokens
    all_nll, all_tokens = sum(t for t, _ in totals.values()), sum(n for _, n in totals.values())
    overall = all_nll / max(all_tokens, 1)
    details = {
        "by_source": by_source,
        "by_kind": {k: nll / max(tokens, 1) for k, (nll, tokens) in sorted(kinds.items())},
        "overall": overall,
        "ppl": math.exp(min(overall, 30)),
    }
    metrics = {f"{name}/loss": s["loss"] for name, s in by_source.items()}
    metrics |= {f"kind/{k}/loss": v for k, v in details["by_kind"].items()}
    metrics |= {"loss": overall, "ppl": details["ppl"]}
    rows = [[name, s["kind"], s["tokens"], s["loss"]] for name, s in by_source.items()]
    rows += [[f"kind:{k}", k, int(kinds[k][1]), v] for k, v in details["by_kind"].items()]
    rows.append(["all", "", int(all_tokens), overall])
    return TaskResult(metrics=metrics, tables={"val_loss": Table(["source", "kind", "tokens", "loss"], rows)},
                      details=details)  # fmt: skip
