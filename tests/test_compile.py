"""torch.compile (what `TrainingArguments(torch_compile=True)` does): the whole model, router statistics and
cross-entropy included, is one graph with no breaks, and a training step equals eager."""

import copy

import torch

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.balance import GlobalBalancer

from .conftest import tiny_config


def _train_step(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, labels=ids, add_balance_loss=False)
    loss = out.loss + GlobalBalancer(model)(out.router_stats)[0]
    loss.backward()
    return loss.detach(), out.router_stats


def test_whole_model_is_one_graph_and_a_training_step_equals_eager():
    cfg = tiny_config(balance_scope="global", router_z_loss_coef=0.01, aux_free=True)
    eager = QwenMoeGBForCausalLM(cfg).train()
    eager.set_experts_implementation("grouped_mm")
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)  # fullgraph: any graph break raises
    ids = torch.randint(1, 99, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # a padded sequence: the statistics must leave its padding out in the graph too
    loss, stats = _train_step(eager, ids, mask)
    loss_c, stats_c = _train_step(compiled, ids, mask)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(stats_c.counts, stats.counts, rtol=0, atol=0)
    torch.testing.assert_close(stats_c.prob_sums, stats.prob_sums)
    assert stats.num_tokens[:, 1].tolist() == [17.0, 17.0]
    params_c = dict(compiled.named_parameters())
    for name, param in eager.named_parameters():
        torch.testing.assert_close(params_c[f"_orig_mod.{name}"].grad, param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_balance_loss_equals_eager_without_a_mask_too():
    # the balancer's `compile=True` (what the Trainer sets for `torch_compile`): one graph (fullgraph), the same loss
    # and router gradients as the eager balancer, on the no-mask statistics path
    cfg = tiny_config(balance_scope="global", device_balance_groups=2, micro_balance_coef=0.1)
    model = QwenMoeGBForCausalLM(cfg).train()
    ids = torch.randint(1, 99, (3, 24))
    grads = []
    for compile_loss in (False, True):
        model.zero_grad()
        balancer = GlobalBalancer(model, compile=compile_loss)
        for _ in range(2):  # two micro-steps: the second one's f holds both micro-batches' counts
            out = model(input_ids=ids, labels=ids, add_balance_loss=False)
            balance, parts = balancer(out.router_stats)
            (out.loss + balance).backward()
        grads.append((balance.detach(), model.model.layers[0].mlp.gate.weight.grad.clone(), parts["device_lbl"]))
        balancer.step()
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)


def test_quantile_balancing_statistics_compile_in_the_graph():
    """QB's margin histograms and micro-batch quantiles (padding masked) are part of the one graph and equal eager."""
    cfg = tiny_config(aux_free=True, aux_free_method="quantile", quantile_scope="micro_mean", router_aux_loss_coef=0.0)
    eager = QwenMoeGBForCausalLM(cfg).train()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    ids = torch.randint(1, 99, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0
    stats = eager(input_ids=ids, attention_mask=mask).router_stats
    stats_c = compiled(input_ids=ids, attention_mask=mask).router_stats
    assert int(stats.margin_histogram.sum()) == 2 * 8 * 27  # L × E × real tokens
    torch.testing.assert_close(stats_c.margin_histogram, stats.margin_histogram, rtol=0, atol=0)
    torch.testing.assert_close(stats_c.margin_quantiles, stats.margin_quantiles)
