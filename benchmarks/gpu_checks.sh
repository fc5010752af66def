#!/usr/bin/env bash
# The GPU figures of README's Benchmarks section, in one run on the CUDA GPUs of one machine:
#   bash benchmarks/gpu_checks.sh [OUT_DIR] [STEP ...]
# STEP: mfu packing loss_memory memory_plan recipe_batches recipe_batches_compile recipe; no STEP runs all but
# recipe_batches_compile. `recipe` is `python train.py` itself, stages 1 -> 2 -> 3 with hardware=8xa100's ZeRO-3 +
# bf16 on the GPUs present (benchmarks/recipe_gpu.py: kill -9 and resume=auto in stage 1, the exports checked).
# From the repository root. Each step writes OUT_DIR/<step>.txt under its own timeout, so one slow step does not cost
# the others' output. SMOKE=1 runs the same steps at toy sizes on a CPU (`recipe` on 2 ZeRO-3 CPU processes, a few
# minutes): a check of the script, not a measurement.
# On a machine without billa's dependencies (hydra, deepspeed, datasets, wandb, openai) and no package index, carry
# a wheelhouse (scripts/wheelhouse.sh DIR) and name it in WHEELHOUSE (default: ./wheelhouse when it exists): they
# and billa (-e .) are installed from it, offline, before the first step.
set -uo pipefail
out="${1:-gpu_checks}"
shift $(($# > 0 ? 1 : 0))
steps="${*:-mfu packing loss_memory memory_plan recipe_batches recipe}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
wheelhouse="${WHEELHOUSE:-wheelhouse}"
if ! python3 -c "import hydra, deepspeed, datasets, billa" 2>/dev/null; then
  if [ -d "$wheelhouse" ]; then  # --no-deps: the image's own versions of torch, lightning, transformers stay
    python3 -m pip install -q --no-index --no-deps --find-links "$wheelhouse" -r "$wheelhouse/requirements.txt" &&
      python3 -m pip install -q --no-index --no-deps --find-links "$wheelhouse" -e . || exit 1
    python3 -m pip check | tee "$out/pip_check.txt"  # version ranges the image's own packages miss, if any
  else
    export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"  # billa from the tree; its dependencies must be there
  fi
fi

# The compute-bound regime of the recipe comparison: LLaMA 8 x 2048 (0.6 B parameters), 16 stage-3 samples per step.
recipe=(--accelerator gpu --precision bf16 --hidden 2048 --layers 8 --batch 16 --max-len 1024 --steps 14 --warmup 4
  --repeats 3 --kind sft)  # 3 rounds: the median is a warm one (a process's first round pays CUDA start-up)
mfu=(--profile compiled:off:8)
packing=()
memory=(--batch 8 --seq 1024 --device cuda)
plan=(--device cuda --hidden 4096 --layers 2 --tokens 8192)  # the plan's activations vs CUDA's, 7B-wide layers
train=()  # layers: as many as fit the GPUs and the disk (recipe_gpu.fitting_layers)
if [ "${SMOKE:-0}" = 1 ]; then
  recipe=(--accelerator cpu --precision fp32 --hidden 64 --layers 1 --batch 4 --max-len 128 --steps 3 --warmup 1
    --repeats 1 --kind sft)
  mfu=(--device cpu --hidden 128 --heads 2 --layers 2 --seq 64 --contenders eager:off:2 compiled:on:2 --rounds 1
    --steps 1 --warmup 1 --profile eager:off:2)
  packing=(--batch 2 --seq 128 --hidden 64 --layers 1)
  memory=(--batch 2 --seq 64)
  plan=(--hidden 128 --layers 1 --tokens 2048 --vocab 2000)
  train=(--smoke)
fi

step() {  # step NAME SECONDS COMMAND...: its output on the terminal and in OUT_DIR/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name ($limit s at most): $*" | tee "$out/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } | tee "$out/device.txt"
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'lightning', lightning.__version__)" | tee -a "$out/device.txt"
for name in $steps; do
  case $name in
    mfu) step gpu_mfu 330 python3 benchmarks/gpu_mfu.py "${mfu[@]}" ;;
    packing) step gpu_packing 80 python3 benchmarks/gpu_packing.py "${packing[@]}" ;;
    loss_memory) step loss_memory 60 python3 benchmarks/loss_memory.py "${memory[@]}" ;;
    memory_plan) step memory_plan 120 python3 benchmarks/memory_plan.py "${plan[@]}" ;;
    recipe_batches) step recipe_batches 200 python3 benchmarks/recipe_batches.py "${recipe[@]}" ;;
    recipe_batches_compile)
      step recipe_batches_compile 420 python3 benchmarks/recipe_batches.py "${recipe[@]}" --compile ;;
    recipe) step recipe 570 python3 benchmarks/recipe_gpu.py "$out/recipe" "${train[@]}" ;;
    *) echo "unknown step $name (mfu packing loss_memory memory_plan recipe_batches recipe_batches_compile recipe)" &&
      exit 2 ;;
  esac
done
