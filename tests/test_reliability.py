"""Numerics and edge cases: collapsed routing, low precision, huge counts, bad balancer options."""

import pytest
import torch

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM, RouterStats
from modeling_qwenmoe_gb.balance import GlobalBalancer

from .conftest import tiny_config


def test_all_tokens_to_the_same_experts_stay_finite():
    model = QwenMoeGBForCausalLM(tiny_config(aux_free=True, router_z_loss_coef=0.1)).train()
    for router in model.model.moe_routers():
        router.expert_bias[:2] = 100.0  # every token selects experts 0 and 1
    balancer = GlobalBalancer(model)
    ids = torch.randint(1, 99, (2, 9))
    out = model(input_ids=ids, labels=ids, add_balance_loss=False)
    assert (out.router_stats.counts[:, :, 2:] == 0).all()
    loss, parts = balancer(out.router_stats)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    (out.loss + loss).backward()
    balancer.step()
    metrics = balancer.pop_metrics()
    assert metrics["balance/maxvio_global"] == pytest.approx(3.0)  # 2 of 8 experts take everything: (1/4 - 1/8)/(1/8)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_is_finite(dtype):
    model = QwenMoeGBForCausalLM(tiny_config(router_z_loss_coef=0.01)).to(dtype).train()
    model.set_experts_implementation("eager")
    ids = torch.randint(1, 99, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :12] = 0  # a pad-only sequence
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.balance_loss)
    stats = out.router_stats
    assert stats.counts.dtype == torch.float32 and stats.prob_sums.dtype == torch.float32
    assert stats.counts[:, 0].sum() == 0 and stats.num_tokens[:, 0].sum() == 0
    assert model.model.layers[0].mlp.gate.expert_bias.dtype == torch.float32


def test_step_counts_are_exact_at_a_billion_tokens():
    model = QwenMoeGBForCausalLM(tiny_config()).train()
    balancer = GlobalBalancer(model)
    big = torch.full((2, 1, 8), 2.0**27)  # 1.3e8 selections per expert per micro-step (exact in fp32)
    stats = RouterStats(big, torch.ones(2, 1, 8), torch.full((2, 1), 2.0**29), torch.zeros(2, 1))
    for _ in range(16):
        balancer.accumulate(stats)
    assert balancer.step_counts.dtype == torch.int64
    assert (balancer.step_counts == 16 * 2**27).all()  # 2.1e9 per expert, 1.7e10 selections: no rounding
    assert float((balancer.step_counts.sum(-1) / 2)[0]) == 8 * 2**30  # 8.6e9 tokens


def test_balancer_option_errors():
    model = QwenMoeGBForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="bias_update='sometimes' is unknown"):
        GlobalBalancer(model, bias_update="sometimes")
    with pytest.raises(ValueError, match="sync_group_size=3 must be a positive divisor of world size 1"):
        GlobalBalancer(model, sync_group_size=3)
    with pytest.raises(ValueError, match="model=Linear is not a transformers MoE the balancer can read"):
        GlobalBalancer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"unknown balance options \['balance_scop'\]"):
        GlobalBalancer(model, balance_scop="global")
    with pytest.raises(ValueError, match="balance_scope='nope' is unknown"):
        GlobalBalancer(model, balance_scope="nope")


def test_load_best_model_at_end_restores_the_fused_experts(tmp_path):
    from transformers import TrainingArguments

    from modeling_qwenmoe_gb.trainer import QwenMoeGBTrainer

    from .dist_common import repeated_sequence_dataset

    model = QwenMoeGBForCausalLM(tiny_config(vocab_size=61))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=4, eval_strategy="steps",
                             eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="loss", greater_is_better=True, learning_rate=5e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    data = repeated_sequence_dataset(8)
    trainer = QwenMoeGBTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")  # "best" = higher eval loss here: the model must go back 2 steps
    saved = QwenMoeGBForCausalLM.from_pretrained(best)
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
