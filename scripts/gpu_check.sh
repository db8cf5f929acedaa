#!/usr/bin/env bash
# GPU checks for a lent device machine (torch, triton, transformers, safetensors already there).
# Installs nothing, finishes in under 8 minutes, writes JSON results to $OUT (default ./gpu_out).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
timeout 470 python3 scripts/gpu_check.py "$OUT" 2>&1 | tee "$OUT/log.txt"
