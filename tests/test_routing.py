"""DeepSeek-style routing: group-limited selection and routed scaling against transformers' own DeepSeek-V3 and
GLM-4.5 routers; capacity dropping against a float64 re-derivation of the drop rule; what the statistics count."""

import math

import pytest
import torch
from transformers import DeepseekV3Config, Glm4MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.modeling_qwenmoe_gb import (
    QwenMoeGBTopKRouter,
    drop_over_capacity,
    expert_capacity,
    limit_to_groups,
)

from .conftest import tiny_config

E, K, G, TOPK_GROUP, D = 16, 4, 4, 2, 24


def stock_router(kind: str):
    fields = dict(
        hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TOPK_GROUP,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    if kind == "deepseek_v3":
        return DeepseekV3TopkRouter(DeepseekV3Config(**fields))
    return Glm4MoeTopkRouter(Glm4MoeConfig(**fields))


def our_router(**overrides) -> QwenMoeGBTopKRouter:
    fields = dict(
        hidden_size=D, num_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TOPK_GROUP, norm_topk_prob=True,
        routed_scaling_factor=2.5, router_scoring_func="sigmoid", aux_free=True, router_dtype="float32",
    )  # fmt: skip
    fields.update(overrides)
    return QwenMoeGBTopKRouter(tiny_config(**fields))


@pytest.mark.parametrize("kind", ["deepseek_v3", "glm4_moe"])
def test_group_limited_selection_and_weights_equal_transformers_router(kind):
    stock, ours = stock_router(kind), our_router()
    with torch.no_grad():
        stock.weight.normal_(0, 0.5)
        stock.e_score_correction_bias.normal_(0, 0.3)  # large enough to move selections and groups
        ours.weight.copy_(stock.weight)
        ours.expert_bias.copy_(stock.e_score_correction_bias)
    hidden = torch.randn(512, D)
    _, stock_weights, stock_index = stock(hidden)
    _, our_weights, our_index, _ = ours(hidden)
    stock_index, order = stock_index.sort(-1)
    our_index, our_order = our_index.sort(-1)
    torch.testing.assert_close(our_index, stock_index, rtol=0, atol=0)
    torch.testing.assert_close(our_weights.gather(-1, our_order), stock_weights.gather(-1, order), rtol=1e-6, atol=1e-7)
    # the limit binds: without it some tokens would choose experts in more than topk_group groups
    free = torch.topk(torch.sigmoid(hidden @ stock.weight.T) + stock.e_score_correction_bias, K).indices
    groups_used = torch.tensor([len(set((row // (E // G)).tolist())) for row in our_index])
    assert groups_used.max() <= TOPK_GROUP
    free_groups = torch.tensor([len(set((row // (E // G)).tolist())) for row in free])
    assert free_groups.max() > TOPK_GROUP  # so the test would catch a missing limit


def float64_group_limit(scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """The rule in plain Python: a group's score is its two best scores summed; keep the topk_group best groups."""
    out = torch.full_like(scores, float("-inf"))
    size = scores.shape[1] // n_group
    for t, row in enumerate(scores.tolist()):
        group_score = [sum(sorted(row[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        for g in sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]:
            out[t, g * size : (g + 1) * size] = scores[t, g * size : (g + 1) * size]
    return out


def test_group_limit_equals_float64_rederivation_for_softmax_scores():
    scores = torch.randn(64, E, dtype=torch.float64).softmax(-1)
    torch.testing.assert_close(limit_to_groups(scores, G, TOPK_GROUP), float64_group_limit(scores, G, TOPK_GROUP))
    ours = our_router(router_scoring_func="softmax", aux_free=False, routed_scaling_factor=1.0, norm_topk_prob=False)
    with torch.no_grad():
        ours.weight.normal_(0, 0.5)
    hidden = torch.randn(64, D)
    _, weights, index, probs = ours(hidden)
    expected = float64_group_limit(probs.double(), G, TOPK_GROUP).topk(K).indices
    torch.testing.assert_close(index.sort(-1).values, expected.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(weights.double(), probs.double().gather(-1, index), rtol=1e-6, atol=1e-9)


def float64_drop(index: torch.Tensor, weights: torch.Tensor, num_experts: int, factor: float, policy: str):
    """Which selections survive, re-derived: per expert, rank its selections (by weight, ties in token order; or in
    token order) and keep the first ceil(factor · T · K / E)."""
    tokens, top_k = index.shape
    capacity = math.ceil(factor * tokens * top_k / num_experts)
    kept = torch.zeros(tokens, top_k, dtype=torch.bool)
    for expert in range(num_experts):
        slots = [(t, k) for t in range(tokens) for k in range(top_k) if index[t, k] == expert]
        if policy == "probs":
            slots.sort(key=lambda tk: (-float(weights[tk].double()), tk[0] * top_k + tk[1]))
        for t, k in slots[:capacity]:
            kept[t, k] = True
    return kept


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, 2.0])
def test_capacity_dropping_equals_float64_rederivation(policy, factor):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(96, 8, generator=generator) + torch.linspace(0, 2, 8)  # skewed: some experts overflow
    weights, index = logits.softmax(-1).topk(2)
    new_index, new_weights = drop_over_capacity(index, weights, 8, factor, policy)
    kept = float64_drop(index, weights, 8, factor, policy)
    torch.testing.assert_close(new_index, index.masked_fill(~kept, 8), rtol=0, atol=0)
    torch.testing.assert_close(new_weights, weights * kept, rtol=0, atol=0)
    served = torch.bincount(new_index[new_index < 8], minlength=8)
    assert served.max() <= expert_capacity(96, 2, 8, factor)
    if factor <= 1.0:
        assert (~kept).any()  # the skew overflows at these factors: the test sees real drops


def capacity_model(impl: str, **overrides) -> QwenMoeGBForCausalLM:
    fields = dict(
        num_experts=8, num_experts_per_tok=2, expert_capacity_factor=1.0, n_group=4, topk_group=2,
        routed_scaling_factor=1.5, router_scoring_func="sigmoid", aux_free=True, initializer_range=0.2,
    )  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(tiny_config(**fields)).double().train()
    model.set_experts_implementation(impl)
    for router in model.model.moe_routers():
        router.expert_bias.normal_(0, 0.05)
    return model


def reference_block_output(block, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
    """Σ over the kept selections of weight · expert(x), expert by expert in float64 (dropped: index E, skipped)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.zeros_like(flat)
    experts = block.experts
    for t in range(flat.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            if e == experts.num_experts:
                continue
            gate, up = (flat[t] @ experts.gate_up_proj[e].T).chunk(2)
            out[t] += weights[t, k] * ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)
    if block.shared_expert is not None:
        out = out + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
    return out.view_as(hidden)


@pytest.mark.parametrize("impl", ["eager", "batched_mm"])
def test_dropped_selections_are_not_computed_and_not_counted(impl):
    model = capacity_model(impl)
    block = model.model.layers[0].mlp
    hidden = torch.randn(2, 24, 32, dtype=torch.float64)
    out, (logits, probs, index) = block(hidden)
    assert (index == 8).any()  # some selections were dropped
    _, weights, expected_index, _ = block.gate(hidden.reshape(-1, 32))
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(out, reference_block_output(block, hidden, index, weights), rtol=1e-10, atol=1e-12)
    ids = torch.randint(0, 99, (2, 24))
    stats = model(input_ids=ids, labels=ids).router_stats
    served = stats.counts.sum(1)  # (L, E)
    capacity = expert_capacity(48, 2, 8, 1.0)
    assert served.max() <= capacity
    dropped_fraction = 1 - served.sum(-1) / (2 * stats.num_tokens.sum(-1))
    assert (dropped_fraction > 0).all()


def test_capacity_experts_implementations_agree_and_eval_is_dropless():
    ids = torch.randint(0, 99, (2, 24))
    results = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model = capacity_model(impl).float()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.loss.detach(), out.router_stats.counts, grads)
    for impl in ("batched_mm", "grouped_mm"):
        loss, counts, grads = results[impl]
        torch.testing.assert_close(loss, results["eager"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(counts, results["eager"][1], rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results["eager"][2][name], rtol=1e-4, atol=1e-6, msg=name)
    model = capacity_model("eager").eval()
    dropless = capacity_model("eager", expert_capacity_factor=None).eval()
    with torch.no_grad():
        stats = model(input_ids=ids).router_stats
        torch.testing.assert_close(model(input_ids=ids).logits, dropless(input_ids=ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(stats.counts.sum((1, 2)), torch.full((2,), 96.0, dtype=stats.counts.dtype))


def test_routed_scaling_multiplies_the_gate_weights():
    base, scaled = our_router(routed_scaling_factor=1.0), our_router(routed_scaling_factor=2.5)
    scaled.load_state_dict(base.state_dict())
    with torch.no_grad():
        base.weight.normal_(0, 0.5)
        scaled.weight.copy_(base.weight)
    hidden = torch.randn(32, D)
    _, w1, i1, _ = base(hidden)
    _, w2, i2, _ = scaled(hidden)
    torch.testing.assert_close(i1, i2, rtol=0, atol=0)
    torch.testing.assert_close(w2, 2.5 * w1, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(n_group=3), "n_group=3 must divide num_experts=8"),
        (dict(n_group=8), "groups of at least 2"),
        (dict(n_group=4, topk_group=5), "topk_group=5 is above n_group=4"),
        (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "raise topk_group"),
        (dict(routed_scaling_factor=0), "routed_scaling_factor=0 is not allowed"),
        (dict(expert_capacity_factor=-1.0), "expert_capacity_factor=-1.0 is not allowed"),
        (dict(moe_token_drop_policy="random"), "moe_token_drop_policy='random' is unknown"),
    ],
)
def test_bad_routing_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_routing_fields_round_trip_through_save(tmp_path):
    model = capacity_model("eager", moe_token_drop_policy="position").float()
    model.save_pretrained(tmp_path)
    again = QwenMoeGBForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")  # as saved (not the default)
    for name in ("n_group", "topk_group", "routed_scaling_factor", "expert_capacity_factor", "moe_token_drop_policy"):
        assert getattr(again.config, name) == getattr(model.config, name), name
    ids = torch.randint(0, 99, (2, 24))
    model.train(), again.train()
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_dead_expert_metrics_per_step_and_over_the_window():
    from modeling_qwenmoe_gb.balance import GlobalBalancer

    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(tiny_config(aux_free=True, aux_free_bias_update_rate=0.0)).train()
    routers = model.model.moe_routers()
    with torch.no_grad():
        routers[0].expert_bias[:2] = -10.0  # layer 0: experts 0 and 1 never chosen
        routers[1].expert_bias[3] = -10.0  # layer 1: expert 3 never chosen ...
    balancer = GlobalBalancer(model, dead_expert_window=3)
    step_counts = []
    for step in range(4):
        with torch.no_grad():
            routers[1].expert_bias[5] = -10.0 if step == 0 else 10.0  # ... and expert 5 only in the first step
        ids = torch.randint(0, 99, (2, 6))
        out = model(input_ids=ids, labels=ids)
        balancer(out.router_stats)
        balancer.step()
        step_counts.append(balancer.last_step_counts.clone())
    metrics = balancer.pop_metrics()
    counts = torch.stack(step_counts)  # (steps, L, E)
    dead_per_step = (counts == 0).sum(-1).double()  # (steps, L)
    for layer in range(2):
        assert metrics[f"balance/dead_experts/layer_{layer}"] == pytest.approx(float(dead_per_step[:, layer].mean()))
    assert metrics["balance/dead_experts"] == pytest.approx(float(dead_per_step.mean(0).sum()))
    window = counts[-3:].sum(0)  # the last 3 steps
    assert metrics["balance/dead_experts_window/layer_0"] == float((window[0] == 0).sum()) >= 2
    assert metrics["balance/dead_experts_window/layer_1"] == float((window[1] == 0).sum())
    assert metrics["balance/dead_experts_window"] == float((window == 0).sum())
    assert dead_per_step[0, 1] > dead_per_step[1, 1]  # expert 5 was dead in step 0 only: out of the window
    state = balancer.state_dict()
    again = GlobalBalancer(model, dead_expert_window=3)
    again.load_state_dict(state)
    again._micro_steps = 1  # a resumed run logs the same window
    assert again.pop_metrics()["balance/dead_experts_window"] == metrics["balance/dead_experts_window"]


def test_dropped_fraction_metric_counts_the_sentinels_the_experts_skipped():
    from modeling_qwenmoe_gb.balance import GlobalBalancer

    model = capacity_model("eager", expert_capacity_factor=0.75).float()
    balancer = GlobalBalancer(model)
    dropped = []
    for _ in range(2):  # two micro-steps of one optimizer step
        ids = torch.randint(0, 99, (2, 24))
        out = model(input_ids=ids, labels=ids, output_routed_experts=True)
        balancer(out.router_stats)
        dropped.append((out.routed_experts == 8).float().mean((0, 1, 3)))  # (L,): sentinel share per layer
    balancer.step()
    metrics = balancer.pop_metrics()
    expected = torch.stack(dropped).mean(0)
    for layer in range(2):
        assert metrics[f"balance/dropped_fraction/layer_{layer}"] == pytest.approx(float(expected[layer]), abs=1e-6)
    assert metrics["balance/dropped_fraction"] > 0.05
    dropless = capacity_model("eager", expert_capacity_factor=None).float()
    plain = GlobalBalancer(dropless)
    plain(dropless(input_ids=ids, labels=ids).router_stats)
    plain.step()
    assert "balance/dropped_fraction" not in plain.pop_metrics()


def test_every_routing_option_compiles_to_one_graph_and_replays():
    ids = torch.randint(0, 99, (2, 24))
    model = capacity_model("grouped_mm").float()
    eager = model(input_ids=ids, labels=ids)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(input_ids=ids, labels=ids)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.router_stats.counts, eager.router_stats.counts, rtol=0, atol=0)
    for name, param in model.named_parameters():
        if name in eager_grads:
            torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    model.eval()  # replay: the recorded routing of a dropless forward reproduces it (groups, bias, scaling)
    with torch.no_grad():
        first = model(input_ids=ids, output_routed_experts=True)
        again = model(input_ids=ids, routed_experts=first.routed_experts)
    torch.testing.assert_close(again.logits, first.logits, rtol=0, atol=0)
