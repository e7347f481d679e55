"""Quantile Balancing (QB): the aux-free bias solved once per optimizer step, without an update rate.

Balanced top-k routing is an assignment problem: maximise Σ x_tj s_tj with k experts per token and T·k/E tokens per
expert. One coordinate step of its dual, warm-started from the bias b the step routed with (Su 2026, "MoE环游记 6";
Kimi K3 §2.3.3): α_t = the (k+1)-th largest of s_t + b, margins r_tj = α_t − s_tj, and b'_j = the (k/E)-quantile of
r_:,j — at b' (α held) exactly k/E of the tokens select expert j. b' is mean-centred (top-k is shift-invariant) and
replaces b, or is blended with it (`quantile_ema`).

Features
- Pure functions: `histogram_quantile` (the quantile of pooled int64 histograms, interpolated inside the bin, the
  middle of the biases that give exactly k/E of the tokens: within one bin width of the exact pooled quantile),
  `counts_below` (the tokens whose margin lies below a bias: the load the new bias gives the step's tokens with α
  held), `blend` and `next_bias` (blend, then centre).
- `QuantileState`, the balancer's per-step accumulator: `observe(stats)` adds a training micro-step's statistics
  (`RouterStats.margin_histogram`, `margin_quantiles`, computed by the model's forward or `any_moe`'s hooks, padding
  excluded); `update(biases, group)` once per optimizer step: ONE all-reduce (SUM) over the data-parallel group of
  the histograms (int64, exact: bitwise the same bias on every rank and for any split of the step into ranks ×
  micro-batches) and of the micro-batch quantile sums (float64), the new biases written in place, the accumulators
  reset. Scopes: `"global"` reads the quantile off the pooled histogram (K3, TransformerEngine, torchtitan);
  `"micro_mean"` averages the micro-batches' exact quantiles (Megatron-Core's `qb_dual_update` +
  `_update_router_qb_beta`).
- Metrics of the update, per layer: `qb_maxvio_after` (MaxVio of the step's tokens at the new bias, α held: what the
  dual step predicts; the load the next step really gets is its `maxvio_global`) and `qb_bin_width` (the bound on the
  quantile's error).

Shape legend: L MoE layers, E experts, N bins (`quantile_bins`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .modeling_qwenmoe_gb import RouterStats, margin_bin_range


def histogram_quantile(histogram: torch.Tensor, low: torch.Tensor, width: torch.Tensor, top_k: int) -> torch.Tensor:
    """(L, E) float64 quantiles of per-expert margin histograms (L, E, N) over bins starting at `low` (L,) of
    `width` (L,): a bias below which n = ⌊M·k/E⌋ of the M counted margins lie, with the counts spread evenly inside
    each bin. Where a range of biases does that (empty bins between the n-th and the (n+1)-th margin), its middle: a
    bias at either end ties a token's expert with its (k+1)-th, and the iteration can stall there (Megatron's
    (n+1)-th order statistic is such an end). Within one bin width of the exact quantile interval
    [n-th, (n+1)-th smallest margin]."""
    num_experts, bins = histogram.shape[-2:]
    total = histogram.sum(-1)  # (L, E): the tokens counted, the same for every expert
    target = total * top_k // num_experts  # (L, E)
    cumulative = histogram.cumsum(-1)  # (L, E, N)
    first_over = (cumulative <= target[..., None]).sum(-1).clamp(max=bins - 1)  # (L, E): holds the (n+1)-th margin
    in_bin = histogram.gather(-1, first_over[..., None]).squeeze(-1)  # (L, E)
    before = cumulative.gather(-1, first_over[..., None]).squeeze(-1) - in_bin  # (L, E)
    fraction = ((target - before).double() / in_bin.clamp_min(1).double()).clamp(0, 1)  # (L, E)
    low, width = low.double()[:, None], width.double()[:, None]  # (L, 1)
    upper = low + (first_over.double() + fraction) * width  # (L, E): the highest such bias
    reached = (cumulative < target[..., None]).sum(-1).clamp(max=bins - 1)  # (L, E): the bin where n are counted
    exactly = cumulative.gather(-1, reached[..., None]).squeeze(-1) == target  # n counted at its right edge
    lower = torch.where(exactly, low + (reached.double() + 1) * width, upper)  # (L, E): the lowest
    lower = torch.where(target == 0, low.expand_as(lower), lower)
    return (lower + upper) / 2


def counts_below(histogram: torch.Tensor, low: torch.Tensor, width: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(L, E) float64 margins below `bias` (L, E) per expert of histograms (L, E, N), linear inside a bin: the
    selections the bias gives the counted tokens with α held."""
    bins = histogram.shape[-1]
    position = ((bias.double() - low.double()[:, None]) / width.double()[:, None]).clamp(0, bins)  # (L, E) in bins
    bin_index = position.floor().long().clamp(max=bins - 1)  # (L, E)
    cumulative = histogram.cumsum(-1)  # (L, E, N)
    in_bin = histogram.gather(-1, bin_index[..., None]).squeeze(-1).double()  # (L, E)
    before = cumulative.gather(-1, bin_index[..., None]).squeeze(-1).double() - in_bin
    return before + (position - bin_index.double()) * in_bin


def blend(old: torch.Tensor, quantiles: torch.Tensor, ema: float) -> torch.Tensor:
    """(L, E) float64 `ema · old + (1 − ema) · quantiles`: the new bias before its centring."""
    return ema * old.double() + (1 - ema) * quantiles.double()


def next_bias(old: torch.Tensor, quantiles: torch.Tensor, ema: float) -> torch.Tensor:
    """(L, E) fp32: `blend`, then mean-centred per layer (Megatron-Core's order)."""
    blended = blend(old, quantiles, ema)
    return (blended - blended.mean(-1, keepdim=True)).float()


class QuantileState:
    """The statistics of the current optimizer step for Quantile Balancing, and the once-per-step bias update.

    Args:
        config: the balance settings (`num_experts_per_tok`, `quantile_scope`, `quantile_bins`, `quantile_ema`).
    """

    def __init__(self, config):
        self.config = config
        self.histogram: torch.Tensor | None = None  # (L, E, N) int64, summed over the step's micro-batches
        self.quantile_sum: torch.Tensor | None = None  # (L, E) float64, Σ of the micro-batch quantiles
        self.micro_batches: torch.Tensor | int = 0  # micro-batches whose quantiles are in `quantile_sum` (a tensor)

    def observe(self, stats: RouterStats) -> None:
        """Add one training micro-step's statistics (local: no communication)."""
        if stats.margin_histogram is None:
            raise ValueError(
                "aux_free_method='quantile': the forward returned no margin_histogram; QB statistics come from a "
                "training forward of a model whose config (or balancer) has aux_free_method='quantile'"
            )
        if self.histogram is None:
            self.histogram = torch.zeros_like(stats.margin_histogram)
        self.histogram += stats.margin_histogram
        if self.config.quantile_scope == "micro_mean":  # a micro-batch without real tokens has no quantile
            real = (stats.num_tokens[0].sum() > 0).double()  # no host sync
            quantiles = torch.where(real > 0, stats.margin_quantiles.double(), 0.0)  # (L, E)
            self.quantile_sum = quantiles if self.quantile_sum is None else self.quantile_sum + quantiles
            self.micro_batches = real if isinstance(self.micro_batches, int) else self.micro_batches + real

    @torch.no_grad()
    def update(self, biases: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Set each layer's bias (the model's own (E,) tensors, in place) from the step's statistics pooled over the
        data-parallel `group`; returns the per-layer metrics (L,). Nothing happens without statistics."""
        if self.histogram is None:
            return {}
        histogram, quantile_sum, micro_batches = self._all_reduce(group)
        old = torch.stack([b.detach().float() for b in biases]).to(histogram.device)  # (L, E)
        low, width = margin_bin_range(old, self.config.quantile_bins)  # the bins the forwards used
        top_k = self.config.num_experts_per_tok
        if self.config.quantile_scope == "global":
            quantiles = histogram_quantile(histogram, low, width, top_k)  # (L, E)
        else:
            quantiles = quantile_sum / torch.as_tensor(micro_batches).double().clamp_min(1)  # (L, E)
        for bias, value in zip(biases, next_bias(old, quantiles, self.config.quantile_ema)):
            bias.copy_(value.to(bias))
        uncentred = blend(old, quantiles, self.config.quantile_ema)  # the centring does not change the routing
        load = counts_below(histogram, low, width, uncentred)  # (L, E): the step's tokens at the new bias, α held
        mean = load.mean(-1).clamp_min(1e-12)
        self.histogram, self.quantile_sum, self.micro_batches = None, None, 0
        return {"qb_maxvio_after": (load.amax(-1) - mean) / mean, "qb_bin_width": width.double()}

    def _all_reduce(self, group) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | int]:
        """The histograms and the micro-batch quantile sums and count, summed over the ranks in one collective."""
        histogram = self.histogram
        if not (dist.is_initialized() and dist.get_world_size(group) > 1):
            return histogram, self.quantile_sum, self.micro_batches
        if self.config.quantile_scope == "global":  # in place: the accumulator is reset after the update
            dist.all_reduce(histogram, group=group)
            return histogram, None, 0
        # micro_mean: one float64 tensor (it holds int64 counts below 2^53 exactly)
        quantile_sum = self.quantile_sum.reshape(-1)
        count = torch.as_tensor(self.micro_batches, dtype=torch.float64, device=histogram.device).reshape(1)
        flat = torch.cat([histogram.reshape(-1).double(), quantile_sum, count])
        dist.all_reduce(flat, group=group)
        size = histogram.numel()
        summed = flat[:size].round().long().view_as(histogram)
        return summed, flat[size:-1].view(histogram.shape[:2]), flat[-1]


__all__ = ["QuantileState", "blend", "counts_below", "histogram_quantile", "next_bias"]
