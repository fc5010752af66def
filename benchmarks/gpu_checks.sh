#!/usr/bin/env bash
# The GPU figures of README's Benchmarks section, in one run on one CUDA GPU (about 8 minutes on an H100 for all):
#   bash benchmarks/gpu_checks.sh [OUT_DIR] [STEP ...]     STEP: mfu packing loss_memory recipe recipe_compile
# from the repository root with billa importable (PYTHONPATH=src); no STEP runs all but recipe_compile. Each step
# writes OUT_DIR/<step>.txt under its own timeout, so one slow step does not cost the others' output.
# SMOKE=1 runs the same steps at toy sizes on a CPU (a minute or two): a check of the script, not a measurement.
# billa's LightningModule builds its optimizer with hydra.utils.instantiate; on a GPU machine without Hydra set
# BILLA_PYLIB to a directory holding the pure-Python packages hydra, omegaconf and antlr4 (copied from a venv).
set -uo pipefail
out="${1:-gpu_checks}"
shift $(($# > 0 ? 1 : 0))
steps="${*:-mfu packing loss_memory recipe}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "import hydra, omegaconf" 2>/dev/null && [ -n "${BILLA_PYLIB:-}" ]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$BILLA_PYLIB"
fi

# The compute-bound regime of the recipe comparison: LLaMA 8 x 2048 (0.6 B parameters), 16 stage-3 samples per step.
recipe=(--accelerator gpu --precision bf16 --hidden 2048 --layers 8 --batch 16 --max-len 1024 --steps 14 --warmup 4
  --repeats 3 --kind sft)  # 3 rounds: the median is a warm one (a process's first round pays CUDA start-up)
mfu=(--profile compiled:off:8)
packing=()
memory=(--batch 8 --seq 1024 --device cuda)
if [ "${SMOKE:-0}" = 1 ]; then
  recipe=(--accelerator cpu --precision fp32 --hidden 64 --layers 1 --batch 4 --max-len 128 --steps 3 --warmup 1
    --repeats 1 --kind sft)
  mfu=(--device cpu --hidden 128 --heads 2 --layers 2 --seq 64 --contenders eager:off:2 compiled:on:2 --rounds 1
    --steps 1 --warmup 1 --profile eager:off:2)
  packing=(--batch 2 --seq 128 --hidden 64 --layers 1)
  memory=(--batch 2 --seq 64)
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
    recipe) step recipe_batches 200 python3 benchmarks/recipe_batches.py "${recipe[@]}" ;;
    recipe_compile) step recipe_batches_compile 420 python3 benchmarks/recipe_batches.py "${recipe[@]}" --compile ;;
    *) echo "unknown step $name (mfu packing loss_memory recipe recipe_compile)" && exit 2 ;;
  esac
done
