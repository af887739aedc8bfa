#!/usr/bin/env bash
# The GPU check (issue 9): one TRL LoRA job and one full-finetuning job on the bundled model's
# architecture on CUDA, printing training tokens/s and peak GPU memory. Run where a GPU is lent,
# after `python bench/gpu_check.py prepare` here, carrying bench/.gpu-check (see bench/gpu_check.py).
# The machine has torch, transformers, peft and accelerate; TRL and its small dependencies come from
# the carried wheels, offline. Budget: a few minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import pyarrow, pandas" 2>/dev/null || { echo "the GPU machine lacks pyarrow/pandas (datasets needs them)"; exit 3; }
python -m pip install --quiet --no-index --find-links bench/.gpu-check/wheels trl datasets dill multiprocess xxhash
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 420 python bench/gpu_check.py run "$@"
