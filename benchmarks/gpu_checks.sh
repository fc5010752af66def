#!/usr/bin/env bash
# The GPU figures of README's Benchmarks section, in one run on one CUDA GPU (about 6 minutes on an H100):
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# from the repository root with billa importable (PYTHONPATH=src). Each step's output goes to OUT_DIR/<step>.txt.
set -uo pipefail
out="${1:-gpu_checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'lightning', lightning.__version__)" | tee -a "$out/device.txt"
timeout 170 python3 benchmarks/gpu_mfu.py 2>&1 | tee "$out/gpu_mfu.txt"
timeout 80 python3 benchmarks/gpu_packing.py 2>&1 | tee "$out/gpu_packing.txt"
timeout 60 python3 benchmarks/loss_memory.py --batch 8 --seq 1024 --device cuda 2>&1 | tee "$out/loss_memory.txt"
timeout 90 python3 benchmarks/recipe_batches.py --accelerator gpu --precision bf16 --hidden 1024 --layers 8 \
  --max-len 1024 --steps 10 --warmup 3 --repeats 2 2>&1 | tee "$out/recipe_batches.txt"
