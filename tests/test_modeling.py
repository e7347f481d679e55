"""Model behaviour: dense equivalence, aux-free routing, router stats, loss wiring, generation."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM, balance_loss
from modeling_qwenmoe_gb.modeling_qwenmoe_gb import QwenMoeGBSparseMoeBlock, QwenMoeGBTopKRouter

from .conftest import tiny_config


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_one_expert_top1_equals_dense_mlp(impl):
    cfg = tiny_config(num_experts=1, num_experts_per_tok=1, shared_expert_intermediate_size=0, norm_topk_prob=False)
    cfg._experts_implementation = impl
    block = QwenMoeGBSparseMoeBlock(cfg)
    torch.nn.init.normal_(block.experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(block.experts.down_proj, std=0.2)
    dense = Qwen2MoeMLP(cfg, intermediate_size=cfg.moe_intermediate_size)
    inter = cfg.moe_intermediate_size
    with torch.no_grad():
        dense.gate_proj.weight.copy_(block.experts.gate_up_proj[0, :inter])
        dense.up_proj.weight.copy_(block.experts.gate_up_proj[0, inter:])
        dense.down_proj.weight.copy_(block.experts.down_proj[0])
    x = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    out, _ = block(x)
    ref = dense(x)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad, retain_graph=True)
    (rx,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(gx, rx)
    g_gate_up, g_down = torch.autograd.grad(out, (block.experts.gate_up_proj, block.experts.down_proj), grad)
    r_gate, r_up, r_down = torch.autograd.grad(
        dense(x), (dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight), grad
    )
    torch.testing.assert_close(g_gate_up[0], torch.cat([r_gate, r_up]))
    torch.testing.assert_close(g_down[0], r_down)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_aux_free_bias_changes_selection_not_gate_weights(scoring):
    plain = QwenMoeGBTopKRouter(tiny_config(router_scoring_func=scoring, norm_topk_prob=False))
    biased = QwenMoeGBTopKRouter(tiny_config(router_scoring_func=scoring, aux_free=True, norm_topk_prob=False))
    torch.nn.init.normal_(plain.weight)
    biased.load_state_dict(plain.state_dict())
    x = torch.randn(50, 32)
    for a, b in zip(plain(x), biased(x)):  # zero bias: identical router
        torch.testing.assert_close(a, b)
    biased.expert_bias[3] = 10.0  # force expert 3 into every top-k
    logits, weights, index, probs = biased(x)
    assert (index == 3).any(-1).all()
    _, _, plain_index, plain_probs = plain(x)
    assert not (plain_index == 3).any(-1).all()
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    torch.testing.assert_close(weights, scores.gather(-1, index))  # unbiased scores of the selected experts
    torch.testing.assert_close(probs, plain_probs)


def test_router_stats_shapes_and_padding():
    cfg = tiny_config()
    model = QwenMoeGBForCausalLM(cfg).eval()
    ids = torch.randint(1, 99, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    out = model(ids, attention_mask=mask)
    stats = out.router_stats
    assert stats.counts.shape == (2, 3, 8) and stats.prob_sums.shape == (2, 3, 8)
    assert stats.num_tokens.shape == (2, 3) and stats.z_sums.shape == (2, 3)
    assert stats.num_tokens[:, 1].tolist() == [4.0, 4.0]
    torch.testing.assert_close(stats.counts.sum(-1), 2 * stats.num_tokens)
    torch.testing.assert_close(stats.prob_sums.sum(-1), stats.num_tokens)
    # padding excluded: sequence 1 alone, unpadded, gives the same stats for its real tokens (left padding)
    alone = model(ids[1:2, 3:]).router_stats
    torch.testing.assert_close(alone.counts[:, 0], stats.counts[:, 1])


def test_router_logits_output_matches_transformers_convention():
    model = QwenMoeGBForCausalLM(tiny_config()).eval()
    out = model(torch.randint(1, 99, (2, 5)), output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (10, 8)


def test_loss_is_ce_plus_balance_in_training_only():
    cfg = tiny_config(router_z_loss_coef=0.01, device_balance_groups=2)
    model = QwenMoeGBForCausalLM(cfg)
    ids = torch.randint(1, 99, (2, 9))
    model.eval()
    ce = model(ids, labels=ids).loss
    model.train()
    out = model(ids, labels=ids)
    expected, parts = balance_loss(cfg, out.router_stats)
    torch.testing.assert_close(out.loss, ce + expected)
    torch.testing.assert_close(out.aux_loss, parts["lbl"])
    torch.testing.assert_close(model(ids, labels=ids, add_balance_loss=False).loss, ce)
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_experts_implementations_agree():
    eager = QwenMoeGBForCausalLM(tiny_config()).eval()
    eager.set_experts_implementation("eager")
    assert eager.config._experts_implementation == "eager"
    grouped = QwenMoeGBForCausalLM(tiny_config()).eval()
    grouped.set_experts_implementation("grouped_mm")
    grouped.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 99, (2, 6))
    torch.testing.assert_close(eager(ids).logits, grouped(ids).logits, rtol=1e-5, atol=1e-5)


class _GroupedMMDtypes(TorchDispatchMode):
    """The dtypes of the operands of every `aten._grouped_mm` that runs."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[torch.dtype, torch.dtype]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._grouped_mm.default:
            self.seen.add((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


def test_grouped_mm_experts_compute_in_the_autocast_dtype_like_eager():
    """fp32 weights under bf16 autocast (the Trainer's `--bf16 true`): grouped_mm's GEMMs run in bf16 as eager's
    matmuls do (`_grouped_mm` has no autocast kernel; transformers alone runs it in fp32), forward and backward; the
    loss and the experts' fp32 gradients agree with eager under autocast; without autocast it stays fp32."""
    torch.manual_seed(0)
    eager = QwenMoeGBForCausalLM(tiny_config()).train()
    eager.set_experts_implementation("eager")
    grouped = QwenMoeGBForCausalLM(tiny_config()).train()
    grouped.set_experts_implementation("grouped_mm")
    grouped.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 99, (2, 16))
    dtypes = _GroupedMMDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = eager(ids, labels=ids)
        with dtypes:
            got = grouped(ids, labels=ids)
    with dtypes:
        got.loss.backward()
    want.loss.backward()
    assert dtypes.seen == {(torch.bfloat16, torch.bfloat16)}
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-3, atol=0)
    for name in ("gate_up_proj", "down_proj"):
        mine, theirs = (getattr(m.model.layers[0].mlp.experts, name) for m in (grouped, eager))
        assert mine.dtype == mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0.05, atol=1e-5)
    plain = _GroupedMMDtypes()
    with plain:
        grouped(ids, labels=ids)
    assert plain.seen == {(torch.float32, torch.float32)}


def test_generate_and_bf16_keeps_fp32_bias():
    model = QwenMoeGBForCausalLM(tiny_config(aux_free=True)).eval()
    ids = torch.randint(1, 99, (1, 4))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    model.to(torch.bfloat16)
    assert model.model.layers[0].mlp.gate.expert_bias.dtype == torch.float32
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16
    assert torch.isfinite(model(ids).logits.float()).all()


def test_gradient_checkpointing_gives_same_stats_and_grads():
    cfg = tiny_config()
    ids = torch.randint(1, 99, (2, 8))
    plain = QwenMoeGBForCausalLM(cfg).train()
    ckpt = QwenMoeGBForCausalLM(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable()
    a, b = plain(ids, labels=ids), ckpt(ids, labels=ids)
    torch.testing.assert_close(a.router_stats.counts, b.router_stats.counts)
    a.loss.backward()
    b.loss.backward()
    ga = plain.model.layers[1].mlp.gate.weight.grad
    torch.testing.assert_close(ga, ckpt.model.layers[1].mlp.gate.weight.grad)


@pytest.mark.parametrize("labels", [False, True])
def test_return_dict_false_gives_the_output_as_a_tuple(labels):
    """transformers' convention: `return_dict=False` returns `output.to_tuple()` (loss first when labels are given),
    on the causal LM and on the base model, with the cache included when `use_cache`."""
    model = QwenMoeGBForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 99, (2, 6))
    kwargs = {"labels": ids} if labels else {}
    as_dict = model(ids, use_cache=True, **kwargs)
    as_tuple = model(ids, use_cache=True, return_dict=False, **kwargs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for got, expected in zip(as_tuple, as_dict.to_tuple()):
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(got, expected)
    torch.testing.assert_close(as_tuple[0], as_dict.loss if labels else as_dict.logits)
    base = model.model(ids, return_dict=False)
    assert isinstance(base, tuple)
    torch.testing.assert_close(base[0], model.model(ids).last_hidden_state)


def test_forward_return_annotations_are_the_output_classes():
    """transformers reads the output fields from the forward's return annotation: it must be the class itself, not a
    string (no `from __future__ import annotations` in the Hub files)."""
    import inspect

    from modeling_qwenmoe_gb.modeling_qwenmoe_gb import (
        QwenMoeGBCausalLMOutputWithPast,
        QwenMoeGBModel,
        QwenMoeGBModelOutputWithPast,
    )

    assert inspect.signature(QwenMoeGBForCausalLM.forward).return_annotation is QwenMoeGBCausalLMOutputWithPast
    assert inspect.signature(QwenMoeGBModel.forward).return_annotation is QwenMoeGBModelOutputWithPast
    assert "router_logits" in QwenMoeGBCausalLMOutputWithPast.__dataclass_fields__


def test_declares_what_transformers_qwen_moe_models_declare():
    """The class-level capabilities and parallel plans of transformers' Qwen2-MoE / Qwen3-MoE causal LMs."""
    from transformers import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

    for control in (Qwen2MoeForCausalLM, Qwen3MoeForCausalLM):
        for name in ("_tp_plan", "_pp_plan", "_fsdp_plan", "_tied_weights_keys"):
            assert getattr(QwenMoeGBForCausalLM, name) == getattr(control, name), name
        for name in (
            "_can_compile_fullgraph", "_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn",
            "_supports_attention_backend", "supports_gradient_checkpointing",
        ):  # fmt: skip
            assert getattr(QwenMoeGBForCausalLM, name) is getattr(control, name) is True, name
