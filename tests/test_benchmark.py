"""Benchmark accounting (no timing assertions): token counts, the FLOP formula against a hand count, arms run."""

import json

import pytest
import torch

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.benchmark import (
    _kernel_calls,
    build,
    compiled_step_kernels,
    flops_per_token,
    main,
    matmul_params_per_token,
    step_accounting,
    tracked_memory,
)

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


def _accounting(name: str, cfg, ids, impl: str = "eager"):
    torch.manual_seed(0)
    state = QwenMoeGBForCausalLM(cfg).state_dict()
    model, balancer = build(name, cfg, impl, torch.device("cpu"), torch.float32, state)
    return step_accounting(model, balancer, ids)


def test_saved_activations_differ_by_exactly_the_z_loss_graph():
    # With the z-loss on, logsumexp keeps the fp32 (T, E) logits and its (T,) output per layer (+ the loss's own (L,)
    # denominators, a few bytes); off, the z statistic is a metric outside the graph.
    cfg = tiny_config(pad_token_id=None)
    ids = torch.randint(0, 99, (3, 20))
    _, off = _accounting("global", cfg, ids)
    _, on = _accounting("global", tiny_config(pad_token_id=None, router_z_loss_coef=0.01), ids)
    layers, tokens, experts = 2, 3 * 20, 8
    assert (on - off) * 2**20 == pytest.approx(layers * (tokens * experts * 4 + tokens * 4), abs=8 * layers * 4)


def test_global_scope_adds_a_few_ops_whatever_the_depth_and_keeps_less_than_transformers():
    ids = torch.randint(0, 99, (4, 64))
    extra = []
    for layers in (2, 4):
        cfg = tiny_config(
            pad_token_id=None, use_qk_norm=True, shared_expert_intermediate_size=0, num_hidden_layers=layers
        )
        micro_ops, micro_mib = _accounting("micro", cfg, ids, "grouped_mm")
        global_ops, global_mib = _accounting("global", cfg, ids, "grouped_mm")
        assert 0 <= (global_mib - micro_mib) * 2**20 <= 16 * layers * 8  # O(L·E): the global f, never O(T)
        extra.append(global_ops - micro_ops)
    # the global f is one loss over the stacked (L, E) counts: a fixed handful of small ops, nothing per layer (the
    # micro scope's one-group sum of the statistics is as many)
    assert extra[0] == extra[1] and abs(extra[0]) <= 8
    hf_ops, hf_mib = _accounting("transformers-qwen3", cfg, ids, "grouped_mm")
    assert global_ops <= hf_ops  # a whole step, balance loss and balancer step included, in no more ops
    # transformers keeps each layer's (T, E) logits for its loss and a second fp32 softmax of them: about two more
    # (L, T, E) fp32 sets than ours (ours keeps a few (L, T) and (L, B, E) tensors transformers does not)
    one_set = 4 * 4 * 64 * 8 * 4 / 2**20  # L · T · E fp32
    assert hf_mib - global_mib >= 1.5 * one_set


WRAPPER = """
def call(self, args):
    arg0_1, arg1_1 = args
    buf0 = empty_strided_cpu((2, 2), (2, 1), torch.float32)
    cpp_fused_add_0(buf0, arg0_1)
    buf1 = empty_strided_cpu((2, 2), (2, 1), torch.float32)
    extern_kernels.mm(buf0, arg1_1, out=buf1)
    buf2 = torch.ops.aten.topk.default(buf1, 2)
    buf3 = reinterpret_tensor(buf1, (4, ), (1, ), 0); del buf1  # reuse
    assert_size_stride(buf3, (4, ), (1, ))
    del buf0
    triton_poi_fused_mul_1.run(buf3, 4, stream=stream0)
    return (buf3, )


def benchmark_compiled_module(times=10, repeat=10):
    cpp_fused_add_0(buf0, arg0_1)
"""


def test_kernel_count_of_an_inductor_wrapper_by_hand():
    # generated C++ kernel, extern mm, fallback op, Triton kernel; not the allocations, views, asserts, dels, or the
    # benchmark harness after `call`
    assert _kernel_calls(WRAPPER) == 4
    assert _kernel_calls("def f():\n    pass\n") == 0


def test_compiled_step_launches_no_more_kernels_than_transformers():
    cfg = tiny_config(pad_token_id=None, use_qk_norm=True, shared_expert_intermediate_size=0)
    ids = torch.randint(0, 99, (2, 32))
    torch.manual_seed(0)
    state = QwenMoeGBForCausalLM(cfg).state_dict()
    counts = {}
    for name in ("global", "transformers-qwen3"):
        model, balancer = build(name, cfg, "grouped_mm", torch.device("cpu"), torch.float32, state, "model")
        counts[name] = compiled_step_kernels(model, balancer, ids)
    kernels, eager = counts["global"]
    assert kernels > 20 and 0 < eager <= 10  # the balancer's own eager ops: count all-reduce/buffer, record, step
    assert counts["transformers-qwen3"][1] == 0
    assert kernels + eager <= counts["transformers-qwen3"][0]


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile='fast' is unknown: allowed"):
        build("micro", tiny_config(), "eager", torch.device("cpu"), torch.float32, compiled="fast")


def test_paired_ratio_alternates_two_arms_and_reports_the_median(tmp_path):
    out = tmp_path / "paired.json"
    results = main([
        "--preset", "tiny", "--models", "", "--paired", "micro,global", "--paired_steps", "3", "--warmup", "1",
        "--experts_implementations", "eager,grouped_mm", "--batch", "2", "--seq", "16", "--out", str(out),
    ])  # fmt: skip
    assert results == []
    paired = json.loads(out.read_text())["paired"]
    assert [p["experts_implementation"] for p in paired] == ["eager", "grouped_mm"]
    for p in paired:
        assert p["arms"] == ["micro", "global"] and p["pairs"] == 3
        assert 0 < p["iqr"][0] <= p["ratio"] <= p["iqr"][1]
    with pytest.raises(ValueError, match="--paired='micro' names 1 arms: allowed exactly two"):
        main(["--preset", "tiny", "--models", "", "--paired", "micro"])
    with pytest.raises(ValueError, match="with --distributed: allowed in one process only"):
        main(["--preset", "tiny", "--models", "", "--paired", "micro,global", "--distributed"])


def test_tracked_peak_holds_the_parameters_and_every_saved_activation():
    cfg = tiny_config(pad_token_id=None)
    ids = torch.randint(0, 99, (4, 32))
    torch.manual_seed(0)
    model, balancer = build("global", cfg, "grouped_mm", torch.device("cpu"), torch.float32)
    _, saved_mib = step_accounting(model, balancer, ids)
    _, peak_gib = tracked_memory(model, balancer, ids)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # torch's tracker and our saved-tensor count are independent: at the end of the forward both sets are alive
    assert peak_gib * 2**30 >= param_bytes + saved_mib * 2**20
    assert peak_gib * 2**30 <= 4 * param_bytes + 4 * saved_mib * 2**20  # and nothing far beyond them


def test_cli_bench_is_the_benchmark(tmp_path):
    from modeling_qwenmoe_gb.cli import main as cli

    out = tmp_path / "cli.json"
    cli([
        "bench", "--preset", "tiny", "--models", "global", "--experts_implementations", "eager", "--batch", "1",
        "--seq", "8", "--steps", "1", "--warmup", "0", "--rounds", "1", "--no-accounting", "--out", str(out),
    ])  # fmt: skip
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["results"]] == ["global"] and saved["results"][0]["tokens_per_step"] == 8


@pytest.mark.distributed
def test_paired_layouts_time_ep_against_fsdp_under_torchrun(tmp_path):
    """`--paired_layouts fsdp,fsdp+ep` on 2 gloo processes: both engine layouts train side by side, pairs reported."""
    import os
    import subprocess
    from pathlib import Path

    from .dist_common import torchrun

    out = tmp_path / "layouts.json"
    cmd = [*torchrun(), "scripts/benchmark.py", "--models", "", "--paired_layouts", "fsdp,fsdp+ep", "--preset", "tiny",
           "--paired_steps", "3", "--warmup", "1", "--batch", "2", "--seq", "16", "--experts_implementations", "eager",
           "--out", str(out)]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (paired,) = json.loads(out.read_text())["paired"]
    assert paired["layouts"] == ["fsdp", "fsdp+ep"] and paired["world_size"] == 2 and paired["pairs"] == 3
    assert 0 < paired["iqr"][0] <= paired["ratio"] <= paired["iqr"][1]
    with pytest.raises(ValueError, match="needs torchrun"):
        main(["--preset", "tiny", "--models", "", "--paired_layouts", "fsdp,fsdp+ep"])


def test_recompute_arms_keep_less_and_fit_more_sequences_in_transformers_budget(tmp_path):
    """The recompute arms (`global+expert_act`, `+experts`, `+moe`) and whole-layer checkpointing (`+gc`, ours and
    transformers') run; what is kept for backward falls mode by mode; `--budget_from` reports, measured, the largest
    micro-batch whose peak fits the named arm's."""
    results = main([
        "--preset", "tiny", "--config_overrides", '{"moe_intermediate_size": 64}',
        "--models", "global,global+expert_act,global+experts,global+moe,global+gc,transformers-qwen2,"
        "transformers-qwen2+gc", "--experts_implementations", "grouped_mm", "--batch", "2", "--seq", "64",
        "--steps", "1", "--warmup", "0", "--rounds", "1", "--budget_from", "transformers-qwen2",
    ])  # fmt: skip
    kept = {r.name: r.kept_mib for r in results}
    assert kept["global"] > kept["global+expert_act"] > kept["global+experts"] > kept["global+moe"] > kept["global+gc"]
    assert kept["transformers-qwen2+gc"] < kept["transformers-qwen2"]
    fits = {r.name: r.max_batch_in_budget for r in results}
    assert fits["transformers-qwen2"] >= 2 and fits["global+moe"] >= fits["global"] >= fits["transformers-qwen2"]
    with pytest.raises(ValueError, match="arm 'global\\+everything' is unknown"):
        main(["--preset", "tiny", "--models", "global+everything", "--steps", "1", "--rounds", "1"])
