#!/usr/bin/env bash
# GPU reproduction recipe (one H100 or H200): micro vs global balance on real multi-domain text, 2 seeds. A run takes
# about 220 s on an H200 (200 s of training), so the 4 runs take about 15 min; `--seeds 0,1,2` adds a third seed.
# Usage: bash scripts/recipes/compare_gpu.sh CORPUS_DIR OUT_DIR [extra qwenmoe-gb flags]
# CORPUS_DIR holds one folder per domain with train.jsonl / test.jsonl (e.g. ../shared/corpus).
set -euo pipefail
corpus=${1:?corpus folder}
out=${2:-runs/compare-gpu}
shift 2 || true
python -m modeling_qwenmoe_gb.cli compare --out "$out" --arms micro,global --seeds 0,1 --domain_chunk 2 \
  --data "$corpus" --preset qwen3-80m-byte --seq_len 256 --per_device_train_batch_size 128 \
  --gradient_accumulation_steps 1 --max_steps 1200 --learning_rate 2e-3 --warmup_steps 100 --bf16 true \
  --router_aux_loss_coef 0.1 --experts_implementation grouped_mm --logging_steps 50 \
  --eval_max_sequences 256 --eval_batch_size 64 "$@"
