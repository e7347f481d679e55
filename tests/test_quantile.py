"""Quantile Balancing (`aux_free_method="quantile"`) against independent references: the optimal balanced assignment
solved as a linear program (scipy, float64), the exact pooled quantile (a float64 sort of every margin of the step),
Megatron-Core's `qb_dual_update` + `_update_router_qb_beta` re-derived in float64 and, with `make test-megatron-qb`,
its own code read out of its 0.19.2 wheel (cp312-only, so not installed on Python 3.11; 0.16.1, the newest for 3.11,
predates QB) and run on 2 gloo ranks; 2 gloo ranks × 2 micro-steps against one process; stock DeepSeek-V3 through
`any_moe`; what only training forwards count; bad input."""

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.balance import GlobalBalancer
from modeling_qwenmoe_gb.compare import CompareArguments, arm_flags
from modeling_qwenmoe_gb.modeling_qwenmoe_gb import (
    RouterStats,
    margin_bin_range,
    margin_histogram,
    micro_batch_quantile,
    routing_margins,
)
from modeling_qwenmoe_gb.quantile import QuantileState, counts_below, histogram_quantile

from .conftest import tiny_config
from .stock_models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
QB = dict(aux_free=True, aux_free_method="quantile", router_aux_loss_coef=0.0)


def settings(num_experts: int, top_k: int, scope: str = "global", bins: int = 1000, ema: float = 0.0):
    return SimpleNamespace(
        num_experts=num_experts, num_experts_per_tok=top_k, quantile_scope=scope, quantile_bins=bins, quantile_ema=ema
    )


def stats_of(scores: torch.Tensor, bias: torch.Tensor, top_k: int, bins: int, mask=None) -> RouterStats:
    """One layer's QB statistics of (T, E) scores, as the model's forward emits them: (1, E, bins), (1, E)."""
    margins = routing_margins(scores, bias, top_k)
    histogram = margin_histogram(margins, bias, bins, mask)[None]
    quantiles = micro_batch_quantile(margins, top_k, mask)[None]
    tokens = torch.full((1, 1), float(scores.shape[0] if mask is None else mask.sum()))
    return RouterStats(num_tokens=tokens, margin_histogram=histogram, margin_quantiles=quantiles)


# ----------------------------------------------------------------------------------------- (a) the LP optimum


def balanced_assignment(scores: np.ndarray, top_k: int) -> np.ndarray:
    """(T, E) 0/1: max Σ x·s with k experts per token and T·k/E tokens per expert, as a linear program (integral: the
    constraint matrix is totally unimodular), float64."""
    tokens, experts = scores.shape
    rows = [np.kron(np.eye(tokens)[i], np.ones(experts)) for i in range(tokens)]  # Σ_j x_ij = k
    cols = [np.kron(np.ones(tokens), np.eye(experts)[j]) for j in range(experts)]  # Σ_i x_ij = T·k/E
    result = linprog(
        -scores.reshape(-1), A_eq=np.array(rows + cols), b_eq=[top_k] * tokens + [tokens * top_k // experts] * experts,
        bounds=(0, 1), method="highs",
    )  # fmt: skip
    assert result.status == 0
    return result.x.reshape(tokens, experts) > 0.5


@pytest.mark.parametrize("tokens,experts,top_k", [(16, 4, 1), (24, 6, 2), (32, 8, 2), (12, 4, 2)])
def test_the_converged_dual_iteration_is_the_optimal_balanced_assignment(tokens, experts, top_k):
    """Iterating QB's step (route with b, histogram of the margins, quantile, centre) on one batch converges to the
    bias whose top-k is the LP's optimal balanced assignment (unique for continuous random scores)."""
    for seed in range(5):
        scores = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(seed))
        state = QuantileState(settings(experts, top_k, bins=100_000))  # fine bins: gaps of 32 margins resolved
        bias = torch.zeros(experts)
        for _ in range(60):  # the routing settles within ~20 steps on these sizes
            state.observe(stats_of(scores, bias, top_k, bins=100_000))
            state.update([bias])
        chosen = torch.zeros(tokens, experts, dtype=torch.bool)
        chosen.scatter_(1, (scores + bias).topk(top_k, dim=-1).indices, True)
        optimum = balanced_assignment(scores.double().numpy(), top_k)
        assert (chosen.numpy() == optimum).all(), f"seed {seed}"
        assert (chosen.sum(0) == tokens * top_k // experts).all()


def test_megatrons_end_of_range_quantile_stalls_on_the_same_problems():
    """Why `histogram_quantile` takes the middle of the range: Megatron's (n+1)-th order statistic, iterated the same
    way in float64, puts the bias exactly where a token's expert ties its (k+1)-th, and none of the 20 problems above
    reaches the LP optimum (all 20 do with our quantile)."""
    reached = 0
    for tokens, experts, top_k in [(16, 4, 1), (24, 6, 2), (32, 8, 2), (12, 4, 2)]:
        for seed in range(5):
            scores = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(seed)).double()
            beta = torch.zeros(experts, dtype=torch.float64)
            for _ in range(60):
                beta = megatron_update_router_qb_beta(beta, [[megatron_qb_dual_update(scores, beta, top_k)]], 0.0)
            chosen = torch.zeros(tokens, experts, dtype=torch.bool)
            chosen.scatter_(1, (scores - beta).topk(top_k, dim=-1).indices, True)
            reached += int((chosen.numpy() == balanced_assignment(scores.numpy(), top_k)).all())
    assert reached == 0


# ----------------------------------------------------------------------------------------- (b) the pooled quantile


def domain_batches(micro_batches: int, tokens: int, experts: int, seed: int = 0) -> list[torch.Tensor]:
    """Sigmoid scores of micro-batches that each favour other experts (domain-pure micro-batches)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for m in range(micro_batches):
        preference = torch.zeros(experts)
        preference[(2 * m) % experts : (2 * m) % experts + 2] = 2.0
        batches.append(torch.sigmoid(torch.randn(tokens, experts, generator=gen) + preference))
    return batches


def exact_pooled_interval(batches: list[torch.Tensor], bias: torch.Tensor, top_k: int) -> torch.Tensor:
    """(2, E) float64: the exact quantile interval of the step — the margins of every token, recomputed in float64 and
    sorted; the n-th and (n+1)-th smallest per expert, n = ⌊N·k/E⌋ (a bias in between selects exactly n tokens)."""
    margins = []
    for scores in batches:
        biased = scores.double() + bias.double()
        alpha = biased.sort(dim=-1, descending=True).values[:, top_k]  # the (k+1)-th largest
        margins.append(alpha[:, None] - scores.double())
    pooled = torch.cat(margins).sort(dim=0).values  # (N, E)
    n = pooled.shape[0] * top_k // pooled.shape[1]
    return pooled[n - 1 : n + 1]


def distance_to(interval: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(E,) how far each value lies outside its [low, high] interval (0 inside)."""
    return (interval[0] - values.double()).clamp_min(0) + (values.double() - interval[1]).clamp_min(0)


@pytest.mark.parametrize("bins", [10, 1000])
def test_the_histogram_quantile_is_the_exact_pooled_quantile_within_one_bin(bins):
    experts, top_k = 8, 2
    batches = domain_batches(4, 64, experts)
    bias = torch.linspace(-0.3, 0.2, experts)
    state = QuantileState(settings(experts, top_k, bins=bins))
    for scores in batches:
        state.observe(stats_of(scores, bias, top_k, bins))
    low, width = margin_bin_range(bias[None], bins)
    got = histogram_quantile(state.histogram, low, width, top_k)[0]
    exact = exact_pooled_interval(batches, bias, top_k)
    assert distance_to(exact, got).max() <= width.double() + 1e-6
    # the per-micro-batch mean (Megatron's form) is not the pooled quantile on domain-pure micro-batches
    micro_mean = torch.stack([micro_batch_quantile(routing_margins(s, bias, top_k), top_k) for s in batches]).mean(0)
    assert distance_to(exact, micro_mean).max() > 10 * 2.5 / 1000
    # and the load the quantile predicts (α held) is k/E of the tokens per expert, within the bin's tokens
    load = counts_below(state.histogram, low, width, got[None])[0]
    assert torch.allclose(load, torch.full_like(load, 4 * 64 * top_k / experts), atol=1e-6)


def test_padding_is_not_counted():
    experts, top_k = 8, 2
    scores = torch.rand(10, experts)
    mask = torch.tensor([1.0] * 7 + [0.0] * 3)
    bias = torch.zeros(experts)
    padded = stats_of(scores, bias, top_k, 50, mask)
    real = stats_of(scores[:7], bias, top_k, 50)
    assert torch.equal(padded.margin_histogram, real.margin_histogram)
    assert torch.equal(padded.margin_quantiles, real.margin_quantiles)


# ----------------------------------------------------------------------------------------- (d) Megatron's form


def megatron_qb_dual_update(scores: torch.Tensor, beta: torch.Tensor, top_k: int) -> torch.Tensor:
    """Megatron-Core's `moe_utils.qb_dual_update`, re-derived in float64 from its published code: on the scores the
    router routes with, β subtracted; α = the (k+1)-th of s − β; β_local = the (T·k/E + 1)-th largest of s − α."""
    tokens, experts = scores.shape
    assert tokens * top_k % experts == 0  # Megatron asserts it
    alpha = (scores - beta).topk(top_k + 1, dim=-1).values[:, -1:]
    return (scores - alpha).topk(tokens * top_k // experts + 1, dim=0).values[-1]


def megatron_update_router_qb_beta(beta, locals_per_rank: list[list[torch.Tensor]], ema: float) -> torch.Tensor:
    """`finalize_model_grads._update_router_qb_beta`: each rank's accumulated mean, all_reduce(AVG) over DP, the EMA,
    minus the mean."""
    averaged = torch.stack([torch.stack(local).mean(0) for local in locals_per_rank]).mean(0)
    new = ema * beta + (1 - ema) * averaged
    return new - new.mean()


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_micro_mean_equals_megatrons_qb_dual_update(ema):
    """Two ranks × two micro-batches: our micro_mean bias b equals −β of Megatron's update on the same scores."""
    experts, top_k = 8, 2
    batches = domain_batches(4, 32, experts, seed=3)
    start = torch.linspace(-0.1, 0.1, experts) - torch.linspace(-0.1, 0.1, experts).mean()
    state = QuantileState(settings(experts, top_k, scope="micro_mean", ema=ema))
    for scores in batches:
        state.observe(stats_of(scores, start, top_k, 1000))
    bias = start.clone()
    state.update([bias])
    beta = -start.double()
    locals_per_rank = [[megatron_qb_dual_update(s.double(), beta, top_k) for s in batches[r::2]] for r in range(2)]
    expected = -megatron_update_router_qb_beta(beta, locals_per_rank, ema)
    torch.testing.assert_close(bias.double(), expected, rtol=0, atol=1e-6)


def load_megatron_qb(wheel: str) -> dict:
    """Megatron-Core's `qb_dual_update` (moe_utils.py) and `_update_router_qb_beta` (finalize_model_grads.py), their
    source read out of its wheel (cp312-only: not installable on Python 3.11) and executed with torch; the one helper
    the second uses, `get_attr_wrapped_model`, is given as what it is for an unwrapped module."""
    import ast
    import typing
    import zipfile

    namespace = {"torch": torch, "get_attr_wrapped_model": lambda model, attr: getattr(model, attr)}
    namespace.update({name: getattr(typing, name) for name in ("Tuple", "List", "Optional")})
    namespace["TransformerConfig"] = SimpleNamespace
    with zipfile.ZipFile(wheel) as archive:
        functions = (("megatron/core/transformer/moe/moe_utils.py", "qb_dual_update"),
                     ("megatron/core/distributed/finalize_model_grads.py", "_update_router_qb_beta"))  # fmt: skip
        for path, name in functions:
            source = archive.read(path).decode()
            node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
            exec(compile(ast.Module([node], []), f"{wheel}!{path}", "exec"), namespace)
    return namespace


@pytest.mark.megatron_qb
def test_micro_mean_equals_megatron_cores_own_code_on_two_ranks(tmp_path):
    """Megatron-Core 0.19.2's own `qb_dual_update` (each micro-batch, accumulated as its `TopKRouter` does) and
    `_update_router_qb_beta` (all_reduce AVG over 2 gloo ranks, EMA, centring) against our micro_mean on the same
    scores and ranks: b = −β after each of 3 steps, both ranks."""
    wheel = os.environ.get("QWENMOE_GB_MEGATRON_QB_WHEEL")
    if not wheel:
        pytest.fail("QWENMOE_GB_MEGATRON_QB_WHEEL is not set: run `make test-megatron-qb` (it downloads the wheel)")
    from .dist_common import run_ranks, torchrun

    run_ranks([*torchrun(), str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path), "megatron_qb"],
              OMP_NUM_THREADS="1")  # fmt: skip
    for rank in range(2):
        seen = torch.load(tmp_path / f"megatron_qb_rank{rank}.pt")
        assert len(seen) == 3
        for ours, megatron in seen:
            torch.testing.assert_close(ours.double(), -megatron.double(), rtol=0, atol=1e-6)
            assert megatron.abs().amax() > 1e-3


# ----------------------------------------------------------------------------------------- the model


def qb_model(**overrides) -> QwenMoeGBForCausalLM:
    return QwenMoeGBForCausalLM(tiny_config(**{**QB, **overrides})).train()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_the_models_histogram_is_its_routers_margins(scoring):
    """The forward's (L, E, bins) histogram = the margins recomputed from the routers' logits (recorded by hooks)."""
    model = qb_model(router_scoring_func=scoring)
    for router in model.model.moe_routers():
        router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 8))
    logits = []
    hooks = [r.register_forward_hook(lambda m, a, o: logits.append(o[0].detach())) for r in model.model.moe_routers()]
    ids = torch.randint(1, 99, (3, 10))
    stats = model(input_ids=ids, labels=ids).router_stats
    for hook in hooks:
        hook.remove()
    for layer, (router, x) in enumerate(zip(model.model.moe_routers(), logits)):
        scores = x.float().softmax(-1) if scoring == "softmax" else x.float().sigmoid()
        margins = routing_margins(scores, router.expert_bias, 2)
        torch.testing.assert_close(stats.margin_histogram[layer], margin_histogram(margins, router.expert_bias, 1000))
        assert stats.margin_histogram[layer].sum(-1).eq(30).all()
        # expert j is selected iff its margin is below its bias (the (k+1)-th expert's margin is its bias, up to
        # rounding): the counts are the margins below the bias
        selected = (margins < router.expert_bias - 1e-6).sum(0).float()
        torch.testing.assert_close(selected, stats.counts[layer].sum(0))


def test_only_training_forwards_with_grad_give_statistics():
    model = qb_model()
    ids = torch.randint(1, 99, (2, 8))
    with torch.no_grad():
        assert model(input_ids=ids).router_stats.margin_histogram is None
    model.eval()
    assert model(input_ids=ids).router_stats.margin_histogram is None
    model.train()
    assert model(input_ids=ids).router_stats.margin_quantiles is None  # global scope: the histogram only
    assert qb_model(quantile_scope="micro_mean")(input_ids=ids).router_stats.margin_quantiles.shape == (2, 8)


def test_the_balancer_moves_the_bias_once_per_step_and_balances_a_fixed_batch():
    model = qb_model(router_scoring_func="sigmoid", initializer_range=0.2)
    balancer = GlobalBalancer(model)
    batches = [torch.randint(1, 99, (4, 16), generator=torch.Generator().manual_seed(m)) for m in range(2)]
    vio = []
    for _ in range(6):
        for ids in batches:
            balancer(model(input_ids=ids, labels=ids).router_stats)
        counts = balancer.step_counts.double().clone()
        vio.append(float(((counts.amax(-1) - counts.mean(-1)) / counts.mean(-1)).mean()))
        balancer.step()
    assert vio[-1] < 0.5 * vio[0]
    metrics = balancer.pop_metrics()
    assert {"balance/qb_maxvio_after", "balance/qb_bin_width", "balance/bias_spread"} <= set(metrics)
    bias = torch.stack([r.expert_bias for r in model.model.moe_routers()])
    torch.testing.assert_close(bias.sum(-1), torch.zeros(2), rtol=0, atol=1e-6)  # centred


def test_capacity_and_replay_keep_the_statistics_of_the_routers_scores():
    """With capacity dropping the histogram still counts every real token (QB reads the scores, before drops); with
    routing replay the first layer's histogram is the same as without (the replayed experts change what later layers
    see, not the router's margins)."""
    ids = torch.randint(1, 99, (2, 12))
    capped = qb_model(expert_capacity_factor=0.5)(input_ids=ids).router_stats
    assert capped.margin_histogram.sum(-1).eq(24).all() and capped.counts.sum() < 2 * 24 * 2
    model = qb_model()
    free = model(input_ids=ids, output_routed_experts=True)
    replay = torch.flip(free.routed_experts, dims=[-1])  # the same experts, another order
    replayed = model(input_ids=ids, routed_experts=replay).router_stats
    torch.testing.assert_close(replayed.margin_histogram[0], free.router_stats.margin_histogram[0], rtol=0, atol=0)


def test_the_bias_is_saved_and_reloads(tmp_path):
    model = qb_model()
    balancer = GlobalBalancer(model)
    ids = torch.randint(1, 99, (2, 8))
    balancer(model(input_ids=ids).router_stats)
    balancer.step()
    model.save_pretrained(tmp_path)
    loaded = QwenMoeGBForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.aux_free_method == "quantile"
    for a, b in zip(model.model.moe_routers(), loaded.model.moe_routers()):
        assert a.expert_bias.abs().sum() > 0 and torch.equal(a.expert_bias, b.expert_bias)


# ----------------------------------------------------------------------------------------- stock MoEs


def test_stock_deepseek_v3_moves_its_own_bias_to_the_pooled_quantile():
    """transformers' DeepSeek-V3 (no group limit): the stock `e_score_correction_bias` becomes the centred quantile of
    the step's margins, recomputed in float64 from the router logits its own forward produced (each expert's within
    one bin of its exact interval, up to the one shift of the centring)."""
    model = tiny_model("deepseek_v3", n_group=1, topk_group=1).train()
    balancer = GlobalBalancer(model, **QB)
    routers = [layer.routers[0] for layer in balancer.moe_model.layers]
    logits = []
    hooks = [r.register_forward_hook(lambda m, a, o: logits.append((o[0] if isinstance(o, tuple) else o).detach()))
             for r in routers]  # fmt: skip
    batches = [torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(m)) for m in range(2)]
    for ids in batches:
        out = model(input_ids=ids, labels=ids)
        balance, _ = balancer(balancer.router_stats(out))
    for hook in hooks:
        hook.remove()
    start = [b.clone() for b in balancer.moe_model.biases()]
    balancer.step()
    for layer, bias in enumerate(balancer.moe_model.biases()):
        scores = [logits[m * len(routers) + layer].float().sigmoid() for m in range(2)]
        exact = exact_pooled_interval(scores, start[layer], 2)
        _, width = margin_bin_range(start[layer], 1000)
        # the bias is the quantile minus its mean: some shift c puts every expert's bias + c in its exact interval
        lowest = (exact[0] - float(width) - bias.double()).max()
        highest = (exact[1] + float(width) - bias.double()).min()
        assert lowest <= highest + 1e-6, layer
        assert abs(float(bias.double().sum())) < 1e-5
        assert bias.abs().sum() > 0


def test_stock_models_without_a_bias_or_with_group_limits_are_refused():
    with pytest.raises(ValueError, match=r"aux_free=True is not allowed for OlmoeForCausalLM: its routers hold no "
                                         r"e_score_correction_bias .*aux_free_method='quantile'"):  # fmt: skip
        GlobalBalancer(tiny_model("olmoe"), **QB)
    with pytest.raises(ValueError, match=r"not allowed for DeepseekV3ForCausalLM with group-limited routing "
                                         r"\(n_group=2, topk_group=1\)"):  # fmt: skip
        GlobalBalancer(tiny_model("deepseek_v3"), **QB)


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"quantile_bins": 5}, r"quantile_bins=5 is not allowed: an integer >= 10 is required"),
        ({"quantile_ema": 1.0}, r"quantile_ema=1.0 is not allowed: a number in \[0, 1\)"),
        ({"quantile_ema": -0.1}, r"quantile_ema=-0.1 is not allowed"),
        ({"aux_free_method": "median"}, r"aux_free_method='median' is unknown: allowed \['sign', 'quantile'\]"),
        ({"quantile_scope": "local"}, r"quantile_scope='local' is unknown: allowed \['global', 'micro_mean'\]"),
        ({"aux_free": False}, r"aux_free_method='quantile' moves the aux-free bias, and aux_free=False"),
        ({"n_group": 4, "topk_group": 2}, r"group-limited routing \(n_group=4, topk_group=2\) is not supported"),
    ],
)
def test_bad_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{**QB, **fields})


def test_a_per_micro_batch_update_is_refused_and_a_balance_loss_warns(caplog):
    with pytest.raises(ValueError, match=r"bias_update='micro' with aux_free_method='quantile' is not allowed"):
        GlobalBalancer(qb_model(), bias_update="micro")
    with caplog.at_level(logging.WARNING):
        GlobalBalancer(qb_model(router_aux_loss_coef=0.01))
    assert "aux_free_method='quantile' with router_aux_loss_coef=0.01" in caplog.text


def test_compare_arms():
    args = CompareArguments()
    assert arm_flags("qb-micro_mean", args, 10)[-4:] == ["--quantile_scope", "micro_mean", "--router_aux_loss_coef",
                                                         "0"]  # fmt: skip
    assert "sequence" in arm_flags("qb-global+seq", args, 10)


# ----------------------------------------------------------------------------------------- (c) 2 ranks × 2 micro-steps


@pytest.mark.distributed
def test_two_ranks_times_two_micro_steps_equal_one_process(tmp_path):
    """2 gloo ranks × 2 accumulation micro-steps, 2 optimizer steps (padding on rank 1), both scopes: each step's bias
    is bitwise the one of one process observing the same 4 micro-batches, on both ranks."""
    from .dist_common import run_ranks, torchrun
    from .distributed_worker import qb_start

    qb_start(tmp_path)
    run_ranks([*torchrun(), str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path), "quantile"],
              OMP_NUM_THREADS="1")  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (OMP_NUM_THREADS=1): the same float sums, bit for bit
    try:
        compare_with_one_process(tmp_path)
    finally:
        torch.set_num_threads(threads)


def compare_with_one_process(tmp_path: Path) -> None:
    from .distributed_worker import qb_batches

    for scope in ("global", "micro_mean"):
        model = QwenMoeGBForCausalLM.from_pretrained(tmp_path / f"qb_start_{scope}").train()
        assert model.config.quantile_scope == scope
        state = QuantileState(model.config)
        biases = [r.expert_bias for r in model.model.moe_routers()]
        expected = []
        for step in range(2):
            for micro in range(2):
                for rank in range(2):
                    ids, mask = qb_batches(step, micro, rank)
                    state.observe(model(input_ids=ids, attention_mask=mask).router_stats)
            state.update(biases)
            expected.append(torch.stack([b.clone() for b in biases]))
        assert not torch.equal(expected[0], expected[1])  # the second step routed with the first step's bias
        for rank in range(2):
            seen = torch.load(tmp_path / f"qb_{scope}_rank{rank}.pt")
            for got, want in zip(seen, expected):
                assert torch.equal(got, want), (scope, (got - want).abs().max())
