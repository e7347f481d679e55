"""Existing Qwen2-MoE / Qwen3-MoE checkpoints load into QwenMoE-GB with identical logits and fine-tune."""

import pytest
import torch
import transformers
from transformers import TrainingArguments

from modeling_qwenmoe_gb.convert import from_qwen_moe, qwen_moe_config
from modeling_qwenmoe_gb.trainer import QwenMoeGBTrainer

from .dist_common import repeated_sequence_dataset

SHAPE = dict(vocab_size=99, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)  # fmt: skip


def save_reference(kind: str, path):
    torch.manual_seed(0)
    if kind == "qwen3":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**SHAPE, head_dim=8, norm_topk_prob=True))
    else:
        model = transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(**SHAPE, shared_expert_intermediate_size=32)
        )
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_checkpoint_loads_with_identical_logits_then_fine_tunes(kind, tmp_path):
    reference = save_reference(kind, tmp_path / kind)
    model = from_qwen_moe(str(tmp_path / kind), balance_scope="global", router_aux_loss_coef=0.01).eval()
    assert model.config.use_qk_norm is (kind == "qwen3") and model.config.balance_scope == "global"
    ids = torch.randint(0, 99, (2, 9))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert all((r.expert_bias == 0).all() for r in model.model.moe_routers())
    args = TrainingArguments(str(tmp_path / "ft"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True, learning_rate=1e-2)  # fmt: skip
    before = model.model.layers[0].mlp.gate.weight.detach().clone()
    trainer = QwenMoeGBTrainer(
        model=model,
        args=args,
        train_dataset=repeated_sequence_dataset(8).map(
            lambda row: {"input_ids": [t % 99 for t in row["input_ids"]], "labels": [t % 99 for t in row["labels"]]}
        ),
    )
    trainer.train()
    assert not torch.equal(before, model.model.layers[0].mlp.gate.weight)
    assert "balance/global_lbl" in trainer.state.log_history[0]


def test_unsupported_model_type_is_rejected():
    with pytest.raises(ValueError, match="model_type='llama' cannot be converted"):
        qwen_moe_config(transformers.LlamaConfig())


def test_converted_qwen3_keeps_its_balance_strength(tmp_path, caplog):
    """A Qwen3-MoE checkpoint with K = 8: its coefficient × transformers' aux loss equals the converted coefficient ×
    our LBL, in value and in router gradient (one MoE layer, where transformers' loss is exactly K × ours)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from modeling_qwenmoe_gb import switch_balance_loss

    shape = {**SHAPE, "num_hidden_layers": 1, "num_experts": 16, "num_experts_per_tok": 8}
    torch.manual_seed(0)
    qwen = transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**shape, head_dim=8, router_aux_loss_coef=0.001, initializer_range=0.5)
    )
    qwen.save_pretrained(tmp_path / "qwen3")
    with caplog.at_level("WARNING"):
        model = from_qwen_moe(str(tmp_path / "qwen3"))
    assert model.config.router_aux_loss_coef == pytest.approx(0.008)
    assert "transformers' units" in caplog.text and "0.008" in caplog.text
    assert from_qwen_moe(str(tmp_path / "qwen3"), router_aux_loss_coef=0.05).config.router_aux_loss_coef == 0.05
    ids = torch.randint(0, 99, (2, 9))
    theirs = qwen(ids, output_router_logits=True)
    their_term = qwen.config.router_aux_loss_coef * load_balancing_loss_func(theirs.router_logits, 16, 8)
    stats = model(ids).router_stats
    our_term = model.config.router_aux_loss_coef * switch_balance_loss(
        stats.counts.sum(1), stats.prob_sums.sum(1), stats.num_tokens.sum(1)
    )
    torch.testing.assert_close(our_term, their_term)
    (their_grad,) = torch.autograd.grad(their_term, qwen.model.layers[0].mlp.gate.weight)
    (our_grad,) = torch.autograd.grad(our_term, model.model.layers[0].mlp.gate.weight)
    torch.testing.assert_close(our_grad, their_grad)
