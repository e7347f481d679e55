"""Benchmark accounting (no timing assertions): token counts, the FLOP formula against a hand count, arms run."""

import json

import pytest

from modeling_qwenmoe_gb.benchmark import flops_per_token, main, matmul_params_per_token

from .conftest import tiny_config


def test_flop_formula_against_a_hand_count():
    # hidden 32, 4 heads x 8, 2 kv heads, 2 layers, 8 experts of 16 top-2, shared 32, vocab 99
    cfg = tiny_config()
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32  # q, k, v, o
    moe = 2 * 3 * 32 * 16 + 8 * 32 + 3 * 32 * 32 + 32  # 2 routed experts, router, shared expert, shared gate
    head = 32 * 99
    assert matmul_params_per_token(cfg) == 2 * (attn + moe) + head
    seq = 10
    attention = 2 * 2 * (seq / 2) * 32 * 3  # per layer: QK^T and AV, 2 FLOPs a MAC, fwd + bwd (x3), causal half
    assert flops_per_token(cfg, seq) == pytest.approx(6 * (2 * (attn + moe) + head) + 2 * attention)


def test_benchmark_runs_every_arm_and_counts_tokens(tmp_path):
    out = tmp_path / "bench.json"
    results = main([
        "--preset", "tiny", "--models", "micro,global,global+auxfree,transformers-qwen2",
        "--experts_implementations", "eager", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
        "--rounds", "1", "--out", str(out),
    ])  # fmt: skip
    assert [r.name for r in results] == ["micro", "global", "global+auxfree", "transformers-qwen2"]
    for r in results:
        assert r.tokens_per_step == 32 and r.tokens_per_s == pytest.approx(32 / (r.step_ms / 1e3))
        assert r.mfu is None  # no peak known for a CPU
    saved = json.loads(out.read_text())
    assert len(saved["results"]) == 4 and saved["meta"]["args"]["seq"] == 16
    qwen3_shape = '{"use_qk_norm": true, "shared_expert_intermediate_size": 0}'
    qwen3 = main(["--preset", "tiny", "--config_overrides", qwen3_shape,
                  "--models", "global,transformers-qwen3", "--experts_implementations", "eager", "--batch", "1",
                  "--seq", "8", "--steps", "1", "--warmup", "0", "--rounds", "1", "--peak_tflops", "1"])  # fmt: skip
    assert qwen3[1].name == "transformers-qwen3" and qwen3[1].mfu > 0
