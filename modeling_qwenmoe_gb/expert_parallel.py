"""Expert parallel on transformers' engine: what the all-to-all actually delivers to each rank.

Features
- `COUNTED_ALL_TO_ALL` (`"qwenmoe_gb_all_to_all"`): transformers' `AllToAllEP` token dispatch, registered in
  `EPImplementationInterface` under its own name, which also counts, per local expert, the (token, expert) pairs the
  all-to-all delivered to this rank in training (`experts.delivered_counts`, int64). `qwenmoe-gb pretrain --ep_size N`
  selects it; elsewhere pass `DistributedConfig(ep_size=N, ep_implementation=COUNTED_ALL_TO_ALL)`.
- `delivered_counts(model)`: the (L, E) counts delivered to every expert since the last reset, summed over all ranks
  (one all-reduce), or None when the model does not count; `sent_off_rank(model)`: the shares of the rows each
  layer's all-to-all sent to another rank and of the tokens that reached another rank (what device-limited routing
  bounds); `reset_delivered_counts(model)`.

The balancer compares these with the router's global counts: the device-level MaxVio measured from the all-to-all
(`balance/maxvio_device_delivered`) against the one computed from the counts (`balance/maxvio_device`).
"""

import torch
import torch.distributed as dist
from torch import nn
from transformers.distributed.expert_parallel import AllToAllEP, EPImplementationInterface

COUNTED_ALL_TO_ALL = "qwenmoe_gb_all_to_all"


class CountingAllToAllEP(AllToAllEP):
    """transformers' all-to-all dispatch; in training it adds the rows each local expert received to
    `experts.delivered_counts` (num_local_experts,) and records the block offset (`experts.delivered_offset`)."""

    def __init__(self, experts: nn.Module, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        experts.delivered_counts = torch.zeros(self.num_local_experts, dtype=torch.long)
        experts.delivered_offset = ep_mesh.get_local_rank() * self.num_local_experts
        # sent in training: [(token, expert) rows, rows to another rank, tokens, tokens with a row to another rank]
        experts.sent_rows = torch.zeros(4, dtype=torch.long)
        self.ep_rank = ep_mesh.get_local_rank()
        self.experts = experts

    def _dispatch_tokens(self, hidden_states, top_k_index, top_k_weights):
        tokens, expert_ids, weights, state = super()._dispatch_tokens(hidden_states, top_k_index, top_k_weights)
        if torch.is_grad_enabled():  # training forwards only, as the balancer counts
            received = torch.bincount(expert_ids.view(-1), minlength=self.num_local_experts)  # (local E,)
            counts = self.experts.delivered_counts
            self.experts.delivered_counts = counts.to(received.device) + received
            sizes = state.send_sizes  # host ints the dispatch already read back
            owner = top_k_index // self.num_local_experts  # (T, K): the EP rank of each chosen expert
            away = (owner != self.ep_rank).any(-1).sum().view(1)  # tokens with a row to another rank (no host sync)
            rows = torch.tensor([sum(sizes), sum(sizes) - sizes[self.ep_rank], owner.shape[0]], device=away.device)
            sent = torch.cat([rows, away])  # (4,)
            self.experts.sent_rows = self.experts.sent_rows.to(sent.device) + sent
        return tokens, expert_ids, weights, state


EPImplementationInterface.register(COUNTED_ALL_TO_ALL, CountingAllToAllEP)


def _counting_experts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "delivered_counts") and hasattr(m, "delivered_offset")]


@torch.no_grad()
def delivered_counts(model: nn.Module, num_experts: int) -> torch.Tensor | None:
    """(L, E) int64: the (token, expert) pairs the all-to-all delivered to each expert of each MoE layer since the last
    reset, summed over every rank (each pair is delivered once), or None without `CountingAllToAllEP`."""
    experts = _counting_experts(model)
    if not experts:
        return None
    device = experts[0].delivered_counts.device
    counts = torch.zeros(len(experts), num_experts, dtype=torch.long, device=device)  # (L, E)
    for layer, module in enumerate(experts):
        local = module.delivered_counts
        counts[layer, module.delivered_offset : module.delivered_offset + local.numel()] = local
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return counts


@torch.no_grad()
def sent_off_rank(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per MoE layer since the last reset, over every rank (one all-reduce), as (L,) float64 shares: the (token,
    expert) rows the all-to-all sent to another rank, and the tokens with at least one row sent to another rank
    (what device-limited routing bounds; transformers' dispatch sends one row per pair, so its row volume is not
    deduplicated per rank). None without `CountingAllToAllEP`."""
    experts = _counting_experts(model)
    if not experts:
        return None
    sent = torch.stack([module.sent_rows for module in experts])  # (L, 4)
    if dist.is_initialized() and dist.get_world_size() > 1:
        sent = sent.to(experts[0].delivered_counts.device)
        dist.all_reduce(sent)
    sent = sent.double().cpu()
    return sent[:, 1] / sent[:, 0].clamp_min(1), sent[:, 3] / sent[:, 2].clamp_min(1)


def reset_delivered_counts(model: nn.Module) -> None:
    for module in _counting_experts(model):
        module.delivered_counts = torch.zeros_like(module.delivered_counts)
        module.sent_rows = torch.zeros_like(module.sent_rows)


__all__ = ["COUNTED_ALL_TO_ALL", "CountingAllToAllEP", "delivered_counts", "reset_delivered_counts", "sent_off_rank"]
