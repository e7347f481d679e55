#!/usr/bin/env bash
# GPU benchmark recipe (one H100/H200): the numbers in BENCHMARKS.md. Usage: bash scripts/recipes/bench_gpu.sh OUT_DIR
# Uncompiled runs first; the compiled runs come last and a failure there does not lose the earlier results.
set -euo pipefail
out=${1:-bench-out}
mkdir -p "$out"
bench() { python scripts/benchmark.py "$@"; }
# 80M Qwen3-shaped model, 128 x 256 tokens, bf16: ours (micro, global, global+aux-free) vs transformers' Qwen3-MoE
bench --preset qwen3-80m-byte --dtype bf16 --batch 128 --seq 256 --steps 6 --warmup 3 \
  --models micro,global,global+auxfree,transformers-qwen3 --experts_implementations grouped_mm,eager \
  --profile "$out/profile_80m.txt" --out "$out/bench_80m.json" | tee "$out/bench_80m.md"
# global vs micro step time in alternating pairs (drift cancels)
bench --preset qwen3-80m-byte --dtype bf16 --batch 128 --seq 256 --models "" --paired micro,global \
  --paired_steps 100 --warmup 5 --experts_implementations grouped_mm --out "$out/bench_paired.json" \
  | tee "$out/bench_paired.md"
# long sequences: peak memory with transformers' router logits kept vs our O(L·B·E) statistics
bench --preset qwen3-80m-byte --dtype bf16 --batch 2 --seq 8192 --steps 3 --warmup 2 --rounds 1 \
  --models global,transformers-qwen3 --experts_implementations grouped_mm --out "$out/bench_long.json" \
  | tee "$out/bench_long.md"
# the paper's 3.4B-A0.6B shape: MFU
bench --preset qwenmoe-gb-3.4b-a0.6b --dtype bf16 --batch 16 --seq 1024 --steps 4 --warmup 2 --rounds 1 \
  --models global --experts_implementations grouped_mm --out "$out/bench_3b.json" | tee "$out/bench_3b.md"
# MoE-aware recompute against whole-layer gradient checkpointing (ours and transformers'): kept for backward, peak,
# step time, and the largest micro-batch in transformers' (no checkpointing) memory, measured
bench --preset qwenmoe-gb-3.4b-a0.6b --dtype bf16 --batch 4 --seq 1024 --steps 4 --warmup 2 --rounds 1 \
  --models global,global+expert_act,global+experts,global+moe,global+gc,transformers-qwen2,transformers-qwen2+gc \
  --experts_implementations grouped_mm --budget_from transformers-qwen2 --out "$out/bench_recompute_3b.json" \
  | tee "$out/bench_recompute_3b.md" || echo "recompute 3.4B run failed"
# whole-model torch.compile (what TrainingArguments(torch_compile=True) does) for every arm, ours and transformers'
bench --preset qwen3-80m-byte --dtype bf16 --batch 128 --seq 256 --steps 6 --warmup 3 \
  --models micro,global,global+auxfree,transformers-qwen3 --experts_implementations grouped_mm --compile model \
  --out "$out/bench_80m_compiled.json" | tee "$out/bench_80m_compiled.md" || echo "compiled 80M run failed"
bench --preset qwen3-80m-byte --dtype bf16 --batch 128 --seq 256 --models "" --paired micro,global \
  --paired_steps 100 --warmup 5 --experts_implementations grouped_mm --compile model \
  --out "$out/bench_paired_compiled.json" | tee "$out/bench_paired_compiled.md" || echo "compiled paired run failed"
bench --preset qwenmoe-gb-3.4b-a0.6b --dtype bf16 --batch 16 --seq 1024 --steps 4 --warmup 2 --rounds 1 \
  --models global --experts_implementations grouped_mm --compile model --out "$out/bench_3b_compiled.json" \
  | tee "$out/bench_3b_compiled.md" || echo "compiled 3.4B run failed"
