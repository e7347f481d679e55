"""Balance statistics and losses against independent computations."""

import itertools

import pytest
import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from modeling_qwenmoe_gb import (
    RouterStats,
    balance_loss,
    device_balance_loss,
    group_sequences,
    router_statistics,
    router_z_loss,
    switch_balance_loss,
)

from .conftest import tiny_config


def stats_from_logits(logits, top_k, token_mask):
    """One layer's (B, ·) statistics from (T, E) logits, the way the router computes them."""
    probs = logits.float().softmax(-1)
    index = probs.topk(top_k, -1).indices
    return router_statistics(logits, probs, index, token_mask)


def reference_lbl(logits, top_k, mask=None):
    """float64 E · Σ f_i P_i with f_i = c_i / (K·T) over the unmasked tokens, by explicit loops."""
    logits = logits.double()
    num_experts = logits.shape[-1]
    keep = range(logits.shape[0]) if mask is None else [t for t in range(logits.shape[0]) if mask[t]]
    counts = torch.zeros(num_experts, dtype=torch.float64)
    probs = torch.zeros(num_experts, dtype=torch.float64)
    for t in keep:
        p = logits[t].softmax(-1)
        probs += p
        for i in p.topk(top_k).indices:
            counts[i] += 1
    n = len(keep)
    return num_experts * float((counts / (top_k * n) * probs / n).sum())


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_micro_lbl_equals_transformers_divided_by_k(top_k):
    logits = torch.randn(3 * 7, 8)
    counts, prob_sums, n, _ = stats_from_logits(logits, top_k, torch.ones(3, 7))
    ours = switch_balance_loss(counts.sum(0), prob_sums.sum(0), n.sum())
    theirs = load_balancing_loss_func((logits,), 8, top_k)
    torch.testing.assert_close(ours * top_k, theirs, rtol=1e-6, atol=1e-6)
    assert ours.item() == pytest.approx(reference_lbl(logits, top_k), rel=1e-6)


def test_lbl_padding_invariance_and_transformers_mask():
    top_k, batch, seq = 2, 3, 6
    logits = torch.randn(batch * seq, 8)
    mask = torch.ones(batch, seq)
    mask[0, :2] = 0
    mask[2, 4:] = 0
    counts, prob_sums, n, _ = stats_from_logits(logits, top_k, mask)
    ours = switch_balance_loss(counts.sum(0), prob_sums.sum(0), n.sum())
    theirs = load_balancing_loss_func((logits,), 8, top_k, attention_mask=mask)
    torch.testing.assert_close(ours * top_k, theirs, rtol=1e-6, atol=1e-6)
    kept = logits[mask.reshape(-1).bool()]
    c2, p2, n2, _ = stats_from_logits(kept, top_k, torch.ones(1, kept.shape[0]))
    torch.testing.assert_close(counts.sum(0), c2[0])
    torch.testing.assert_close(prob_sums.sum(0), p2[0], rtol=1e-6, atol=1e-6)
    assert ours.item() == pytest.approx(reference_lbl(logits, top_k, mask.reshape(-1)), rel=1e-6)


def test_lbl_perfect_balance_is_one_and_gradcheck():
    counts = torch.full((2, 4), 6.0)
    prob_sums = torch.full((2, 4), 3.0)
    assert switch_balance_loss(counts, prob_sums, torch.tensor([12.0, 12.0])).item() == pytest.approx(1.0)

    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    logits = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    index = logits.detach().topk(2, -1).indices

    def loss(x):
        c, p, n, _ = router_statistics(x, x.softmax(-1), index, mask)
        return switch_balance_loss(c, p, n) + device_balance_loss(c, p, n, [[0, 1], [2, 3, 4, 5]])

    assert torch.autograd.gradcheck(loss, (logits,))


def reference_device_loss(counts, prob_sums, num_tokens, top_k, groups):
    f = counts.double() / (top_k * num_tokens)
    p = prob_sums.double() / num_tokens
    return len(groups) * sum(float(f[g].sum() * p[g].sum()) for g in groups)


@pytest.mark.parametrize(
    "groups", [[[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 5, 6], [1], [2, 3, 4, 7]], [[7, 0], [1, 2, 3, 4, 5, 6]]]
)
def test_device_loss_against_float64(groups):
    logits = torch.randn(40, 8)
    c, p, n, _ = stats_from_logits(logits, 2, torch.ones(1, 40))
    ours = device_balance_loss(c[0], p[0], n[0], groups)
    assert ours.item() == pytest.approx(reference_device_loss(c[0], p[0], 40.0, 2, groups), rel=1e-6)


def test_device_loss_limits():
    logits = torch.randn(2, 30, 8)
    stats = [stats_from_logits(x, 2, torch.ones(1, 30)) for x in logits]
    counts = torch.cat([s[0] for s in stats])  # (L=2, E)
    probs = torch.cat([s[1] for s in stats])
    n = torch.cat([s[2] for s in stats])
    singletons = [[i] for i in range(8)]
    torch.testing.assert_close(device_balance_loss(counts, probs, n, singletons), switch_balance_loss(counts, probs, n))
    one = device_balance_loss(counts, probs, n, [list(range(8))])
    assert one.item() == pytest.approx(1.0, abs=1e-6)


def test_layers_are_averaged_not_pooled():
    logits = torch.randn(2, 20, 8)
    per_layer = [stats_from_logits(x, 2, torch.ones(1, 20)) for x in logits]
    counts = torch.cat([s[0] for s in per_layer])
    probs = torch.cat([s[1] for s in per_layer])
    n = torch.cat([s[2] for s in per_layer])
    expected = sum(reference_lbl(x, 2) for x in logits) / 2
    assert switch_balance_loss(counts, probs, n).item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_against_direct_computation():
    logits = torch.randn(2, 12, 8)
    mask = torch.ones(3, 4)
    mask[1, :2] = 0
    z = torch.stack([stats_from_logits(x, 2, mask)[3] for x in logits])  # (L, B)
    n = mask.sum(1).expand(2, -1)
    keep = mask.reshape(-1).bool()
    expected = torch.stack([torch.logsumexp(x[keep].double(), -1).square().mean() for x in logits]).mean()
    assert router_z_loss(z, n).item() == pytest.approx(expected.item(), rel=1e-6)


def make_stats(batch=4, seq=5, layers=2, num_experts=8, top_k=2, mask=None):
    logits = torch.randn(layers, batch * seq, num_experts)
    mask = torch.ones(batch, seq) if mask is None else mask
    per_layer = [stats_from_logits(x, top_k, mask) for x in logits]
    return RouterStats(*(torch.stack(x) for x in zip(*per_layer))), logits


def test_micro_groups_average_the_chunk_losses():
    stats, logits = make_stats(batch=5, seq=4)
    for size in (1, 2, 5):
        grouped = group_sequences(stats, size)
        ours = switch_balance_loss(grouped.counts, grouped.prob_sums, grouped.num_tokens)
        chunks = [list(range(b, min(b + size, 5))) for b in range(0, 5, size)]
        expected = 0.0
        for layer, chunk in itertools.product(range(2), chunks):
            rows = torch.cat([torch.arange(b * 4, (b + 1) * 4) for b in chunk])
            expected += reference_lbl(logits[layer, rows], 2)
        assert ours.item() == pytest.approx(expected / (2 * len(chunks)), rel=1e-5)


def test_balance_loss_scopes():
    stats, _ = make_stats()
    micro, parts = balance_loss(tiny_config(balance_scope="micro"), stats)
    global_alone, gparts = balance_loss(tiny_config(balance_scope="global"), stats)
    torch.testing.assert_close(micro, global_alone)
    # global counts equal to this micro-batch's counts: the same loss (one process, no accumulation)
    g, _ = balance_loss(tiny_config(balance_scope="global"), stats, global_counts=stats.counts.sum(1))
    torch.testing.assert_close(g, micro)
    # other global counts change f but not P
    other = torch.rand(2, 8) * 10
    g2, p2 = balance_loss(tiny_config(balance_scope="global"), stats, global_counts=other)
    expected = switch_balance_loss(other, stats.prob_sums.sum(1), stats.num_tokens.sum(1))
    torch.testing.assert_close(p2["lbl"], expected)
    seq, sparts = balance_loss(tiny_config(balance_scope="sequence"), stats)
    grouped = group_sequences(stats, 1)
    torch.testing.assert_close(
        sparts["lbl"], switch_balance_loss(grouped.counts, grouped.prob_sums, grouped.num_tokens)
    )
    cfg = tiny_config(device_balance_groups=2, device_balance_coef=0.5, router_z_loss_coef=0.01, micro_balance_coef=0.2)
    total, parts = balance_loss(cfg, stats, global_counts=other)
    expected = 0.1 * parts["lbl"] + 0.2 * parts["micro_lbl"] + 0.5 * parts["device_lbl"] + 0.01 * parts["z_loss"]
    torch.testing.assert_close(total, expected)
    dev = device_balance_loss(other, stats.prob_sums.sum(1), stats.num_tokens.sum(1), [[0, 1, 2, 3], [4, 5, 6, 7]])
    torch.testing.assert_close(parts["device_lbl"], dev)


def test_pad_only_sequences_are_finite():
    mask = torch.zeros(2, 5)
    stats, _ = make_stats(batch=2, seq=5, mask=mask)
    total, parts = balance_loss(tiny_config(router_z_loss_coef=0.1), stats)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    assert stats.counts.sum() == 0
