"""QwenMoE-GB modeling (shipped to the Hub next to `configuration_qwenmoe_gb.py`).

Features
- Qwen2-MoE / Qwen3-MoE decoder built from transformers' own blocks (attention, RMSNorm, rotary, fused experts with
  `experts_implementation` = eager / batched_mm / grouped_mm; grouped_mm in the autocast dtype under autocast).
- A top-k router with softmax or sigmoid scores and an auxiliary-loss-free bias (`expert_bias`, persistent fp32
  buffer) that changes which experts are selected but never the gate weights.
- Router statistics per layer and per sequence, padding excluded: selection counts, probability sums
  (differentiable), token counts, z-loss sums, computed once per forward over the stacked routing of every sparse
  layer. Output O(L·B·E); no router logits kept for backward.
- Quantile Balancing statistics (`aux_free_method="quantile"`), computed in the same pass while training: per layer
  and expert an int64 histogram of the routing margins r = α − s (`margin_histogram`) and, for
  `quantile_scope="micro_mean"`, the micro-batch's exact quantile (`micro_batch_quantile`); the trainer turns the
  step's pooled statistics into the next bias (`modeling_qwenmoe_gb.quantile`).
- Balance losses as pure functions: `switch_balance_loss`, `device_balance_loss`, `router_z_loss`, and
  `balance_loss` that combines them for a config at micro, sequence or global scope.
- `QwenMoeGBForCausalLM.forward(labels=...)` returns CE + the micro-scope balance losses while training, so the model
  works in any loop; the global scope is added by the trainer (`modeling_qwenmoe_gb.balance`).
- MoE-aware selective recompute (`config.moe_recompute`): the experts' activation (selective checkpointing: no
  matmul twice), the experts, or the whole MoE block, with the routing and the router statistics of the forward.
- Chunked LM-head + cross-entropy in training (`chunked_linear_cross_entropy`): no (T, V) logits, forward or backward;
  Liger-Kernel's fused linear cross-entropy instead with `loss_implementation="liger"` where it runs (CUDA).
- Native transformers conventions: the KV cache under the installed version's name (`cache` from transformers 5.24,
  `past_key_values` before; both accepted), `return_dict=False`, tensor / pipeline / FSDP plans for the head,
  full-graph compile (static-cache generation), output classes with real (not string) annotations.

Shape legend: B batch, S sequence, T = B·S tokens, D hidden, E experts, K top-k, L MoE layers, G sequence groups.

This file imports only the standard library, torch, transformers and `.configuration_qwenmoe_gb` (and, only for
`loss_implementation="liger"` on CUDA, the optional `liger_kernel` when it is installed).
"""

import contextlib
import importlib
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.generation import GenerateDecoderOnlyOutput, GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeAttention,
    Qwen2MoeExperts,
    Qwen2MoeMLP,
    Qwen2MoeRMSNorm,
    Qwen2MoeRotaryEmbedding,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.import_utils import is_liger_kernel_available
from transformers.utils.logging import get_logger
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_qwenmoe_gb import QwenMoeGBConfig, uses_quantile_balancing

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache` (the old name warns and
# goes away in 5.40); earlier versions know only `past_key_values`. Every call into transformers uses the installed
# version's name; our forwards accept both.
logger = get_logger(__name__)

CACHE_ARG = "cache" if "cache" in {f.name for f in fields(MoeModelOutputWithPast)} else "past_key_values"


def _old_cache_name_deprecated(forward):
    """On transformers >= 5.24 a forward given the old name (`past_key_values=`) warns as transformers' own models do
    ("`past_key_values` is deprecated") and receives it as `cache`; both names at once is a ValueError. Before 5.24
    the old name is the only one, and nothing warns."""
    if CACHE_ARG == "past_key_values":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)(forward)


def _pop_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache given under either name (`cache` or the pre-5.24 `past_key_values`), removed from `kwargs`."""
    old = kwargs.pop("past_key_values", None)
    if cache is not None and old is not None:
        raise ValueError("cache and past_key_values are both given: pass the KV cache once, as `cache`")
    return old if cache is None else cache


# --------------------------------------------------------------------------------------------- balance functions


@dataclass
class RouterStats(ModelOutput):
    """Router statistics of one forward, stacked over the L sparse MoE layers, padding excluded.

    counts (`(L, B, E)` float32, no grad): top-k selections of each expert by the tokens of each sequence.
    prob_sums (`(L, B, E)` float32, differentiable): Σ_t p_t,i over each sequence's tokens (router probabilities).
    num_tokens (`(L, B)` float32): non-padding tokens of each sequence.
    z_sums (`(L, B)` float32, differentiable when `router_z_loss_coef > 0`): Σ_t logsumexp(router logits_t)² over
        each sequence's tokens.
    margin_histogram (`(L, E, bins)` int64, Quantile Balancing only): the real tokens' routing margins per expert,
        binned over `margin_bin_range` of the bias the forward routed with.
    margin_quantiles (`(L, E)` float32, `quantile_scope="micro_mean"` only): this micro-batch's exact quantile.
    """

    counts: torch.Tensor | None = None
    prob_sums: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    z_sums: torch.Tensor | None = None
    margin_histogram: torch.Tensor | None = None
    margin_quantiles: torch.Tensor | None = None


def router_statistics(
    router_logits: torch.Tensor | None,
    router_probs: torch.Tensor,
    top_k_index: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    z_grad: bool = True,
    batch_size: int | None = None,
    dropped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence statistics of the routers from what they already computed (no second pass, O(B·E) output), for
    one layer or for all layers at once (the model stacks them: one set of ops whatever the depth).

    router_logits (..., T, E), router_probs (..., T, E) fp32, top_k_index (..., T, K), token_mask (B, S) with 1 for
    real tokens, or None when every token is real (then `batch_size` is B, and no masking op runs); `...` is () for
    one layer or (L,). Returns counts (..., B, E), prob_sums (..., B, E), num_tokens (..., B), z_sums (..., B), all
    fp32. `z_grad=False` computes z_sums as a metric only (no graph), so autograd keeps no fp32 copy of the logits for
    a z-loss that is off. `router_logits=None` (a router that exposes only its probabilities): z_sums are 0.
    `dropped=True`: `top_k_index` may hold the sentinel E (a selection dropped over capacity), which is not counted.
    """
    lead = router_probs.shape[:-2]  # () or (L,)
    num_experts, top_k = router_probs.shape[-1], top_k_index.shape[-1]
    if token_mask is None and batch_size is None:
        raise ValueError("router_statistics needs token_mask (B, S) or, when every token is real, batch_size")
    batch = batch_size if token_mask is None else token_mask.shape[0]
    seq = router_probs.shape[-2] // batch
    mask = None if token_mask is None else token_mask.to(torch.float32)  # (B, S); the model passes fp32 already
    with torch.no_grad():
        index = top_k_index.reshape(*lead, batch, seq * top_k)  # (..., B, S·K)
        if mask is None:  # every selection counts once
            weights = torch.ones((), device=index.device).expand(index.shape)
        else:  # each selection counts as its token does
            weights = mask.repeat_interleave(top_k, dim=1).expand_as(index)
        bins = num_experts + 1 if dropped else num_experts  # the sentinel's bin, cut off below
        counts = weights.new_zeros(*lead, batch, bins).scatter_add_(-1, index, weights)[..., :num_experts]  # (.., B, E)
    probs = router_probs.reshape(*lead, batch, seq, num_experts)  # (..., B, S, E)
    prob_sums = (probs if mask is None else probs * mask[..., None]).sum(-2)  # (..., B, E)
    if router_logits is None:
        z_sums = prob_sums.new_zeros(prob_sums.shape[:-1])  # (..., B)
    else:
        with contextlib.nullcontext() if z_grad else torch.no_grad():  # a branch, not set_grad_enabled(): compiles
            lse_sq = torch.logsumexp(router_logits.float(), dim=-1).square().reshape(*lead, batch, seq)  # (..., B, S)
            z_sums = (lse_sq if mask is None else lse_sq * mask).sum(-1)  # (..., B)
    if mask is None:
        num_tokens = torch.full((*lead, batch), float(seq), device=counts.device)  # (..., B)
    else:
        num_tokens = mask.sum(1).expand(*lead, batch)  # (..., B)
    return counts, prob_sums, num_tokens, z_sums


def routing_margins(scores: torch.Tensor, bias: torch.Tensor, top_k: int) -> torch.Tensor:
    """Quantile Balancing's margins (T, E) of fp32 scores (T, E) routed with an additive bias (E,): r_tj = α_t − s_tj,
    α_t the (k+1)-th largest biased score of token t. Token t selects expert j iff r_tj < b_j: the fraction of tokens
    selecting j at a bias b'_j (α held) is the fraction of margins below it."""
    alpha = (scores + bias).topk(top_k + 1, dim=-1).values[:, -1:]  # (T, 1)
    return alpha - scores  # (T, E)


def margin_bin_range(bias: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The histogram's lower edge and bin width (fp32 scalars, or (L,) for (L, E) biases): `bins` uniform bins over
    [min b − 1, max b + 1], which holds every margin of scores in [0, 1]."""
    low = bias.amin(-1) - 1
    return low, (bias.amax(-1) + 1 - low) / bins


def margin_histogram(
    margins: torch.Tensor, bias: torch.Tensor, bins: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(E, bins) int64 counts of the margins (T, E) of the real tokens (`token_mask` (T,), 1 for real) per expert,
    over `margin_bin_range(bias, bins)`; a margin outside it (none for scores in [0, 1]) is counted in the end bin."""
    tokens, num_experts = margins.shape
    low, width = margin_bin_range(bias, bins)
    index = ((margins - low) / width).floor().clamp_(0, bins - 1).long()  # (T, E)
    index += torch.arange(num_experts, device=margins.device) * bins  # (T, E): expert j's bins start at j·bins
    if token_mask is None:
        weights = torch.ones((), dtype=torch.long, device=margins.device).expand(tokens, num_experts)
    else:
        weights = token_mask.to(torch.long)[:, None].expand(tokens, num_experts)  # (T, E)
    flat = torch.zeros(num_experts * bins, dtype=torch.long, device=margins.device)
    return flat.scatter_add_(0, index.view(-1), weights.reshape(-1)).view(num_experts, bins)  # (E, bins)


def micro_batch_quantile(margins: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) the exact quantile of one micro-batch's margins (T, E), Megatron-Core's `qb_dual_update` in this bias
    space: per expert the (⌊T·k/E⌋ + 1)-th smallest margin of the T real tokens (`token_mask` (T,)). No host sync."""
    tokens, num_experts = margins.shape
    if token_mask is not None:
        margins = margins.masked_fill(token_mask[:, None] == 0, float("inf"))  # padding sorts last
    real = torch.full((), tokens, device=margins.device) if token_mask is None else token_mask.sum().long()
    rank = (real * top_k // num_experts).clamp(max=tokens - 1)  # 0-based
    ordered = margins.sort(dim=0).values  # (T, E)
    return ordered.gather(0, rank.expand(1, num_experts)).squeeze(0)  # (E,)


def quantile_statistics(
    logits: torch.Tensor,
    bias: torch.Tensor,
    config: QwenMoeGBConfig,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantile Balancing's statistics of one training forward, per MoE layer: `margin_histogram` (L, E, bins) and,
    for `quantile_scope="micro_mean"`, `micro_batch_quantile` (L, E). logits (L, T, E), bias (L, E) fp32,
    token_mask (B, S) or None. One layer at a time: the (T, E) margins never exist for all layers at once."""
    mask = None if token_mask is None else token_mask.reshape(-1)  # (T,)
    histograms, quantiles = [], []
    with torch.no_grad():  # a statistic, not part of the loss
        for layer_logits, layer_bias in zip(logits, bias):
            scores = layer_logits.float()
            scores = scores.softmax(-1) if config.router_scoring_func == "softmax" else scores.sigmoid()  # (T, E)
            histogram, quantile = layer_quantile_statistics(scores, layer_bias, config, mask)
            histograms.append(histogram)
            quantiles.append(quantile)
    return torch.stack(histograms), None if quantiles[0] is None else torch.stack(quantiles)


def layer_quantile_statistics(
    scores: torch.Tensor, bias: torch.Tensor, config, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's Quantile Balancing statistics from the fp32 scores (T, E) it routed with and its bias (E,): the
    (E, bins) `margin_histogram` and, for `quantile_scope="micro_mean"`, the (E,) `micro_batch_quantile` (else None).
    `config`: `num_experts_per_tok`, `quantile_bins`, `quantile_scope`; `token_mask` (T,) or None."""
    with torch.no_grad():
        margins = routing_margins(scores.detach(), bias, config.num_experts_per_tok)  # (T, E)
        histogram = margin_histogram(margins, bias, config.quantile_bins, token_mask)  # (E, bins)
        if config.quantile_scope != "micro_mean":
            return histogram, None
        return histogram, micro_batch_quantile(margins, config.num_experts_per_tok, token_mask)  # (E,)


def per_group_lbl(counts: torch.Tensor, prob_sums: torch.Tensor, num_tokens: torch.Tensor | float) -> torch.Tensor:
    """N · Σ_n f_n · P_n over the last dim (N experts, or groups of experts), for every leading index (layers,
    sequence groups): shape (...,). f_n = counts_n / Σ_m counts_m, the share of the top-k selections (every token makes
    K of them, so this is counts_n / (K · tokens counted)), no grad; P_n = prob_sums_n / num_tokens.

    counts (..., N) of any dtype (the global scope passes the step's int64 counts), prob_sums (..., N) float,
    num_tokens (...) or a scalar: the tokens of P, which for the global scope are local while the counts cover the
    whole step. A group with no tokens gives 0."""
    if counts.requires_grad:
        counts = counts.detach()
    dot = (counts * prob_sums).sum(-1)  # (...,): Σ_n c_n · Σ_t p_t,n
    norm = counts.sum(-1) * num_tokens  # (...,): (K · tokens of f) · (tokens of P)
    return counts.shape[-1] * dot / norm.clamp_min(1.0)


def switch_balance_loss(
    counts: torch.Tensor, prob_sums: torch.Tensor, num_tokens: torch.Tensor | float
) -> torch.Tensor:
    """Expert-level load-balancing loss E · Σ_i f_i · P_i (`per_group_lbl`), 1.0 at perfect balance, averaged over
    every leading dim (layers, sequence groups).

    counts, prob_sums: (L, E), (L, G, E) or (E,); num_tokens: their leading shape, or a scalar.
    transformers' `load_balancing_loss_func` does not divide f by K (its balanced value is K), so on one layer it
    equals K times this loss.
    """
    return per_group_lbl(counts, prob_sums, num_tokens).mean()


def group_matrix(groups: list[list[int]], num_experts: int, like: torch.Tensor) -> torch.Tensor:
    """(E, D) 0/1 matrix (dtype and device of `like`) that sums expert columns into their group."""
    member = [set(g) for g in groups]
    rows = [[float(e in m) for m in member] for e in range(num_experts)]
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def device_balance_loss(
    counts: torch.Tensor, prob_sums: torch.Tensor, num_tokens: torch.Tensor | float, groups: list[list[int]]
) -> torch.Tensor:
    """Device-level loss (DeepSeek-V2): the expert-level loss over groups as super-experts, D · Σ_d F_d · P_d with
    F_d = Σ_{i∈d} f_i and P_d = Σ_{i∈d} P_i. 1.0 at balance; a single group is constant 1."""
    g = group_matrix(groups, counts.shape[-1], prob_sums)  # (E, D)
    return switch_balance_loss(counts.to(g.dtype) @ g, prob_sums @ g, num_tokens)  # (..., D)


def router_z_loss(z_sums: torch.Tensor, num_tokens: torch.Tensor | float) -> torch.Tensor:
    """Router z-loss mean_t logsumexp(x_t)², z_sums and num_tokens (L,) or (L, B) summed per layer; mean over L."""
    num_tokens = torch.as_tensor(num_tokens, device=z_sums.device).to(z_sums.dtype)
    if z_sums.dim() > 1:
        z_sums, num_tokens = z_sums.sum(-1), num_tokens.sum(-1)  # (L,)
    return (z_sums / num_tokens.clamp_min(1.0)).mean()


def group_sequences(stats: RouterStats, group_size: int | None) -> RouterStats:
    """Sum the per-sequence statistics over consecutive groups of `group_size` sequences: (L, B, ·) -> (L, G, ·).
    `None` = one group (the whole micro-batch); a last partial group is kept."""
    batch = stats.counts.shape[1]
    if group_size is None or group_size >= batch:  # one group: a plain sum
        return RouterStats(
            *(x.sum(1, keepdim=True) for x in (stats.counts, stats.prob_sums, stats.num_tokens, stats.z_sums))
        )
    size = group_size
    group_id = torch.arange(batch, device=stats.counts.device) // size  # (B,)
    num_groups = int((batch + size - 1) // size)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], num_groups, *x.shape[2:])  # (L, G, ·)
        return out.index_add(1, group_id, x)

    return RouterStats(*(reduce(x) for x in (stats.counts, stats.prob_sums, stats.num_tokens, stats.z_sums)))


def micro_group_size(config: QwenMoeGBConfig) -> int | None:
    """Sequences per micro-scope group: 1 for the sequence scope, else `balance_group_size` (None = micro-batch)."""
    return 1 if config.balance_scope == "sequence" else config.balance_group_size


def balance_loss(
    config: QwenMoeGBConfig,
    stats: RouterStats,
    global_counts: torch.Tensor | None = None,
    groups: list[list[int]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured balance losses for one micro-batch, weighted and summed, plus the unweighted terms.

    `global_counts` (L, E): counts of the whole step so far (all-reduced over data-parallel ranks and buffered over
    micro-steps), used for f when `config.balance_scope == "global"`; without it the global scope falls back to the
    micro-batch (exact for one process and no accumulation). P is always local. `groups`: the device-level partition
    (default `config.expert_groups()`; the model passes its own, which resolves `"ep"`).
    Terms: `lbl` (expert-level, at the configured scope) always, and those that enter the total: `micro_lbl` (at the
    micro grouping, chunks of `balance_group_size` sequences or the whole micro-batch: the global scope with
    `micro_balance_coef > 0`), `device_lbl` (with device groups), `z_loss` (`router_z_loss_coef > 0`). Nothing the
    total does not use is computed (the balancer's metrics come from the statistics, later, in one batch).
    """
    parts = {}
    if config.balance_scope == "global":
        f_counts = stats.counts.sum(1) if global_counts is None else global_counts  # (L, E)
        prob_sums, num_tokens = stats.prob_sums.sum(1), stats.num_tokens.sum(1)  # (L, E), (L,): P stays local
        parts["lbl"] = switch_balance_loss(f_counts, prob_sums, num_tokens)
        total = config.router_aux_loss_coef * parts["lbl"]
        if config.micro_balance_coef > 0:
            micro = group_sequences(stats, config.balance_group_size)  # (L, G, ·)
            parts["micro_lbl"] = switch_balance_loss(micro.counts, micro.prob_sums, micro.num_tokens)
            total = total + config.micro_balance_coef * parts["micro_lbl"]
    else:
        micro = group_sequences(stats, micro_group_size(config))  # (L, G, ·)
        f_counts, prob_sums, num_tokens = micro.counts, micro.prob_sums, micro.num_tokens
        parts["lbl"] = switch_balance_loss(f_counts, prob_sums, num_tokens)
        total = config.router_aux_loss_coef * parts["lbl"]
    if groups is None:
        groups = config.expert_groups()
    if groups is not None:
        parts["device_lbl"] = device_balance_loss(f_counts, prob_sums, num_tokens, groups)
        total = total + config.device_balance_coef * parts["device_lbl"]
    if config.router_z_loss_coef > 0:
        parts["z_loss"] = router_z_loss(stats.z_sums, stats.num_tokens)
        total = total + config.router_z_loss_coef * parts["z_loss"]
    return total, parts


# --------------------------------------------------------------------------------------------- language-model loss

CHUNK_ELEMENTS = 2**27  # logits elements per chunk when `loss_chunk_size` is None: 512 MiB in fp32


def loss_chunk_tokens(chunk_size: int | None, vocab_size: int) -> int:
    """Tokens per chunk of the chunked loss: `chunk_size`, or by default as many as fill `CHUNK_ELEMENTS` logits."""
    return chunk_size or max(1, CHUNK_ELEMENTS // vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_t CE(h_t · Wᵀ, y_t) over the valid (non-ignored) tokens, chunk by chunk: the forward computes each chunk's
    logits, its loss and its gradients at once, so no (T, V) tensor outlives a chunk; autograd keeps only dL/dh (T, D)
    and dL/dW (V, D), which the backward scales by the incoming gradient.

    The gradient of the logits is softmax − one-hot. Per chunk only the softmax part is multiplied out (seven ops a
    chunk); the one-hot part is applied once, to all tokens: dL/dh −= W[y] and dL/dW −= Σ_t onehot(y_t) h_tᵀ (an
    index_add). Ignored tokens have their hidden rows zeroed (no dL/dW; their logits' values do not matter) and their
    dL/dh rows zeroed at the end."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, chunk_size: int, ignore_index: int):
        # hidden (T, D), weight (V, D), targets (T,), valid (T,) bool
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # transformers' `.float()`
        valid = valid[:, None]  # (T, 1)
        hidden = hidden * valid  # (T, D): ignored rows zero
        weight_t = weight.t()  # (D, V)
        losses, grad_rows, grad_weight = [], [], None
        for h, y in zip(hidden.split(chunk_size), targets.split(chunk_size)):  # (C, D), (C,)
            log_probs = torch.log_softmax((h @ weight_t).to(dtype), dim=-1)  # (C, V): the LM head + `.float()`
            losses.append(F.nll_loss(log_probs, y, ignore_index=ignore_index, reduction="sum"))
            if want_h or want_w:
                probs = log_probs.exp_().to(hidden.dtype)  # (C, V) softmax, in place; the logits' gradient dtype
                if want_h:
                    grad_rows.append(probs @ weight)  # (C, D)
                if want_w and grad_weight is None:
                    grad_weight = (probs.t() @ h).to(dtype)  # (V, D), summed in fp32
                elif want_w and grad_weight.dtype == probs.dtype:
                    grad_weight.addmm_(probs.t(), h)
                elif want_w:
                    grad_weight += (probs.t() @ h).to(dtype)  # bf16 products, fp32 sum
        safe = targets.clamp(0, weight.shape[0] - 1)  # (T,): each token's one-hot column (ignored tokens: any)
        grad_hidden = None
        if want_h:  # (T, D): softmax part − W[y], ignored rows 0
            grad_hidden = grad_rows[0] if len(grad_rows) == 1 else torch.cat(grad_rows)
            grad_hidden = grad_hidden.sub_(F.embedding(safe, weight)).mul_(valid)
        if want_w:  # − Σ_t onehot(y_t) h_tᵀ (ignored rows of h are 0)
            grad_weight.index_add_(0, safe, hidden.to(dtype), alpha=-1)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype)
        dw = None if grad_weight is None else grad_weight * grad_output
        return dh, dw, None, None, None, None


def chunked_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' causal-LM loss (`ForCausalLMLoss`: labels shifted by one, fp32 logits, sum over the tokens divided
    by `num_items_in_batch`, else the mean over non-ignored tokens) of `hidden_states @ weight.T`, without the (T, V)
    logits: chunks of `chunk_size` tokens (default: `CHUNK_ELEMENTS // V`). hidden_states (B, S, D), weight (V, D),
    labels (B, S) or `shift_labels` (B, S) already shifted."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, S): tokens < n predict n
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # (T, D)
    targets = shift_labels.reshape(-1).to(hidden.device)  # (T,)
    valid = targets != ignore_index  # (T,)
    chunk = loss_chunk_tokens(chunk_size, weight.shape[0])
    total = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, valid, chunk, ignore_index)
    if num_items_in_batch is None:
        return total / valid.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def liger_causal_lm_loss(device: torch.device):
    """Liger-Kernel's fused linear cross-entropy causal-LM loss (`LigerForCausalLMLoss`, Triton) where it runs: the
    `liger_kernel` package installed and a CUDA device. None elsewhere."""
    if device.type != "cuda" or not is_liger_kernel_available():
        return None
    return importlib.import_module("liger_kernel.transformers.model.loss_utils").LigerForCausalLMLoss  # optional


class QwenMoeGBLMHead(nn.Linear):
    """The LM head (an `nn.Linear`, `lm_head.weight` in checkpoints). Called with `labels` (or `shift_labels`), it
    returns the cross-entropy loss instead of the logits, inside its own forward, so FSDP2 gathers its weight for the
    loss as it does for the logits: chunked (`chunked_linear_cross_entropy`), or Liger-Kernel's fused one when
    `implementation="liger"` and it can run there."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor | None = None,
        implementation: str = "chunked",
        **loss_kwargs,
    ) -> torch.Tensor:
        if labels is None and loss_kwargs.get("shift_labels") is None:
            return super().forward(hidden_states)  # (B, S, V) logits
        if implementation == "liger" and (liger := liger_causal_lm_loss(hidden_states.device)) is not None:
            hidden = hidden_states.contiguous()  # Liger views it as (T, D)
            return liger(hidden, self.weight, labels, hidden.shape[-1], **loss_kwargs)
        return chunked_linear_cross_entropy(hidden_states, self.weight, labels, **loss_kwargs)


def _tensor_parallel(weight: torch.Tensor) -> bool:
    """The weight is sharded by tensor parallel (its DTensor mesh has a "tp" dim of size > 1)."""
    mesh = getattr(weight, "device_mesh", None)
    return mesh is not None and "tp" in (mesh.mesh_dim_names or ()) and mesh["tp"].size() > 1


# --------------------------------------------------------------------------------------------- router and MoE block


class QwenMoeGBTopKRouter(nn.Module):
    """Top-k router. Scores are softmax (or sigmoid) of fp32 logits; `expert_bias` (aux-free, fp32, persistent) is
    added to the scores for top-k selection only, the gate weights come from the unbiased scores. The logits' linear
    runs in fp32 with `config.router_dtype="float32"`. Given `routed_experts` (T, K), tokens with indices use those
    experts instead of the top-k (routing replay); their gate weights are the current scores at those experts."""

    def __init__(self, config: QwenMoeGBConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.scoring_func = config.router_scoring_func
        self.aux_free = config.aux_free
        self.fp32_logits = config.router_dtype == "float32"
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.capacity_factor = config.expert_capacity_factor
        self.drop_policy = config.moe_token_drop_policy
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32), persistent=True)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:  # keep the bias fp32 under model.to(bf16)
            self.expert_bias = self.expert_bias.float()
        return self

    def select(
        self, router_logits: torch.Tensor, routed_experts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 scores (T, E), the selected experts (T, K) and their unbiased scores (T, K); the bias only moves the
        selection. `routed_experts` (T, K): where a token's row holds indices (not -1), they are its experts."""
        logits = router_logits.float()
        scores = logits.softmax(-1) if self.scoring_func == "softmax" else logits.sigmoid()  # (T, E)
        if not self.aux_free and routed_experts is None and self.n_group == 1:
            top_k_scores, top_k_index = torch.topk(scores, self.top_k, dim=-1)  # (T, K), (T, K)
            return scores, top_k_index, top_k_scores
        biased = scores + self.expert_bias if self.aux_free else scores
        if self.n_group > 1:
            biased = limit_to_groups(biased, self.n_group, self.topk_group)
        top_k_index = torch.topk(biased, self.top_k, dim=-1).indices  # (T, K)
        if routed_experts is not None:  # replay: a row of -1 routes as usual
            top_k_index = torch.where(routed_experts[:, :1] >= 0, routed_experts, top_k_index)  # (T, K)
        return scores, top_k_index, scores.gather(-1, top_k_index)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits (T, E) of hidden states (T, D): in the running precision, or fp32 (`router_dtype`)."""
        if not self.fp32_logits:
            return F.linear(hidden_states, self.weight)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return F.linear(hidden_states.float(), self.weight.float())

    def forward(self, hidden_states: torch.Tensor, routed_experts: torch.Tensor | None = None):
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])  # (T, D)
        router_logits = self.logits(hidden_states)  # (T, E)
        scores, top_k_index, top_k_weights = self.select(router_logits, routed_experts)  # (T, E), (T, K), (T, K)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(-1, keepdim=True)
        if self.capacity_factor is not None and self.training:
            top_k_index, top_k_weights = drop_over_capacity(
                top_k_index, top_k_weights, self.num_experts, self.capacity_factor, self.drop_policy
            )
        if self.routed_scaling_factor != 1.0:
            top_k_weights = top_k_weights * self.routed_scaling_factor
        probs = scores if self.scoring_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        weights_dtype = hidden_states.dtype if self.fp32_logits else router_logits.dtype  # the experts' input dtype
        return router_logits, top_k_weights.to(weights_dtype), top_k_index, probs


def limit_to_groups(scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3's group-limited routing: the scores (T, E) with -inf outside each token's `topk_group` best of
    `n_group` contiguous expert groups, a group scoring the sum of its two highest scores."""
    tokens, num_experts = scores.shape
    grouped = scores.view(tokens, n_group, num_experts // n_group)  # (T, G, E/G)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (T, G)
    best = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (T, G)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, num_experts)  # (T, E)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Selections one expert serves per forward: ceil(factor · T · K / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def drop_over_capacity(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, capacity_factor: float, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token dropping: each expert keeps at most `expert_capacity(...)` of the selections (T, K) routed to it, the
    highest gate weights (`policy="probs"`) or the first in token order (`"position"`, slot order within a token).
    A dropped selection gets index `num_experts` (transformers' experts skip such a sentinel) and weight 0."""
    tokens, top_k = top_k_index.shape
    capacity = expert_capacity(tokens, top_k, num_experts, capacity_factor)
    if capacity >= tokens * top_k:  # nothing can be dropped
        return top_k_index, top_k_weights
    with torch.no_grad():
        flat = top_k_index.reshape(-1)  # (T·K,), token-major
        one_hot = F.one_hot(flat, num_experts)  # (T·K, E)
        if policy == "position":
            rank = (one_hot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)  # (T·K,): earlier ones of its expert
        else:
            weights = top_k_weights.detach().float().reshape(-1)  # (T·K,)
            order = torch.sort(weights, descending=True, stable=True).indices  # ties: token order
            rank_sorted = (one_hot[order].cumsum(0) - 1).gather(1, flat[order][:, None]).squeeze(1)
            rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (T·K,)
        kept = (rank < capacity).view(tokens, top_k)  # (T, K)
    index = top_k_index.masked_fill(~kept, num_experts)  # (T, K)
    return index, top_k_weights * kept.to(top_k_weights.dtype)  # (T, K), (T, K)


# `moe_recompute="expert_act"` keeps the outputs of the experts' projections (the matmuls) and recomputes in backward
# every other op of the experts: the activation `act(gate) · up`, the gate weighting, the gathers and scatters of the
# tokens (cheap, and what they save is what the activations cost). No matmul runs twice.
_KEPT_MATMULS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default, torch.ops.aten._grouped_mm.default,
}  # fmt: skip


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def _expert_act_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def recompute(mode: str, function, *args):
    """`function(*args)` whose activations are recomputed in backward as `moe_recompute=mode` says: `"expert_act"`
    all but the matmuls (selective checkpointing), anything else everything (a plain non-reentrant
    checkpoint). Without grad, a plain call."""
    if not torch.is_grad_enabled():
        return function(*args)
    contexts = {"context_fn": _expert_act_contexts} if mode == "expert_act" else {}
    return checkpoint(function, *args, use_reentrant=False, **contexts)


@use_experts_implementation
class _DispatchedExperts(Qwen2MoeExperts):
    """transformers' fused Qwen2-MoE experts: gate_up_proj (E, 2I, D), down_proj (E, D, I); the forward dispatches on
    `config._experts_implementation` (eager, batched_mm, grouped_mm)."""


class QwenMoeGBExperts(_DispatchedExperts):
    """transformers' fused experts (`_DispatchedExperts`), with grouped_mm in the autocast dtype under autocast, as
    eager's and batched_mm's matmuls are. `torch._grouped_mm` has no autocast kernel (pytorch#174763) and transformers
    casts its input to the weights' dtype, so with fp32 weights under bf16 autocast (`--bf16 true`) the experts'
    GEMMs would run in fp32. The weights are cast for the call (differentiably, as autocast casts mm's operands);
    parametrized weights (PEFT's LoRA on the experts) cannot be swapped for the call and keep transformers' path."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        dtype = _autocast_dtype(hidden_states.device.type)
        weights = (self.gate_up_proj, self.down_proj)
        if (
            self.config._experts_implementation != "grouped_mm"
            or dtype in (None, *(w.dtype for w in weights))
            or nn.utils.parametrize.is_parametrized(self)
        ):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        cast = {"gate_up_proj": weights[0].to(dtype), "down_proj": weights[1].to(dtype)}  # as autocast casts mm's
        return torch.func.functional_call(self, cast, (hidden_states, top_k_index, top_k_weights), strict=False)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device_type`, or None when autocast is off there."""
    if device_type not in ("cuda", "cpu", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class QwenMoeGBSparseMoeBlock(nn.Module):
    """Routed experts + optional sigmoid-gated shared expert; returns the output and this layer's routing (router
    logits (T, E), probabilities (T, E), selected experts (T, K)), from which the model computes the statistics."""

    def __init__(self, config: QwenMoeGBConfig):
        super().__init__()
        self.gate = QwenMoeGBTopKRouter(config)
        self.experts = QwenMoeGBExperts(config)
        self.config = config
        if config.expert_capacity_factor is not None:  # dropped selections carry the sentinel index E
            self.experts._is_expert_parallel = True  # transformers' experts then skip (and zero) sentinel rows
        self.shared_expert = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = Qwen2MoeMLP(config, intermediate_size=config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor, routed_experts: torch.Tensor | None = None):
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.view(-1, hidden)  # (T, D)
        replay = None if routed_experts is None else routed_experts.reshape(-1, routed_experts.shape[-1])  # (T, K)
        if (
            self.training
            and self.gate.capacity_factor is not None
            and self.experts.num_experts != self.gate.num_experts
        ):
            raise ValueError(
                "expert_capacity_factor with expert parallelism is not supported: the all-to-all dispatch has no "
                "dropped-selection slot; train dropless (expert_capacity_factor=None) under ep_size > 1"
            )
        router_logits, top_k_weights, top_k_index, probs = self.gate(flat, replay)
        mode = self.config.moe_recompute if self.training else "none"
        if mode in ("expert_act", "experts"):  # recomputed in backward from the kept routing
            out = recompute(mode, self.experts, flat, top_k_index, top_k_weights)  # (T, D)
        else:
            out = self.experts(flat, top_k_index, top_k_weights)  # (T, D)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(batch, seq, hidden), (router_logits, probs, top_k_index)  # (B, S, D), the routing


# --------------------------------------------------------------------------------------------- decoder


class QwenMoeGBDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: QwenMoeGBConfig, layer_idx: int):
        super().__init__()
        attention = Qwen3MoeAttention if config.use_qk_norm else Qwen2MoeAttention
        self.self_attn = attention(config, layer_idx)
        if layer_idx in config.moe_layer_indices():
            self.mlp = QwenMoeGBSparseMoeBlock(config)
        else:
            self.mlp = Qwen2MoeMLP(config, intermediate_size=config.intermediate_size)
        self.input_layernorm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        routed_experts: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """`routed_experts` (B, S, K): this layer's replayed experts (a sparse layer only)."""
        cache = _pop_cache(cache, kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **{CACHE_ARG: cache},
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        routing = None
        if isinstance(self.mlp, QwenMoeGBSparseMoeBlock) and self.training and self.mlp.config.moe_recompute == "moe":
            hidden_states, routing = recompute("moe", self.mlp, hidden_states, routed_experts)  # routing: outputs
        elif isinstance(self.mlp, QwenMoeGBSparseMoeBlock):
            hidden_states, routing = self.mlp(hidden_states, routed_experts)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, routing


class QwenMoeGBPreTrainedModel(PreTrainedModel):
    config: QwenMoeGBConfig
    config_class = QwenMoeGBConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QwenMoeGBDecoderLayer"]
    _skip_keys_device_placement = [CACHE_ARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True  # one graph, router statistics included (tests/test_compile.py)
    _supports_attention_backend = True
    # A stock Qwen-MoE checkpoint has no aux-free bias: it is zero, as `_init_weights` makes it (no load-report noise)
    _keys_to_ignore_on_load_missing = [r"mlp\.gate\.expert_bias"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(QwenMoeGBTopKRouter, index=0),
        "hidden_states": OutputRecorder(QwenMoeGBDecoderLayer, index=0),
        "attentions": OutputRecorder(Qwen2MoeAttention, index=1),
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus: `auto_map` names the base model (`AutoModel`) beside the causal LM, which
        serving engines' Transformers backends (vLLM, SGLang) build; and under FSDP2 (transformers' parallel engine,
        or `fully_shard`) the model's class is a subclass defined by torch (`FSDPQwenMoeGBForCausalLM`): the folder
        gets the code and `auto_map` of our own class, as a one-process save does, and none of torch's files."""
        own = next(c for c in type(self).__mro__ if c.__module__ == __name__)  # our class under any wrapper class
        if own._auto_class is not None:  # Hub code: name every class it provides, the base model included
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **hub_auto_map()}
        if own is type(self) or own._auto_class is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        type(self)._auto_class = None  # the wrapper class ships no code of its own
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if kwargs.get("is_main_process", True) and rank == 0:
            os.makedirs(save_directory, exist_ok=True)
            code_of = type(own.__name__, (), {"__module__": own.__module__, "_auto_class": own._auto_class})
            custom_object_save(code_of(), save_directory, config=self.config)  # our files + auto_map in the config
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Qwen2MoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, QwenMoeGBTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
        elif isinstance(module, QwenMoeGBModel):
            init.zeros_(module.step_expert_counts)


@dataclass
class QwenMoeGBModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` + `router_stats` (`RouterStats`, shapes (L, B, E) / (L, B)) and, on request
    (`output_routed_experts=True`), `routed_experts` (B, S, L, K) int64: the experts each token used in each sparse
    layer, the form `forward(routed_experts=...)` replays."""

    router_stats: RouterStats | None = None
    routed_experts: torch.LongTensor | None = None


@dataclass
class QwenMoeGBCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` + `router_stats`, `balance_loss` (the weighted micro-scope balance losses) and
    `routed_experts` (B, S, L, K), on request."""

    router_stats: RouterStats | None = None
    balance_loss: torch.Tensor | None = None
    routed_experts: torch.LongTensor | None = None


@dataclass
class QwenMoeGBGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' `GenerateDecoderOnlyOutput` + `routed_experts` (B, S, L, K) int64 for the whole of `sequences`
    (prompt + new tokens): the experts each position used while generating; -1 where a position was never run (the
    last token). `forward(sequences, routed_experts=routed_experts)` replays them."""

    routed_experts: torch.LongTensor | None = None


def check_routed_experts(routed_experts: torch.Tensor, batch: int, seq: int, num_layers: int, config) -> None:
    """Raise `ValueError` unless `routed_experts` is an integer (B, S, L, K) tensor of expert indices < num_experts,
    each token's row either K distinct indices or all -1 (route it as usual). Checks values once (one host sync)."""
    expected = (batch, seq, num_layers, config.num_experts_per_tok)
    if routed_experts.is_floating_point() or routed_experts.is_complex() or routed_experts.dtype == torch.bool:
        raise ValueError(f"routed_experts has dtype {routed_experts.dtype}: allowed an integer dtype (int64)")
    if tuple(routed_experts.shape) != expected:
        raise ValueError(
            f"routed_experts has shape {tuple(routed_experts.shape)}: allowed (batch, sequence, MoE layers, "
            f"num_experts_per_tok) = {expected}"
        )
    rows = routed_experts.sort(-1).values  # (B, S, L, K)
    unused = rows[..., -1] < 0  # (B, S, L): a row of -1
    bad_range = ((rows < 0) & ~unused[..., None]).any() | (rows >= config.num_experts).any()
    repeated = ((rows[..., 1:] == rows[..., :-1]) & ~unused[..., None]).any()
    bad_range, repeated = (bool(x) for x in torch.stack([bad_range, repeated]).tolist())
    if bad_range:
        raise ValueError(
            f"routed_experts holds indices outside 0..{config.num_experts - 1} (num_experts={config.num_experts}): "
            "allowed expert indices, or a whole row of -1 for a token routed as usual"
        )
    if repeated:
        raise ValueError("routed_experts names an expert twice for one token: allowed K distinct experts per row")


class RoutingRecorder:
    """Context manager that records the experts a `QwenMoeGBModel` uses in every forward run inside it (each call gets
    `output_routed_experts=True`): `calls` holds one (B, s, L, K) tensor per forward, in order. With a KV cache (the
    prefill, then one position per decoding step) `sequence_routing(length)` joins them into the routing of whole
    sequences, (B, length, L, K), -1 for positions never run."""

    def __init__(self, moe_model: nn.Module):
        self.moe_model, self.calls, self._handles = moe_model, [], []

    def __enter__(self) -> "RoutingRecorder":
        def ask(module, args, kwargs):
            return args, {**kwargs, "output_routed_experts": True}

        def keep(module, args, kwargs, output):
            self.calls.append(output.routed_experts if hasattr(output, "routed_experts") else output[-1])

        self._handles = [
            self.moe_model.register_forward_pre_hook(ask, with_kwargs=True),
            self.moe_model.register_forward_hook(keep, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def sequence_routing(self, length: int) -> torch.LongTensor:
        """The recorded calls joined along the sequence and padded with -1 to `length` positions: (B, length, L, K)."""
        if not self.calls:
            raise ValueError("no forward ran while recording: nothing to return as routed_experts")
        batch = self.calls[0].shape[0]
        if any(c.shape[0] != batch for c in self.calls):  # beam search reorders and regroups rows between steps
            raise ValueError(
                "routed_experts: the batch changed between generation steps (beam search or candidate decoding); "
                "allowed greedy or sampling decoding (num_beams=1, no assistant model)"
            )
        routing = torch.cat(self.calls, dim=1)  # (B, run positions, L, K)
        if routing.shape[1] > length:
            raise ValueError(
                f"routed_experts: {routing.shape[1]} positions ran for sequences of {length}; allowed one forward "
                "over the prompt, then one per new token (a KV cache)"
            )
        return F.pad(routing, (0, 0, 0, 0, 0, length - routing.shape[1]), value=-1)  # (B, length, L, K)


def token_mask_from(attention_mask: torch.Tensor | None, seq: int, device: torch.device) -> torch.Tensor | None:
    """(B, S) fp32 mask of real tokens for the router statistics (a 2-D attention mask covers past + current tokens),
    or None when there is no 2-D mask: every token is real."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -seq:].to(device=device, dtype=torch.float32)
    return None


class QwenMoeGBModel(QwenMoeGBPreTrainedModel):
    def __init__(self, config: QwenMoeGBConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [QwenMoeGBDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2MoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        # Expert selection counts of the current optimizer step, all-reduced over data-parallel ranks and summed over
        # gradient-accumulation micro-steps by the trainer's balancer; reset at each optimizer step. int64: exact.
        num_moe = len(config.moe_layer_indices())
        self.register_buffer("step_expert_counts", torch.zeros(num_moe, config.num_experts, dtype=torch.long), False)
        self.post_init()

    def moe_routers(self) -> list[QwenMoeGBTopKRouter]:
        """The routers of the sparse layers, in layer order (the L of `router_stats`)."""
        return [layer.mlp.gate for layer in self.layers if isinstance(layer.mlp, QwenMoeGBSparseMoeBlock)]

    def expert_parallel_groups(self) -> list[list[int]]:
        """The experts each expert-parallel rank holds in this loaded model: transformers' expert parallel gives rank r
        the contiguous block of `experts.num_experts` (which it sets to the local count) experts starting at r × that
        count. One group without expert parallel."""
        blocks = [layer.mlp.experts for layer in self.layers if isinstance(layer.mlp, QwenMoeGBSparseMoeBlock)]
        local = blocks[0].num_experts if blocks else self.config.num_experts
        return [list(range(r * local, (r + 1) * local)) for r in range(self.config.num_experts // local)]

    def expert_groups(self) -> list[list[int]] | None:
        """The partition the device-level loss balances: the config's, or for `device_balance_groups="ep"`
        `expert_parallel_groups()`."""
        if self.config.device_balance_groups == "ep":
            return self.expert_parallel_groups()
        return self.config.expert_groups()

    @capture_outputs
    @_old_cache_name_deprecated
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        routed_experts: torch.LongTensor | None = None,
        output_routed_experts: bool | None = None,
        **kwargs,
    ) -> QwenMoeGBModelOutputWithPast:
        r"""routed_experts (`(B, S, L, K)` integer, *optional*): routing replay. Per token and sparse layer, the K
        experts to use instead of the router's top-k (a row of -1: route that token as usual); the gate weights are the
        current router's scores at those experts (normalised when `norm_topk_prob`), so the router keeps its gradient,
        and the balance statistics count these experts. output_routed_experts (`bool`): return the experts used,
        in the same form (`routed_experts` of the output)."""
        cache = _pop_cache(cache, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]
        batch, seq = inputs_embeds.shape[:2]
        token_mask = token_mask_from(attention_mask, seq, inputs_embeds.device)
        moe_layers = self.config.moe_layer_indices()
        if routed_experts is not None:
            check_routed_experts(routed_experts, batch, seq, len(moe_layers), self.config)
            routed_experts = routed_experts.to(device=inputs_embeds.device, dtype=torch.long)
        replay = dict(zip(moe_layers, range(len(moe_layers)))) if routed_experts is not None else {}
        if not isinstance(mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_ARG: cache,
                "position_ids": position_ids,
            }
            makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
            used = dict.fromkeys(self.config.layer_types[: self.config.num_hidden_layers])
            mask_mapping = {kind: makers[kind](**mask_kwargs) for kind in used}  # only the kinds the layers use
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        routings = []
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states, routing = decoder_layer(
                hidden_states,
                attention_mask=mask_mapping[self.config.layer_types[i]],
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                routed_experts=routed_experts[:, :, replay[i]] if i in replay else None,  # (B, S, K)
                **{CACHE_ARG: cache},  # the name GradientCheckpointingLayer clears under checkpointing
                **kwargs,
            )
            if routing is not None:
                routings.append(routing)
        router_stats = used = None
        if routings:  # every MoE layer's statistics in one set of ops: (L, T, E), (L, T, E), (L, T, K) stacked
            logits, probs, index = (torch.stack(x) for x in zip(*routings))
            z_grad = self.config.router_z_loss_coef > 0  # z-loss off: its statistic is a metric, out of the graph
            dropped = self.training and self.config.expert_capacity_factor is not None  # sentinels in `index`
            stats = router_statistics(logits, probs, index, token_mask, z_grad, batch, dropped)
            qb = (None, None)
            if uses_quantile_balancing(self.config) and self.training and torch.is_grad_enabled():  # training only
                bias = torch.stack([router.expert_bias for router in self.moe_routers()])  # (L, E)
                qb = quantile_statistics(logits, bias, self.config, token_mask)  # (L, E, bins), (L, E) or None
            router_stats = RouterStats(*stats, *qb)  # (L, B, ·)
            if output_routed_experts:
                used = index.reshape(len(routings), batch, seq, -1).permute(1, 2, 0, 3)  # (L, T, K) -> (B, S, L, K)
        return QwenMoeGBModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            router_stats=router_stats,
            routed_experts=used,
            **{CACHE_ARG: cache if use_cache else None},
        )


class QwenMoeGBForCausalLM(QwenMoeGBPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: QwenMoeGBConfig):
        super().__init__(config)
        self.model = QwenMoeGBModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = QwenMoeGBLMHead(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @_old_cache_name_deprecated
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        add_balance_loss: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        routed_experts: torch.LongTensor | None = None,
        output_routed_experts: bool | None = None,
        **kwargs,
    ) -> QwenMoeGBCausalLMOutputWithPast:
        r"""Causal LM forward. With `labels`, `loss` = CE (+ the micro-scope balance losses when `add_balance_loss`,
        which defaults to `self.training`); `aux_loss` is the expert-level LBL (1.0 at balance), returned when it is
        added to the loss or on request (`output_router_logits`, as in transformers); `router_stats` carries the
        statistics a trainer needs for the global scope. A trainer that adds the balance loss itself passes
        `add_balance_loss=False`, and the model computes none.

        Training with labels computes the CE chunk by chunk from the hidden states (`loss_implementation="chunked"`)
        when the tokens exceed one chunk (`loss_chunk_size`): no (T, V) logits exist and `logits` is None, unless
        `return_logits=True` (default: True outside training or without labels); a batch that fits in one chunk takes
        the plain path (the same memory, fewer ops). `return_dict=False` returns the output as a tuple.

        Routing replay (RL): `routed_experts` (B, S, L, K) replays recorded expert choices (see `QwenMoeGBModel`);
        `output_routed_experts=True` returns the experts used as `routed_experts`, in that form."""
        cache = _pop_cache(cache, kwargs)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: QwenMoeGBModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            routed_experts=routed_experts,
            output_routed_experts=output_routed_experts,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = hidden_states[:, slice_indices, :]  # (B, S', D)
        if return_logits is None:  # the chunked loss leaves no logits: only for training with labels by default
            return_logits = not (self.training and labels is not None)
        implementation = self.config.loss_implementation
        fused = labels is not None and not return_logits and implementation != "full"
        fused = fused and not _tensor_parallel(self.lm_head.weight)  # TP's head plan expects logits
        if fused and implementation == "liger" and liger_causal_lm_loss(hidden_states.device) is None:
            implementation = "chunked"
            logger.warning_once(
                "loss_implementation='liger' needs the liger_kernel package and a CUDA device; using the chunked loss"
            )
        chunk_size = loss_chunk_tokens(self.config.loss_chunk_size, self.config.vocab_size)
        if implementation == "chunked":  # one chunk: the plain path (the same memory, fewer ops)
            fused = fused and hidden_states.shape[0] * hidden_states.shape[1] > chunk_size
        logits = None if fused else self.lm_head(hidden_states)  # (B, S', V)

        loss = None
        if fused:
            loss = self.lm_head(hidden_states, labels, implementation, chunk_size=chunk_size, **kwargs)
        elif labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        add_balance = loss is not None and (self.training if add_balance_loss is None else add_balance_loss)
        aux_loss = balance = None  # computed for the loss, or on request (output_router_logits), as in transformers
        if outputs.router_stats is not None and (add_balance or output_router_logits):
            balance, parts = balance_loss(self.config, outputs.router_stats, groups=self.model.expert_groups())
            aux_loss = parts["lbl"]
        if add_balance and balance is not None:
            loss = loss + balance.to(loss.device)
        return QwenMoeGBCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            router_stats=outputs.router_stats,
            balance_loss=balance,
            routed_experts=outputs.routed_experts,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
        )

    def generate(self, *args, output_routed_experts: bool = False, **kwargs):
        """transformers' `generate`. With `output_routed_experts=True` (and `return_dict_in_generate=True`) the output
        is a `QwenMoeGBGenerateOutput` whose `routed_experts` (B, S, L, K) are the experts every position of
        `sequences` used while generating (prompt and new tokens; -1 for the last token, which no step ran), ready for
        `forward(sequences, routed_experts=...)`. Greedy or sampling decoding with a KV cache."""
        if not output_routed_experts:
            return super().generate(*args, **kwargs)
        config = kwargs.get("generation_config") or self.generation_config
        if not kwargs.get("return_dict_in_generate", config.return_dict_in_generate):
            raise ValueError(
                "output_routed_experts=True needs return_dict_in_generate=True: the routing is a field of the output"
            )
        num_beams = kwargs.get("num_beams") or config.num_beams or 1
        if num_beams > 1 or kwargs.get("assistant_model") is not None:
            raise ValueError(
                f"output_routed_experts=True with num_beams={num_beams} or an assistant model: allowed greedy or "
                "sampling decoding (num_beams=1, no assistant model)"
            )
        if kwargs.get("use_cache", config.use_cache) is False:
            raise ValueError("output_routed_experts=True needs use_cache=True (one forward per new token)")
        with RoutingRecorder(self.model) as recorder:
            out = super().generate(*args, **kwargs)
        routed = recorder.sequence_routing(out.sequences.shape[1])  # (B, S, L, K)
        return QwenMoeGBGenerateOutput(**out, routed_experts=routed)


def hub_auto_map() -> dict[str, str]:
    """`auto_map` entries of the Hub code: the base model, which vLLM's and SGLang's Transformers backends build
    (`AutoModel`), and the causal LM (`AutoModelForCausalLM`); `AutoConfig` comes from the config."""
    module = __name__.split(".")[-1]  # `modeling_qwenmoe_gb`, also when loaded as Hub code
    return {
        "AutoModel": f"{module}.{QwenMoeGBModel.__name__}",
        "AutoModelForCausalLM": f"{module}.{QwenMoeGBForCausalLM.__name__}",
    }


# Fused experts are saved in the per-expert Hub layout; without a registered conversion for our class names and
# model type, a re-saved checkpoint would reload with randomly initialised experts.
for _name in ("qwenmoe_gb", "QwenMoeGBForCausalLM", "QwenMoeGBModel"):
    register_checkpoint_conversion_mapping(_name, get_checkpoint_conversion_mapping("qwen2_moe"), overwrite=True)

__all__ = [
    "chunked_linear_cross_entropy",
    "hub_auto_map",
    "QwenMoeGBForCausalLM",
    "QwenMoeGBGenerateOutput",
    "QwenMoeGBModel",
    "RoutingRecorder",
    "check_routed_experts",
    "QwenMoeGBPreTrainedModel",
    "RouterStats",
    "margin_bin_range",
    "layer_quantile_statistics",
    "margin_histogram",
    "micro_batch_quantile",
    "quantile_statistics",
    "routing_margins",
    "balance_loss",
    "device_balance_loss",
    "group_sequences",
    "router_statistics",
    "router_z_loss",
    "switch_balance_loss",
]
