"""BillaLM's loss equals transformers' own causal-LM loss, while lm_head only runs where labels exist."""

from __future__ import annotations

import pytest
import torch

from billa.model.module import BillaLM

from .helpers import TINY_ARCH, tiny_module

ARCH = {**TINY_ARCH, "max_position_embeddings": 64}


def _module() -> BillaLM:
    return tiny_module(ARCH, 97, seed=0)


def test_loss_and_gradients_equal_hf_loss_with_masked_labels():
    module = _module()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 97, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0  # padding
    labels = input_ids.clone()
    labels[:, :5] = -100  # a prompt / the part before a conditional-generation cut
    labels[attention_mask == 0] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    ours = module.model_step(batch)
    ours.backward()
    ours_grad = module.model.lm_head.weight.grad.clone()
    module.model.zero_grad()
    reference = module.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, module.model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_batch_without_targets_is_zero_not_nan():
    """A micro batch whose labels are all -100 (possible after truncation) adds nothing and breaks nothing.

    Under ZeRO-3 every rank must run backward through every parameter; the gradients must be zero, not missing/NaN.
    """
    module = _module()
    input_ids = torch.randint(3, 97, (2, 6))
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.full_like(input_ids, -100),
    }
    loss = module.model_step(batch)
    assert loss.item() == 0.0
    loss.backward()
    grads = {name: p.grad for name, p in module.model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_packed_rows_give_each_sample_the_loss_it_has_alone():
    """BillaLM's loss on packed rows (PackCollator) equals the loss of the same samples one per padded row.

    Labels include each sample's first token (a causal-LM sample), so a packed row would otherwise train the model to
    predict a sample's first token from the previous sample. Catches packing without its label masking (more label
    tokens, another loss), and ``token_nll`` ignoring the packed 4D mask or the restarting positions (attention across
    samples changes every sample but the first).
    """
    from billa.data.collate import PackCollator, PadCollator

    module = _module()
    module.model.eval()
    g = torch.Generator().manual_seed(2)
    items = []
    for n in (5, 9, 3, 12, 7):
        ids = [1, *torch.randint(3, 97, (n - 1,), generator=g).tolist()]
        items.append({"input_ids": ids, "labels": list(ids), "source": "en"})  # every token labelled, BOS too
    packed = PackCollator(pad_id=0, max_len=16)(items)
    padded = PadCollator(pad_id=0)(items)
    assert packed["input_ids"].shape[0] == 3 < len(items)  # 12+3, 9+5, 7: really packed
    with torch.no_grad():
        nll_packed, _ = module.token_nll(packed)
        nll_padded, rows = module.token_nll(padded)
    assert nll_packed.shape == nll_padded.shape == (sum(len(i["input_ids"]) - 1 for i in items),)
    torch.testing.assert_close(nll_packed.sum(), nll_padded.sum(), rtol=1e-5, atol=1e-5)
    # per sample: the padded rows' sums are the samples' own losses; the packed losses are a permutation of them
    per_sample = torch.zeros(len(items)).index_add_(0, rows, nll_padded)
    torch.testing.assert_close(nll_packed.sort().values, nll_padded.sort().values, rtol=1e-5, atol=1e-5)
    assert per_sample.min() > 0


def test_training_loss_is_normalised_by_the_steps_label_tokens():
    """training_step returns the micro batch's NLL sum / (step label tokens / (ranks x accumulation)).

    Two micro batches of very different label counts (accumulation 2): after Lightning's division by 2 their
    gradients add up to the gradient of the token mean over both. Catches a per-micro-batch mean, which weights a
    token of the short micro batch 4.5x more.
    """
    from types import SimpleNamespace

    module = _module()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (4, 10), generator=g)
    labels = ids.clone()
    labels[:2, :8] = -100  # rows 0-1: 2 label tokens each after the shift ...
    whole = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    first = {k: v[:2] for k, v in whole.items()}  # ... 4 label tokens in micro batch 1
    second = {k: v[2:] for k, v in whole.items()}  # 18 in micro batch 2
    step_tokens = int((labels[:, 1:] != -100).sum())
    assert step_tokens == 22

    trainer = SimpleNamespace(
        world_size=1, accumulate_grad_batches=2, fit_loop=SimpleNamespace(_should_accumulate=lambda: True)
    )
    module._trainer = trainer
    for micro in (first, second):
        (module.training_step({**micro, "step_label_tokens": step_tokens}, 0) / 2).backward()  # Lightning's / acc
    accumulated = module.model.lm_head.weight.grad.clone()
    module.model.zero_grad()
    module._trainer = None
    module.model_step(whole).backward()  # the token mean of the whole step in one batch
    torch.testing.assert_close(accumulated, module.model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_chunked_loss_and_gradients_equal_one_piece():
    """lm_head + cross-entropy in chunks (loss_chunk_tokens) gives today's loss and gradients to fp32 tolerance.

    Catches a chunking bug: a dropped or duplicated last partial chunk, labels split out of step with the hidden
    states, or a checkpointed chunk whose recomputed backward misses lm_head's or the hidden states' gradient.
    """
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 97, (3, 12), generator=g)
    labels = input_ids.clone()
    labels[:, :4] = -100  # 3 x 7 = 21 label tokens after the shift: chunks of 5 leave a partial last chunk
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    results = []
    for chunk in (0, 5):
        module = _module()
        module.hparams.loss_chunk_tokens = chunk
        loss = module.model_step(batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in module.model.named_parameters()}
        results.append((loss.detach(), grads))
    (whole, whole_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert whole_grads.keys() == chunked_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    module.hparams.loss_chunk_tokens = 5
    with torch.no_grad():  # validation path: chunks without checkpointing
        torch.testing.assert_close(module.model_step(batch), whole, rtol=1e-6, atol=1e-6)


def test_packed_layout_is_chosen_by_device_and_attention_implementation():
    """CPU keeps the 4D mask whatever the kernel; CUDA + SDPA passes position ids; CUDA + flash flattens."""
    from billa.data.packing import packed_layout

    assert packed_layout("cpu", "sdpa") == packed_layout("cpu", "flash_attention_2") == "mask"
    assert packed_layout("cuda", "eager") == packed_layout("cuda", None) == "mask"
    assert packed_layout("cuda", "sdpa") == "position_ids"
    assert packed_layout("cuda", "flash_attention_2") == packed_layout("cuda", "flash_attention_3") == "flatten"


def test_packed_rows_without_a_4d_mask_give_the_unpacked_losses():
    """Packed rows fed by position ids (rows kept, or flattened to one row) give each sample its unpacked loss.

    Runs transformers' SDPA path on CPU, the same mask derivation it uses on a GPU. Catches a flattened batch whose
    row boundaries leak (row r's last token predicting row r+1's first label: one label token too many) and a
    position-id layout in which samples attend across their boundary (another loss for every sample but the first).
    """
    from billa.data.collate import PackCollator, PadCollator
    from billa.data.packing import feed_packed

    module = _module()
    module.model.eval()
    assert module.model.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(3)
    items = []
    for n in (5, 9, 3, 12, 7):
        ids = [1, *torch.randint(3, 97, (n - 1,), generator=g).tolist()]
        items.append({"input_ids": ids, "labels": list(ids)})
    packed = PackCollator(pad_id=0, max_len=16)(items)
    unmasked = PackCollator(pad_id=0, max_len=16, mask=False)(items)  # what BillaDataModule builds for a GPU
    assert unmasked["attention_mask"] is None
    assert all(torch.equal(unmasked[k], packed[k]) for k in ("input_ids", "labels", "position_ids"))
    with torch.no_grad():
        reference = module.token_nll(PadCollator(pad_id=0)(items))[0].sort().values
        for layout, batch in (("position_ids", packed), ("flatten", packed), ("position_ids", unmasked)):
            fed = feed_packed(batch, layout)
            assert fed["attention_mask"] is None
            nll = module.token_nll(fed)[0]
            assert nll.shape == reference.shape, layout
            torch.testing.assert_close(nll.sort().values, reference, rtol=1e-5, atol=1e-5, msg=layout)


def test_lm_head_padded_to_aligned_rows_gives_the_same_loss_and_gradients():
    """lm_head's matmuls run on a weight padded from 97 to 128 rows (BiLLa: 46,943 -> 46,976); loss and gradients
    are lm_head's own, in fp32 and under bf16 autocast (where the weight is cast before padding).

    Catches the padding rows leaking into the softmax (logits not sliced back to V: a loss over 128 classes), a
    gradient lost through the padded copy, and a chunked backward that misses it."""
    from billa.model.loss import aligned_head, lm_head_nll

    g = torch.Generator().manual_seed(3)
    lm_head = torch.nn.Linear(32, 97, bias=False)
    hidden = torch.randn(21, 32, generator=g, requires_grad=True)  # (N, H)
    labels = torch.randint(0, 97, (21,), generator=g)
    assert aligned_head(lm_head, hidden)(hidden).shape == (21, 97)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            reference = torch.nn.functional.cross_entropy(lm_head(hidden).float(), labels, reduction="none")
        grads = torch.autograd.grad(reference.sum(), [hidden, lm_head.weight])
        tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
        for chunk in (0, 5):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                nll = lm_head_nll(lm_head, hidden, labels, chunk)  # (N,)
            assert nll.shape == (21,)
            torch.testing.assert_close(nll, reference, **tol)
            for ours, theirs in zip(torch.autograd.grad(nll.sum(), [hidden, lm_head.weight]), grads, strict=True):
                torch.testing.assert_close(ours, theirs, **tol)


def _two_rank_step(normalization: str, collate) -> tuple[dict, float, list[dict]]:
    """One optimizer step of 8 samples on 2 simulated ranks x 2 micro batches of 2 (accumulation 2), fed through the
    real stream (MixedDataset with billa's loss groups, StreamSampler per rank, the collator) into training_step.

    Returns the step's gradients as DDP would apply them (summed over micro batches after Lightning's division by the
    accumulation count, averaged over ranks), the logged ``train/loss``, and the 8 samples in stream order.
    """
    from types import SimpleNamespace

    from billa.data.mixing import MixedDataset, StreamSampler
    from billa.train import loss_grouping

    g = torch.Generator().manual_seed(4)
    samples = []
    for length, prompt in ((10, 8), (10, 1), (6, 4), (12, 2), (9, 7), (8, 1), (11, 9), (7, 2)):  # unequal labels
        ids = [1, *torch.randint(3, 97, (length - 1,), generator=g).tolist()]
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    grouping = loss_grouping({"normalization": normalization, "rank_batch_size": None}, 8, 2)
    data = MixedDataset({"s": samples}, {"s": 1}, 8, seed=0, step_size=8, group_size=grouping["loss_group_size"])
    stream = [data[i] for i in range(8)]
    module = tiny_module(ARCH, 97, seed=0, loss_normalization=normalization, loss_groups=grouping["loss_groups"])
    module.model.eval()  # no dropout: the hand formula sees the same NLL
    calls, logged = [0], {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    last_call = lambda: calls[0] < 3  # noqa: E731 - four training_step calls; the last one ends the step
    module._trainer = SimpleNamespace(
        world_size=2,
        accumulate_grad_batches=2,
        fit_loop=SimpleNamespace(_should_accumulate=last_call),
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),  # one module sums both ranks' shares already
    )
    grads = {}
    for rank in (0, 1):
        indices = list(StreamSampler(8, rank=rank, world_size=2, block=2))
        for micro in (indices[:2], indices[2:]):
            batch = collate([data[i] for i in micro])
            (module.training_step(batch, 0) / 2).backward()  # Lightning's division by the accumulation count
            calls[0] += 1
        for name, p in module.model.named_parameters():
            grads[name] = grads.get(name, 0) + p.grad / 2  # DDP: the mean of the ranks' gradients
        module.model.zero_grad()
    return grads, logged["train/loss"], stream


def _hand_loss(stream: list[dict], groups: list[list[int]]) -> torch.Tensor:
    """The hand formula: mean over ``groups`` of (summed NLL of the group's label tokens / their number)."""
    module = tiny_module(ARCH, 97, seed=0)
    module.model.eval()
    per_group = []
    for members in groups:
        nll = torch.cat([module.token_nll(PadCollatorForHand([stream[i]]))[0] for i in members])  # (tokens of group,)
        per_group.append(nll.sum() / nll.numel())
    loss = torch.stack(per_group).mean()
    loss.backward()
    return loss, {name: p.grad.clone() for name, p in module.model.named_parameters()}


def PadCollatorForHand(items):  # noqa: N802 - one sample per batch, no padding: the plainest possible batch
    ids = torch.tensor([items[0]["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([items[0]["labels"]])}


@pytest.mark.parametrize("layout", ["pad", "pack"])
@pytest.mark.parametrize(
    ("normalization", "groups"),
    [("step_token_mean", [list(range(8))]), ("rank_token_mean", [[0, 1, 2, 3], [4, 5, 6, 7]])],
)
def test_loss_normalization_matches_the_hand_formula_on_two_ranks(normalization, groups, layout):
    """``loss.normalization`` on 2 ranks x accumulation 2 with unequal label counts per sample and per half of the
    step: the applied gradient and the logged ``train/loss`` equal the hand formula.

    step_token_mean: one token mean over all label tokens of the step. rank_token_mean (BiLLa): the mean over the
    two groups of 4 consecutive samples (each rank's share, as a BiLLa GPU's batch) of their token means. Catches
    rank_token_mean weighting by micro batch instead of group (the rank's micro batches here are not its group), a
    missing x ranks x accumulation (gradient 4x too small), group totals taken from the wrong group, and the logged
    loss reporting the token mean under rank_token_mean.
    """
    from billa.data.collate import PackCollator, PadCollator

    collate = PadCollator(pad_id=0) if layout == "pad" else PackCollator(pad_id=0, max_len=24)
    grads, logged, stream = _two_rank_step(normalization, collate)
    counts = [sum(label != -100 for label in s["labels"][1:]) for s in stream]
    assert sum(counts[:4]) != sum(counts[4:])  # unequal groups: the two normalisations differ
    loss, hand_grads = _hand_loss(stream, groups)
    assert logged == pytest.approx(loss.item(), rel=1e-5)
    for name, grad in hand_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_two_normalizations_give_different_gradients_on_unequal_groups():
    """Guards the hand-formula test above: on this batch rank_token_mean and step_token_mean really differ."""
    from billa.data.collate import PadCollator

    step_grads, step_loss, _ = _two_rank_step("step_token_mean", PadCollator(pad_id=0))
    rank_grads, rank_loss, _ = _two_rank_step("rank_token_mean", PadCollator(pad_id=0))
    assert abs(step_loss - rank_loss) > 1e-4
    assert not torch.allclose(step_grads["lm_head.weight"], rank_grads["lm_head.weight"], rtol=1e-3, atol=1e-6)


def test_unknown_loss_normalization_is_a_config_error():
    from billa.config import ConfigError
    from billa.train import loss_grouping

    with pytest.raises(ConfigError, match=r"loss.normalization='token_mean'"):
        tiny_module(ARCH, 97, loss_normalization="token_mean")
    with pytest.raises(ConfigError, match=r"loss.rank_batch_size.*divides batch.global_size=160"):
        loss_grouping({"normalization": "rank_token_mean", "rank_batch_size": 24}, 160, 8)
    assert loss_grouping({"normalization": "rank_token_mean", "rank_batch_size": None}, 160, 8) == {
        "loss_group_size": 20,
        "loss_groups": 8,
    }
