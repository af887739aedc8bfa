#!/usr/bin/env bash
# The GPU check (issues 9, 16): one TRL LoRA job and one full-finetuning job on the bundled model's
# architecture on CUDA, printing training tokens/s and peak GPU memory. Run where a GPU is lent,
# after `python bench/gpu_check.py prepare` here, carrying bench/.gpu-check (see bench/gpu_check.py).
# The machine has torch, transformers, peft and accelerate and nothing else we need: the rest comes
# from the kit, unpacked into a temporary folder on PYTHONPATH (nothing is installed, no network).
# Exit 2 without a CUDA device, once every import is satisfied. Budget: a few minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=bench/.gpu-check
PY=${PYTHON:-python}
[ -f "$KIT/site.tar.xz" ] || { echo "no kit at $KIT: run 'python bench/gpu_check.py prepare' first and carry $KIT"; exit 3; }
want=$(cat "$KIT/python-version")
have=$("$PY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
[ "$want" = "$have" ] || { echo "the kit is for Python $want, this machine runs $have: prepare --python-version $have"; exit 3; }
SITE=$(mktemp -d "${TMPDIR:-/tmp}/agentsoc-gpu-kit.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
tar -C "$SITE" -xJf "$KIT/site.tar.xz"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
timeout 420 "$PY" bench/gpu_check.py run "$@"
