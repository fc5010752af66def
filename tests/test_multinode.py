"""Two nodes on one machine: ``hardware=2x8xa100``'s code path started as a cluster without SLURM starts it.

Two ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank {0,1} --master-addr 127.0.0.1 --master-port P train.py``
processes run at once, exactly the launch docs/running.md gives for two nodes (one per node, 8 ranks each there): the
CPU ZeRO-3 engine over gloo with ``hardware.num_nodes=2``, the same ``BillaDeepSpeedStrategy`` path as ``2x8xa100``
minus CUDA. Both "nodes" share the run directory and the token cache, as a cluster's shared file system does. The
schedule is run D of tests/test_equivalence.py (2 ranks x micro batch 4 x 2 accumulation), stopped after step 5 and
resumed with ``resume=auto`` to step 8, so every step can be compared with the one-node run of tests/test_zero3.py.
"""

from __future__ import annotations

import csv
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from .conftest import SHORT_RUN, ZERO3, logged
from .helpers import start_door

pytestmark = pytest.mark.slow

NODES = [*ZERO3, "hardware.num_nodes=2", "hardware.devices=1", "hardware.micro_batch_size=4"]  # 16 = 4 x 2 x 2
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_nodes(run_dir, cache_dir, *overrides: str) -> list[str]:
    """Both nodes' ``torchrun`` at once; returns each node's stdout + stderr once both exited 0.

    One node failing leaves the other waiting in a collective (gloo's timeout is 30 minutes), so the first failure
    or the timeout stops both; the pipes are drained in threads so that neither node blocks on a full one.
    """
    port = str(free_port())
    args = [*SHORT_RUN, f"hydra.run.dir={run_dir}", *NODES, *overrides]
    env = {"BILLA_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    nodes = [
        # `python -m torch.distributed.run` is `torchrun`, from this interpreter
        start_door("-m", "torch.distributed.run", *rendezvous, "--node-rank", str(rank), "train.py", *args, env=env)
        for rank in (0, 1)
    ]
    with ThreadPoolExecutor(2) as pool:
        outputs = [pool.submit(node.communicate) for node in nodes]
        deadline = time.monotonic() + TIMEOUT_S
        while any(node.poll() is None for node in nodes):
            if time.monotonic() > deadline or any(node.returncode not in (None, 0) for node in nodes):
                for node in nodes:
                    node.terminate()  # torchrun stops its workers on SIGTERM
                for node in nodes:
                    try:
                        node.wait(30)
                    except subprocess.TimeoutExpired:
                        node.kill()
                break
            time.sleep(0.5)
        texts = ["".join(future.result()) for future in outputs]
    for rank, (node, text) in enumerate(zip(nodes, texts, strict=True)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{text[-4000:]}"
    return texts


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, cache_dir, sample_tokenizer_dir):
    """Two nodes stopped after step 5 (checkpoints 4 and 5), then two nodes resuming to step 8 and exporting."""
    run_dir = tmp_path_factory.mktemp("two-nodes")
    # a token cache of their own: both nodes find it empty and tokenise at once, whatever ran before in the session
    tokens = f"data.token_cache_dir={tmp_path_factory.mktemp('two-nodes-tokens')}"
    stopped = launch_two_nodes(run_dir, cache_dir, "stop_after_steps=5", tokens)
    resumed = launch_two_nodes(run_dir, cache_dir, "resume=auto", tokens)
    return run_dir, stopped, resumed


def test_every_node_writes_its_shards_of_every_checkpoint(two_nodes):
    """Each checkpoint directory holds both ranks' ZeRO-3 shards and the COMPLETE marker, in the shared run directory.

    Catches a checkpoint path resolved per node (node 1 writing its shards elsewhere, or into a directory rank 0
    already renamed) and a save whose barrier does not span the nodes (COMPLETE written before node 1's shards).
    """
    run_dir, _, _ = two_nodes
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "last.ckpt",
        "step=000004.ckpt",
        "step=000005.ckpt",
        "step=000008.ckpt",
    ]
    for step in (4, 5, 8):
        final = checkpoints / f"step={step:06d}.ckpt"
        marker = final / "COMPLETE"
        assert marker.read_text() == f"global_step={step}\n"
        shards = sorted(p.name for p in (final / "checkpoint").iterdir())
        assert shards == [
            f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1) for kind in ("model", "optim")
        ]
        assert marker.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in (final / "checkpoint").iterdir())
    assert not list(checkpoints.glob("*.partial"))
    assert sorted(p.name for p in (run_dir / "partition").iterdir()) == ["rank0.json", "rank1.json"]


def test_resume_continues_the_global_step_and_matches_one_node(two_nodes, zero3_accumulation_run):
    """The resumed launch continues at step 6 and every loss equals the one-node, two-device run's.

    Catches ranks that disagree on the global rank or world size across nodes (a data shard read twice, another never:
    the losses differ from one node's) and a resume that starts over or loads another step's shards.
    """
    run_dir, stopped, resumed = two_nodes
    assert "Resuming from" not in stopped[0]
    assert "Resuming from" in resumed[0] and "step=000005.ckpt" in resumed[0]
    versions = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    assert len(versions) == 2  # one CSV per launch, written by global rank 0 only
    steps = [{int(row["step"]) for row in csv.DictReader(v.open()) if row.get("train/loss")} for v in versions]
    assert steps == [set(range(5)), {5, 6, 7}]  # CSV step = optimizer step - 1: steps 1-5, then 6-8
    losses, one_node = logged(run_dir, "train/loss"), logged(zero3_accumulation_run, "train/loss")
    assert sorted(losses) == list(range(8))
    for step in range(8):
        assert losses[step] == pytest.approx(one_node[step], rel=1e-6), (step, losses, one_node)
    assert logged(run_dir, "val/loss")[7] == pytest.approx(logged(zero3_accumulation_run, "val/loss")[7], rel=1e-6)
    log = (run_dir / "train.log").read_text()
    assert "step 5/8" in log and "step 8/8" in log


def test_export_is_written_once_and_equals_one_nodes(two_nodes, zero3_accumulation_run):
    """The ``hf/`` export of the resumed two-node run: one weights file, checked, equal to the one-node export.

    Catches an export gated on the node-local rank (``local_rank == 0``): node 1 then writes over rank 0's files
    with a state it never gathered.
    """
    run_dir, _, resumed = two_nodes
    export = run_dir / "hf"
    assert sorted(p.name for p in export.glob("*.safetensors*")) == ["model.safetensors"]
    assert not [p for p in export.rglob("*") if ".tmp" in p.name]
    assert sum(text.count("Export check:") for text in resumed) == 1
    check = (run_dir / "export_check.json").read_text()
    assert '"export_max_abs_logit_diff": 0.0' in check
    ours, one_node = (
        load_file(export / "model.safetensors"),
        load_file(zero3_accumulation_run / "hf" / "model.safetensors"),
    )
    assert set(ours) == set(one_node)
    for name, tensor in one_node.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
