"""The recipe's own configuration through ``python train.py``: stages 1 -> 2 -> 3 under ``hardware=8xa100``.

Not a harness: each stage is ``python train.py stage=<stage> model=llama-7b data=billa_repo hardware=8xa100
hardware.devices=<GPUs here>`` on the rehearsal corpus (``python -m billa.sample.rehearsal``), with only these
changes so that it fits one machine and a few minutes:

- a 7B-shaped stack: hidden 4,096, 32 heads, MLP 11,008, the 46,943-row vocabulary, sequence 1,024, random init,
  and as many layers as fit (``--layers``; default: the rule of ``fitting_layers``);
- a short schedule: ``--steps`` optimizer steps per stage (warmup 1), accumulation ``--accumulation`` (the global
  batch is 2 x GPUs x accumulation instead of 160 / 48), a checkpoint every step in stage 1;
- ``logger=csv`` (no W&B account on the machine), ``hardware.gpu_memory_gb`` and ``hardware.peak_tflops`` of the
  GPU present.

ZeRO-3, bf16, activation checkpointing, micro batch 2 and the DeepSpeed block are 8xa100's. Stage 1 is killed with
SIGKILL (its whole process group) once step 1's checkpoint is complete and rerun with ``resume=auto``; stage 2
starts from stage 1's export (``init_from``), stage 3 from stage 2's. Every stage ends with ``export.verify``
(``export_check.json``: the reloaded export's logits against the live model's). Prints one row per stage:
tokens/s, MFU and peak GPU memory of the last logged step, and the export's largest logit difference.

``--smoke``: the same commands at toy sizes on CPU with ``hardware=cpu_zero3`` (2 processes, real ZeRO-3 over
gloo, fp32): a check of the driver, not a measurement.

    python benchmarks/recipe_gpu.py OUT_DIR [--layers N] [--steps 3] [--accumulation 2] [--smoke]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "task_mix", "sft")
HIDDEN, INTERMEDIATE, HEADS, VOCAB, MAX_LAYERS = 4096, 11008, 32, 46_943, 32
MICRO = 2  # 8xa100's micro batch per GPU
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312}  # dense bf16 tensor-core peak, by device name
BYTES_PER_PARAMETER_GPU = 16  # ZeRO-3 + bf16 + AdamW: bf16 weight and gradient, fp32 master, exp_avg, exp_avg_sq
BYTES_PER_PARAMETER_DISK = 36  # two ZeRO-3 checkpoints of 14 B (a new one is complete before the old is deleted)
# and two exports of 4 B (the previous stage's, read by init_from, and this stage's)
ACTIVATION_RESERVE_GB = 12  # logits, one layer's recomputation, allocator slack


def layer_parameters() -> int:
    return 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE


def fitting_layers(gpu_memory_gb: float, devices: int, free_disk_gb: float) -> int:
    """As many 7B-shaped layers as fit, at most 32 and at least 1.

    GPU: the states of all parameters, 16 bytes each, are split over the GPUs by ZeRO-3; 90 % of a card minus a
    reserve for activations holds its share. Disk: the run keeps about 36 bytes per parameter at its peak (two
    checkpoints of a stage, two exports) in 80 % of the free space. The embedding and lm_head (2 x 46,943 x 4,096)
    count in both.
    """
    embedding = 2 * VOCAB * HIDDEN
    on_gpus = (0.9 * gpu_memory_gb - ACTIVATION_RESERVE_GB) * 2**30 * devices / BYTES_PER_PARAMETER_GPU
    on_disk = 0.8 * free_disk_gb * 2**30 / BYTES_PER_PARAMETER_DISK
    fit = int((min(on_gpus, on_disk) - embedding) // layer_parameters())
    return max(1, min(MAX_LAYERS, fit))


def gpu_facts() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    peak = next((tflops for name, tflops in PEAK_TFLOPS.items() if name in props.name), None)
    return {
        "name": props.name,
        "devices": torch.cuda.device_count(),
        "memory_gb": props.total_memory / 2**30,
        "peak_tflops": peak,
    }


def stage_overrides(args: argparse.Namespace, facts: dict, stage: str, run_dir: Path, corpus: Path) -> list[str]:
    """``python train.py`` arguments of one stage: the recipe's configuration with the changes of the docstring."""
    devices = facts["devices"]
    common = [
        f"stage={stage}",
        "model=llama-7b",
        "data=billa_repo",
        f"data.root={corpus / 'billa_repo'}",
        "model.pretrained_path=null",
        f"model.vocab_size={VOCAB}",
        f"model.tokenizer.path={corpus / 'tokenizer'}",
        f"batch.global_size={MICRO * devices * args.accumulation}",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1",
        "scheduler.warmup_steps=1",
        f"checkpoint.every_n_steps={1 if stage == 'pretrain' else args.steps}",
        "checkpoint.keep_last=1",
        "data.val_max_records=16",
        "logger=csv",
        "progress=text",
        f"hydra.run.dir={run_dir}",
    ]
    if args.smoke:  # toy sizes on 2 CPU processes: the same ZeRO-3 engine over gloo
        hardware = ["hardware=cpu_zero3", f"hardware.micro_batch_size={MICRO}"]
        shape = {
            "hidden_size": 64,
            "intermediate_size": 172,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "num_hidden_layers": args.layers or 1,
        }
    else:
        hardware = [
            "hardware=8xa100",
            f"hardware.devices={devices}",
            f"hardware.micro_batch_size={MICRO}",
            f"hardware.gpu_memory_gb={facts['memory_gb']:.0f}",
            f"hardware.peak_tflops={facts['peak_tflops'] if facts['peak_tflops'] else 'null'}",
        ]
        shape = {
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS,
            "num_hidden_layers": args.layers,
        }
    return [*common, *hardware, *(f"model.architecture.{key}={value}" for key, value in shape.items())]


def start_train(overrides: list[str], out, new_session: bool = False) -> subprocess.Popen:
    """``python train.py`` from the repository root, its output (stdout and stderr) to the open file ``out``."""
    return subprocess.Popen(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )


def train(overrides: list[str], log: Path, timeout: float) -> str:
    """``python train.py`` to completion; its output goes to ``log`` and is returned."""
    with log.open("a") as out:
        proc = start_train(overrides, out)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    text = log.read_text()
    if returncode != 0:
        sys.exit(f"train.py exited {returncode}; its log: {log}\n{text[-4000:]}")
    return text


def kill_after_first_checkpoint(overrides: list[str], run_dir: Path, log: Path, timeout: float) -> None:
    """Start ``python train.py`` in its own process group; SIGKILL every rank once step 1's checkpoint is complete."""
    marker = run_dir / "checkpoints" / "step=000001.ckpt" / "COMPLETE"
    with log.open("w") as out:
        proc = start_train(overrides, out, new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                sys.exit(f"train.py exited ({proc.returncode}) before its first checkpoint; its log: {log}")
            if time.monotonic() > deadline:
                sys.exit(f"no checkpoint within {timeout:.0f} s; log: {log}")
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank: the job dies as on a node loss
        proc.wait()
    with log.open("a") as out:
        out.write(f"\n== killed with SIGKILL after {marker.parent.name}\n")


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of each ``train/*`` metric in the run's newest CSV version (the resumed run's)."""
    newest = sorted((run_dir / "csv").rglob("metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))[-1]
    found: dict[str, float] = {}
    for row in csv.DictReader(newest.open()):
        for key in ("train/tokens_per_s", "train/mfu", "train/gpu_mem_gb"):
            if row.get(key):
                found[key] = max(found.get(key, 0.0), float(row[key])) if key.endswith("mem_gb") else float(row[key])
    return found


def corpus_for(out: Path) -> Path:
    corpus = out / "corpus"
    if not (corpus / "tokenizer" / "tokenizer.model").is_file():
        subprocess.run([sys.executable, "-m", "billa.sample.rehearsal", str(corpus)], cwd=ROOT, check=True)
    return corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: as many as fit)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per stage (stage 1: killed after 1)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro batches per optimizer step")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for one train.py")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU, hardware=cpu_zero3")
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        facts = {"name": "CPU (smoke)", "devices": 2, "memory_gb": None, "peak_tflops": None}
    else:
        facts = gpu_facts()
        if args.layers is None:
            args.layers = fitting_layers(facts["memory_gb"], facts["devices"], shutil.disk_usage(out).free / 2**30)
    print(
        f"device: {facts['devices']} x {facts['name']}; layers: {args.layers or 1}; steps: {args.steps}; "
        f"accumulation: {args.accumulation}",
        flush=True,
    )
    corpus = corpus_for(out)
    rows, previous = [], None
    for stage in STAGES:
        run_dir = out / stage
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = stage_overrides(args, facts, stage, run_dir, corpus)
        if previous is not None:
            overrides.append(f"init_from={previous / 'hf'}")
        log = out / f"{stage}.log"
        print(f"== {stage}: python train.py {' '.join(overrides)}", flush=True)
        if stage == "pretrain":
            kill_after_first_checkpoint(overrides, run_dir, log, args.timeout)
            text = train([*overrides, "resume=auto"], log, args.timeout)
            resumed = "Resuming from" in text and "step=000001.ckpt" in text
            if not resumed:
                sys.exit(f"stage 1 did not resume from step 1's checkpoint; log: {log}")
            print("   killed with SIGKILL after step 1's checkpoint; resume=auto continued from step=000001.ckpt")
        else:
            train(overrides, log, args.timeout)
        check = json.loads((run_dir / "export_check.json").read_text())
        rows.append((stage, last_metrics(run_dir), check["export_max_abs_logit_diff"]))
        if previous is not None:
            shutil.rmtree(previous / "checkpoints", ignore_errors=True)  # disk: only the export is read on
        previous = run_dir
    print(f"\n{'stage':<10}{'tokens/s':>12}{'MFU':>8}{'peak GPU GiB':>14}{'export max |dlogit|':>22}")
    for stage, metrics, diff in rows:
        mfu = metrics.get("train/mfu")
        mem = metrics.get("train/gpu_mem_gb")
        print(
            f"{stage:<10}{metrics.get('train/tokens_per_s', float('nan')):>12.0f}"
            f"{f'{mfu:.1%}' if mfu is not None else '-':>8}{f'{mem:.1f}' if mem is not None else '-':>14}"
            f"{diff:>22.2e}"
        )
    (out / "recipe.json").write_text(
        json.dumps(
            {
                "device": facts,
                "layers": args.layers or 1,
                "steps": args.steps,
                "accumulation": args.accumulation,
                "stages": {stage: {**metrics, "export_max_abs_logit_diff": diff} for stage, metrics, diff in rows},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
