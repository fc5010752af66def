"""The chunked lm_head + cross-entropy under the real DeepSpeed ZeRO-3 engine: 2 CPU ranks over gloo, one process each.

Each rank builds ``BillaLM`` inside ``deepspeed.zero.Init`` (parameters partitioned as built, as under Lightning) and
runs micro batches whose label counts differ between the ranks, so the ranks run different numbers of loss chunks:
step 1 gives rank 0 five chunks of 16 label tokens and rank 1 two; step 2 gives rank 1 no label token at all. A loop of
``lm_head`` module calls would issue a different number of parameter gathers on each rank and hang; ``HeadNLL`` gathers
once per pass. Gradients (``safe_get_full_grad``, averaged over ranks by DeepSpeed) and the validation NLL are compared
with one process computing the same per-rank losses on the same initial weights.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from .helpers import TINY_ARCH, tiny_module

VOCAB = 97  # odd, so the gathered head is padded to 128 rows as on a GPU run (46,943 -> 46,976)
CHUNK = 16
WORLD = 2
HANG_LIMIT_S = 240  # a deadlock, not a speed limit: the job takes ~10 s


def _batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    """Rank 0: 2 x 40 tokens, 78 labels (5 chunks of 16). Rank 1: 22 labels (2 chunks) at step 1, none at step 2."""
    g = torch.Generator().manual_seed(100 * step + rank)
    input_ids = torch.randint(3, VOCAB, (2, 40), generator=g)  # (B, T)
    labels = input_ids.clone()
    if rank == 1:
        labels[:, :29] = -100  # a prompt: 2 x (40 - 29) = 22 label positions (the first position predicts nothing)
        if step == 2:
            labels[:] = -100  # a micro batch without a target
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _module(**kwargs):
    return tiny_module(TINY_ARCH, VOCAB, seed=0, loss_chunk_tokens=CHUNK, **kwargs)


class _Step(torch.nn.Module):
    """The engine's root module: one ``model_step`` per forward, as Lightning's wrapper calls ``training_step``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module.model_step(batch)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    import billa.model.module  # noqa: F401  (lightning imports torch._dynamo, which fails inside zero.Init's patches)

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    with deepspeed.zero.Init(config_dict_or_path=config):
        module = _module()
    assert hasattr(module.model.lm_head.weight, "ds_id")  # really partitioned
    engine, *_ = deepspeed.initialize(
        model=_Step(module), optimizer=torch.optim.SGD(module.parameters(), lr=0.0), config=config
    )
    result = {"grads": [], "losses": [], "val_nll": None}
    for step in (1, 2):
        loss = engine(_batch(rank, step))
        engine.backward(loss)
        grads = {name: safe_get_full_grad(p).clone() for name, p in module.model.named_parameters()}  # collective
        result["grads"].append(grads)
        result["losses"].append(loss.detach())
        engine.step()
    with torch.no_grad():  # validation: chunked without recomputation, still one gather
        result["val_nll"] = module.token_nll(_batch(rank, 1))[0]
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("zero3-loss")
    context = torch.multiprocessing.spawn(_rank, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + HANG_LIMIT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-rank ZeRO-3 job did not finish in {HANG_LIMIT_S} s: ranks deadlocked in a gather")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow  # ~80 s on 2 shared cores: two DeepSpeed processes start
def test_chunked_loss_under_zero3_gives_the_single_process_gradients(zero3_ranks):
    """Ranks with different label and chunk counts (5 vs 2 chunks; then 5 vs 0 label tokens) finish and agree with one
    process, to fp32 summation order.

    Bugs caught: per-chunk ``lm_head`` module calls under ZeRO-3 (one gather per chunk: the ranks' collectives no
    longer pair up; gloo stops with "disagreement on list length", or the job hangs), and gradients or losses that
    differ from one process's (a chunk computed with the released, empty weight; a rank without label tokens
    skipping the head, so its gathers are missing).
    """
    reference = _module()
    for step in (1, 2):
        reference.zero_grad()
        for rank in range(WORLD):
            loss = reference.model_step(_batch(rank, step))
            (loss / WORLD).backward()  # DeepSpeed averages the ranks' gradients
            torch.testing.assert_close(zero3_ranks[rank]["losses"][step - 1], loss.detach(), rtol=1e-5, atol=1e-6)
        for name, param in reference.model.named_parameters():
            ours = zero3_ranks[0]["grads"][step - 1][name]
            torch.testing.assert_close(ours, param.grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
    assert zero3_ranks[1]["losses"][1] == 0  # the rank without targets contributed 0
    assert zero3_ranks[0]["grads"][1]["lm_head.weight"].abs().sum() > 0  # and lm_head was trained by rank 0's


@pytest.mark.slow
def test_chunked_validation_under_zero3_gives_the_single_process_nll(zero3_ranks):
    """Validation (no gradients) under ZeRO-3: every label token's NLL equals one process's.

    Bug caught: the no-grad path calling ``lm_head`` per chunk (a hang with different chunk counts per rank).
    """
    reference = _module()
    with torch.no_grad():
        for rank in range(WORLD):
            expected = reference.token_nll(_batch(rank, 1))[0]
            assert zero3_ranks[rank]["val_nll"].shape == expected.shape == ((78,), (22,))[rank]
            torch.testing.assert_close(zero3_ranks[rank]["val_nll"], expected, rtol=1e-5, atol=1e-6)
