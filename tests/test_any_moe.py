"""Global-batch balance for the MoE models transformers ships, trained as they are (`modeling_qwenmoe_gb.any_moe`).

Each family is a tiny model of transformers' own class (`tests/stock_models.py`, no downloads). References are
independent of the hooks under test: the experts each router returned (a hook of the test's own on the router's
output), transformers' own `router_logits` (`output_router_logits=True`), transformers' `load_balancing_loss_func`
and float64 re-derivations.
"""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from modeling_qwenmoe_gb.any_moe import StockMoE, find_moe_layers
from modeling_qwenmoe_gb.balance import GlobalBalancer

from .stock_models import EXPERTS, TOP_K, VOCAB, available, tiny_model

# Every MoE family of the installed transformers whose router and experts the balancer reads (a family missing from
# the installed version is skipped). The families it does not read are in NOT_READ, with the reason.
FAMILIES = (
    "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "gpt_oss", "deepseek_v3", "glm4_moe",  # the first seven
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v32", "dots1",
    "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "glm4_moe_lite", "glm_moe_dsa", "granitemoe",
    "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "jamba",
    "kimi_linear", "kolibri1", "laguna", "lara_mini", "mellum", "mimo_v2_flash", "minimax", "minimax_m2",
    "nemotron_h", "phimoe", "qwen3_5_moe", "qwen3_next", "qwen4_exp", "solar_open",
)  # fmt: skip
# Refused with a ValueError naming the class (the reason is in the message).
NOT_READ = {
    "jetmoe": "experts without transformers' experts interface",
    "llama4": "experts without transformers' experts interface",
    "longcat_flash": "experts without transformers' experts interface",
    "deepseek_v4": "sqrtsoftplus scores (neither softmax nor sigmoid)",
}
# Families whose selection is the top-k of the softmax of the router logits, where transformers' micro-batch aux loss
# (`load_balancing_loss_func`, in the family's modeling module) is the reference. Excluded: phimoe (its sparsemixer
# does not select the softmax top-k, which transformers' loss assumes) and the sigmoid-scored families (transformers'
# loss applies a softmax they do not use).
TRANSFORMERS_LOSS = (
    "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "gpt_oss", "ernie4_5_moe", "flex_olmo", "granitemoe",
    "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "jamba", "lara_mini", "mellum", "minimax",
    "qwen3_5_moe", "qwen3_next", "qwen4_exp",
)  # fmt: skip
# Families whose routers hold DeepSeek-V3's aux-free selection bias (`e_score_correction_bias`).
BIASED = (
    "deepseek_v3", "glm4_moe", "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_v32", "dots1", "ernie4_5_moe",
    "exaone_moe", "glm4_moe_lite", "glm_moe_dsa", "hy_v3", "hy_v4", "kimi_linear", "kolibri1", "laguna",
    "mimo_v2_flash", "minimax_m2", "nemotron_h", "solar_open",
)  # fmt: skip


def family_params(names):
    return [pytest.param(n, marks=pytest.mark.skipif(not available(n), reason=f"no {n} here")) for n in names]


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 7) ids and a mask whose first row is left-padded by 2 and last row right-padded by 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, -1:] = 0
    return ids, mask


class Selections:
    """The experts each router returned (its third output), per layer: the test's own hook, not the balancer's."""

    def __init__(self, stock: StockMoE):
        self.seen: dict[int, torch.Tensor] = {}
        self.handles = [layer.routers[0].register_forward_hook(self._keep(i)) for i, layer in enumerate(stock.layers)]

    def _keep(self, layer):
        def hook(module, args, output):
            self.seen[layer] = output[2].detach()

        return hook

    def counts(self, mask: torch.Tensor) -> torch.Tensor:
        """(L, B, E) bincount of each sequence's real tokens' selections."""
        batch, seq = mask.shape
        per_layer = []
        for layer in sorted(self.seen):
            index = self.seen[layer].reshape(batch, seq, -1)
            rows = [torch.bincount(index[b][mask[b].bool()].flatten(), minlength=EXPERTS) for b in range(batch)]
            per_layer.append(torch.stack(rows))
        return torch.stack(per_layer).float()


def float64_lbl(router_logits, counts: torch.Tensor, mask: torch.Tensor, scoring: str) -> torch.Tensor:
    """E · Σ_i f_i P_i per layer, averaged over layers, in float64: f from `counts` (L, E) over K · real tokens, P the
    mean over real tokens of softmax(logits) or of sigmoid(logits) normalised over the experts."""
    real = mask.reshape(-1).bool()
    losses = []
    for logits, c in zip(router_logits, counts):
        x = logits.detach().double()[real]  # (T_real, E)
        p = x.softmax(-1) if scoring == "softmax" else x.sigmoid() / x.sigmoid().sum(-1, keepdim=True)
        f = c.double() / (TOP_K * real.sum())
        losses.append(EXPERTS * (f * p.mean(0)).sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_counts_and_micro_loss_equal_independent_references(family):
    model = tiny_model(family).train()
    balancer = GlobalBalancer(model, balance_scope="micro", router_aux_loss_coef=1.0)
    stock = balancer.moe_model
    selections = Selections(stock)
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True, use_cache=False)
    stats = balancer.router_stats(out)
    assert stats.counts.shape == (len(stock.layers), 3, EXPERTS)
    torch.testing.assert_close(stats.counts, selections.counts(mask), rtol=0, atol=0)  # padding not counted
    torch.testing.assert_close(stats.num_tokens, mask.sum(1).float().expand(len(stock.layers), 3))
    loss, parts = balancer(stats)
    logits = [x for x in out.router_logits if x is not None][-len(stock.layers) :]
    expected = float64_lbl(logits, selections.counts(mask).sum(1), mask, stock.scoring)
    torch.testing.assert_close(parts["lbl"].double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()  # P is differentiable: the router gets a gradient from the balance loss alone
    router_grads = [p.grad for layer in stock.layers for p in layer.routers[0].parameters() if p.grad is not None]
    assert router_grads and any(g.abs().sum() > 0 for g in router_grads)


@pytest.mark.parametrize("family", family_params(TRANSFORMERS_LOSS))
def test_micro_loss_is_transformers_load_balancing_loss_over_k(family):
    """Per layer, transformers' own micro-batch aux loss on the same batch and mask equals K × ours (its balanced
    value is K, ours 1); ours averages the layers."""
    model = tiny_model(family).train()
    balancer = GlobalBalancer(model, balance_scope="micro")
    ids, mask = padded_batch(seed=2)
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    _, parts = balancer(balancer.router_stats(out))
    own = importlib.import_module(type(model).__module__).load_balancing_loss_func
    logits = [x for x in out.router_logits if x is not None][-len(balancer.moe_model.layers) :]
    per_layer = torch.stack([own((x,), EXPERTS, TOP_K, mask) for x in logits])
    torch.testing.assert_close(parts["lbl"], per_layer.mean() / TOP_K, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_gradient_checkpointing_counts_once_and_changes_no_gradient(family):
    runs = []
    for checkpointing in (False, True):
        model = tiny_model(family).train()
        if checkpointing:
            model.gradient_checkpointing_enable()  # transformers' default: non-reentrant
        balancer = GlobalBalancer(model, router_aux_loss_coef=0.5)
        ids, mask = padded_batch(seed=3)
        out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        stats = balancer.router_stats(out)
        balance, _ = balancer(stats)
        (out.loss + balance).backward()  # recomputes the layers under checkpointing: their hooks run again
        assert balancer.router_stats(out) is not None and torch.equal(balancer.router_stats(out).counts, stats.counts)
        buffer = balancer.step_counts.clone()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((buffer, grads))
    (buffer, grads), (buffer_ckpt, grads_ckpt) = runs
    torch.testing.assert_close(buffer_ckpt, buffer, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_reentrant_checkpointing_is_refused_with_the_fix(family):
    model = tiny_model(family).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    GlobalBalancer(model)
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)


@pytest.mark.parametrize("family", family_params(BIASED))
def test_aux_free_updates_the_models_own_bias_by_deepseek_v3s_rule(family, tmp_path):
    model = tiny_model(family).train()
    rate = 0.01
    balancer = GlobalBalancer(model, aux_free=True, aux_free_bias_update_rate=rate)
    selections = Selections(balancer.moe_model)
    before = [b.clone() for b in balancer.moe_model.biases()]
    ids, mask = padded_batch(seed=4)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    (out.loss + balancer(balancer.router_stats(out))[0]).backward()
    counts = selections.counts(mask).sum(1).double()  # (L, E)
    balancer.step()  # the optimizer-step hook: once per step, from the step's (global) counts
    for b0, b1, c in zip(before, balancer.moe_model.biases(), counts):
        expected = b0.double() + rate * torch.sign(c.mean() - c)  # DeepSeek-V3: b += u · sign(mean(c) − c)
        torch.testing.assert_close(b1.double(), expected, rtol=0, atol=1e-7)
    assert balancer.step_counts.sum() == 0  # reset for the next step
    model.save_pretrained(tmp_path / "biased")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "biased")  # transformers' own class, no package code
    assert type(again) is type(model)
    reloaded = [layer.bias.view(-1) for layer in find_moe_layers(again)]
    for b1, b2 in zip(balancer.moe_model.biases(), reloaded):
        torch.testing.assert_close(b2, b1, rtol=0, atol=0)


@pytest.mark.parametrize("family", family_params(["olmoe", "deepseek_v3", "gpt_oss"]))
def test_device_level_loss_equals_a_float64_re_derivation(family):
    """DeepSeek-V2's device-level loss over 4 groups of 2 experts: D · Σ_d F_d P_d with F_d the groups' share of the
    selections and P_d their summed mean probability, per layer, averaged."""
    model = tiny_model(family).train()
    balancer = GlobalBalancer(model, balance_scope="micro", device_balance_groups=4, device_balance_coef=1.0)
    selections = Selections(balancer.moe_model)
    ids, mask = padded_batch(seed=5)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True, use_cache=False)
    _, parts = balancer(balancer.router_stats(out))
    real = mask.reshape(-1).bool()
    logits = [x for x in out.router_logits if x is not None][-len(balancer.moe_model.layers) :]
    losses = []
    for x, c in zip(logits, selections.counts(mask).sum(1).double()):
        x = x.detach().double()[real]
        p = x.softmax(-1) if balancer.moe_model.scoring == "softmax" else x.sigmoid() / x.sigmoid().sum(-1, True)
        f_groups = c.view(4, 2).sum(-1) / c.sum()  # (D,)
        p_groups = p.mean(0).view(4, 2).sum(-1)  # (D,)
        losses.append(4 * (f_groups * p_groups).sum())
    torch.testing.assert_close(parts["device_lbl"].double(), torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def test_aux_free_is_refused_for_a_model_without_a_bias():
    with pytest.raises(ValueError, match="aux_free=True is not allowed for Qwen3MoeForCausalLM"):
        GlobalBalancer(tiny_model("qwen3_moe"), aux_free=True)


@pytest.mark.parametrize("family", [f for f in NOT_READ if available(f)])
def test_families_the_balancer_cannot_read_are_refused_by_class(family):
    model = tiny_model(family).train()
    with pytest.raises(ValueError, match=type(model).__name__):
        balancer = GlobalBalancer(model)
        ids, mask = padded_batch()
        balancer(balancer.router_stats(model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)))


def test_a_dense_model_is_refused_naming_its_class():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="model=Qwen2ForCausalLM is not a transformers MoE"):
        GlobalBalancer(Qwen2ForCausalLM(config))


def test_the_models_own_aux_loss_is_switched_off_with_a_log_line(caplog):
    model = tiny_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.01)
    with caplog.at_level("WARNING"):
        balancer = GlobalBalancer(model)
    assert model.config.output_router_logits is False
    assert "output_router_logits set to False" in caplog.text
    assert balancer.config.router_aux_loss_coef == pytest.approx(0.01 * TOP_K)  # our units: 1.0 at balance
    ids, mask = padded_batch()
    out = model.train()(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.aux_loss is None  # the loss is CE alone; the balancer adds the balance loss


def test_eval_forwards_touch_nothing():
    model = tiny_model("olmoe").train()
    balancer = GlobalBalancer(model)
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    recorded = balancer.router_stats(out)
    with torch.no_grad():
        model.eval()(input_ids=ids[:1], attention_mask=mask[:1])
    assert balancer.router_stats(None) is recorded  # the no-grad eval forward recorded nothing
    assert balancer.step_counts.sum() == 0


def test_a_second_balancer_replaces_the_first_ones_hooks():
    model = tiny_model("qwen3_moe").train()
    first = GlobalBalancer(model)
    second = GlobalBalancer(model, balance_scope="micro")
    assert first.moe_model._handles == [] and second.moe_model._handles
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert first.router_stats(out) is None and second.router_stats(out) is not None


# ----------------------------------------------------------------------------------------- PEFT, TRL


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_a_peft_wrapped_stock_model_counts_as_the_plain_one(family):
    """LoRA on attention and the fused experts (PEFT wraps the experts module) with the router in `modules_to_save`
    (PEFT copies it): at initialisation the adapters add 0, so the counts and loss equal the plain model's."""
    pytest.importorskip("peft")
    from peft import get_peft_model

    from modeling_qwenmoe_gb.sft import lora_config

    ids, mask = padded_batch()
    plain = tiny_model(family).train()
    balancer = GlobalBalancer(plain)
    out = plain(input_ids=ids, attention_mask=mask, labels=ids)
    expected = balancer.router_stats(out)
    lora = get_peft_model(tiny_model(family).train(), lora_config(rank=4, train_router=True))
    assert any("experts" in n and "lora" in n for n, _ in lora.named_parameters())
    wrapped = GlobalBalancer(lora)
    stats = wrapped.router_stats(lora(input_ids=ids, attention_mask=mask, labels=ids))
    torch.testing.assert_close(stats.counts, expected.counts, rtol=0, atol=0)
    torch.testing.assert_close(stats.prob_sums, expected.prob_sums, rtol=1e-6, atol=1e-6)
    loss, _ = wrapped(stats)
    loss.backward()
    router_copy = [p for n, p in lora.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert router_copy and all(p.grad is not None for p in router_copy)  # the trained copy gets the balance gradient


def test_sft_trainer_on_a_stock_deepseek_v3_with_aux_free():
    pytest.importorskip("trl")
    from modeling_qwenmoe_gb.sft import QwenMoeGBSFTTrainer

    from .test_sft import char_tokenizer, sft_data

    model = tiny_model("deepseek_v3", vocab_size=64)
    before = [b.clone() for b in find_moe_layers(model)[0].bias.view(1, -1)]
    args = _sft_args()
    trainer = QwenMoeGBSFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=char_tokenizer(),
                                  aux_free=True, balance_scope="global")  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("balance/global_lbl" in h and "balance/bias_spread" in h for h in logs)
    assert not torch.equal(find_moe_layers(model)[0].bias.view(1, -1), before[0][None])
    assert trainer.balancer.step_counts.sum() == 0


def _sft_args():
    from trl import SFTConfig

    return SFTConfig("unused", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                     learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     disable_tqdm=True, max_length=32)  # fmt: skip


def test_grpo_trainer_on_a_stock_model_balances_and_refuses_replay(tmp_path):
    pytest.importorskip("trl")
    from .test_rl import StepCounts, run_grpo

    counts = StepCounts()
    model = tiny_model("qwen3_moe", vocab_size=64, eos_token_id=1)
    with pytest.raises(ValueError, match="routing_replay='rollout'.*not allowed for Qwen3MoeForCausalLM"):
        run_grpo(tmp_path / "replay", "rollout", steps=1, model=model)
    trainer, logs = run_grpo(tmp_path / "none", "none", steps=2, model=model, callbacks=[counts], routing_metrics=False)
    assert all("balance/global_lbl" in h for h in logs)
    assert len(counts.counts) == 2 and all(c.sum() > 0 for c in counts.counts)  # the policy passes were counted
