"""One optimizer step computes the same thing however the global batch is split (the equivalence matrix).

Same seed, global batch 16, 8 steps of the tiny model, four ways:
A: one process, micro batch 16; B: one process, micro 8 x accumulation 2;
C: ZeRO-3, 2 ranks x micro 8; D: ZeRO-3, 2 ranks x micro 4 x accumulation 2.
B computes lm_head + loss in chunks of 64 label tokens (``loss_chunk_tokens``; a micro batch of 8 holds ~800), so
the matrix also checks the chunked, checkpointed loss; C runs it under ZeRO-3 (``HeadNLL``: one gather of lm_head per
pass, whatever each rank's chunk count).
Every micro batch of B, C and D is a slice of A's batch, the loss is a token mean over the whole step and the
gradient is that loss's, so per-step losses, gradient norms, validation metrics and final weights agree up to fp32
summation order. Tolerances are measured values x ~10: losses 1e-7 relative (measured <= 2e-7 -> 2e-6), gradient
norms 5e-5 relative (DeepSpeed sums the norm in another order; measured 5e-5 -> 5e-4), weights after 8 Adam steps at
lr 2e-3: 7e-5 absolute for every tensor but the embedding rows of tokens seen once or twice, whose gradient is near
Adam's eps, so fp32 noise moves their update (measured 5.8e-4 on one row of D) -> 1e-3, half an Adam step (one moves
a weight by up to 2e-3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .conftest import SHORT_RUN, ZERO3, compose_train, logged, train_cli, train_in_process

RUNS = "ABCD"
LOSS_RTOL = 2e-6
GRAD_NORM_RTOL = 5e-4
WEIGHT_ATOL = 1e-3
VAL_STEPS = [0, 3, 7]  # the step-0 baseline and validation after steps 4 and 8 (CSV step = optimizer step - 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, sample_tokenizer_dir, zero3_accumulation_run):
    out = {r: tmp_path_factory.mktemp(f"equivalence-{r}") for r in "ABC"}
    train_in_process(out["A"], cache_dir)
    train_in_process(out["B"], cache_dir, "hardware.micro_batch_size=8", "loss_chunk_tokens=64")
    # chunked under ZeRO-3: one gather of lm_head per pass whatever each rank's label count
    train_cli(out["C"], cache_dir, *ZERO3, "hardware.micro_batch_size=8", "loss_chunk_tokens=64")
    out["D"] = zero3_accumulation_run
    return out


def _assert_all_equal(runs, metric: str, steps: list[int], rtol: float) -> None:
    values = {r: logged(runs[r], metric) for r in RUNS}
    for r in RUNS:
        assert sorted(values[r]) == steps, (metric, r, values[r])
    for step in steps:
        reference = values["A"][step]
        for r in "BCD":
            assert values[r][step] == pytest.approx(reference, rel=rtol), (metric, step, r, values)


def test_initialisation_is_the_same_in_one_process_and_under_zero3(runs):
    """Step-0 validation (before any update) is the same for all four runs.

    Catches ZeRO-3 random init writing into already-partitioned (empty) parameters: the model then keeps PyTorch's
    default init (embedding std 1.0) and the step-0 loss differs by ~0.15.
    """
    for metric in ("val/loss", "val/loss/zh", "val/loss/en", "val/loss/translate"):
        _assert_all_equal(runs, metric, VAL_STEPS, LOSS_RTOL)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(runs["A"] / "hf"))
    # initializer_range 0.02 gives near-zero logits: a near-uniform prediction, loss ~ ln(vocabulary)
    assert logged(runs["A"], "val/loss")[0] == pytest.approx(math.log(vocab), abs=0.1)


def test_every_step_has_the_same_token_mean_loss(runs):
    """train/loss of every optimizer step agrees across micro batch, accumulation and rank splits.

    Catches a per-micro-batch mean loss (B and D differ from A by ~1e-3 relative), a train/loss that is one rank's
    last micro batch, and ranks reading the same data instead of disjoint shares.
    """
    _assert_all_equal(runs, "train/loss", list(range(8)), LOSS_RTOL)
    losses = logged(runs["A"], "train/loss")
    assert losses[7] < losses[0] - 0.5  # and it trains


def test_every_step_has_the_true_gradient_norm(runs):
    """train/grad_norm (what gradient clipping compares with 2.0) agrees; the first steps are clipped.

    Catches DeepSpeed dividing the gradient by the accumulation count a second time (D's norm is then exactly 0.5x
    A's, and clipping acts at an effective norm of 4.0).
    """
    _assert_all_equal(runs, "train/grad_norm", list(range(8)), GRAD_NORM_RTOL)
    assert logged(runs["A"], "train/grad_norm")[0] > 2.0  # gradient_clip_val=2.0 is active at step 1


def test_validation_metrics_do_not_depend_on_the_split(runs):
    """val/loss, val/loss/<source> and val/bpc/<source> agree at steps 0, 4 and 8 for all four runs."""
    for source in ("zh", "en", "translate"):
        _assert_all_equal(runs, f"val/bpc/{source}", VAL_STEPS, LOSS_RTOL)


def test_final_weights_agree(runs):
    """The exported models of all four runs are the same model (fp32 noise through 8 Adam steps)."""
    reference = load_file(runs["A"] / "hf" / "model.safetensors")
    for r in "BCD":
        weights = load_file(runs[r] / "hf" / "model.safetensors")
        assert set(weights) == set(reference)
        for name, tensor in reference.items():
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=f"{r}: {name}")


def test_validation_metrics_are_token_weighted_known_answers(runs, cache_dir, sample_tokenizer_dir):
    """The last val/loss, val/loss/<source> and val/bpc/<source> equal a direct computation with transformers.

    Every validation example's summed NLL from ``LlamaForCausalLM(..., labels=...)`` on the exported weights, summed
    per source and divided by the source's label tokens (loss) or by ln 2 x the characters its labelled tokens
    decode to (bits per character). Catches a row-weighted mean of per-batch means.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from billa.train import stage_datamodule

    cfg = compose_train(SHORT_RUN, output_dir=runs["A"], cache=cache_dir)
    datamodule = stage_datamodule(cfg, sample_tokenizer_dir)
    datamodule.setup("fit")
    model = AutoModelForCausalLM.from_pretrained(runs["A"] / "hf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(runs["A"] / "hf")
    totals: dict[str, list[float]] = {}
    for example in datamodule.val_set:
        labels = torch.as_tensor(np.asarray(example["labels"]))[None]  # (1, T)
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(input_ids=torch.as_tensor(np.asarray(example["input_ids"]))[None], labels=labels).loss.item()
        text = tokenizer.decode([t for t in example["labels"][1:] if t != -100], skip_special_tokens=True)
        total = totals.setdefault(example["source"], [0.0, 0, 0])
        total[0] += loss * n
        total[1] += n
        total[2] += len(text)
    assert set(totals) == {"zh", "en", "translate"} and all(t[1] > 0 and t[2] > 0 for t in totals.values())
    rel = 1e-5  # float32 logits vs the module's float32 cross-entropy, different batching
    assert logged(runs["A"], "val/loss")[7] == pytest.approx(
        sum(t[0] for t in totals.values()) / sum(t[1] for t in totals.values()), rel=rel
    )
    for source, (nll, tokens, chars) in totals.items():
        assert logged(runs["A"], f"val/loss/{source}")[7] == pytest.approx(nll / tokens, rel=rel)
        assert logged(runs["A"], f"val/bpc/{source}")[7] == pytest.approx(nll / math.log(2) / chars, rel=rel)
    zh, en = totals["zh"], totals["en"]
    assert zh[2] / zh[1] < en[2] / en[1]  # a Chinese token covers fewer characters than an English one
