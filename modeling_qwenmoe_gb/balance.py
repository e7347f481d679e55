"""Global-batch load balancing for any training loop (Qiu et al. 2025, Algorithm 1).

Features
- `GlobalBalancer(model)`: turns one micro-step's `router_stats` into the configured balance loss. For
  `balance_scope="global"`, f comes from the expert counts all-reduced over the data-parallel group (ONE collective per
  micro-step: all layers' counts stacked into an (L, E) int64 tensor) and summed over the micro-steps of the current
  optimizer step so far, kept in the model's `step_expert_counts` buffer; P stays local.
- Counting happens only when the model is training and grad is enabled: eval never touches the buffer, and gradient
  checkpointing cannot count twice (statistics are forward outputs, not side effects of the recompute).
- `GlobalBalancer.step()`, called once per optimizer step after the last micro-step and before `optimizer.step()`:
  updates the aux-free biases from the step's global statistics (identical on every rank) and resets the buffer:
  `aux_free_method="sign"`: `b += u · sign(mean(c) − c)` per layer from the counts; `"quantile"`: Quantile Balancing
  (`modeling_qwenmoe_gb.quantile`), the bias solved from the step's margin histograms (or the mean of the
  micro-batches' quantiles), pooled over the micro-steps and the ranks in one all-reduce at the step.
  `register_step_hook(optimizer)` does that as an optimizer step pre-hook.
- Any transformers MoE, trained as it is (Qwen2/3-MoE, OLMoE, Mixtral, GPT-OSS, DeepSeek-V3, GLM-4.5, ...): the
  balancer reads it through `any_moe.StockMoE` (forward hooks giving the same `RouterStats`), with the balance options
  given to the balancer (`GlobalBalancer(model, balance_scope="global", router_aux_loss_coef=0.01, aux_free=True)`);
  aux-free updates the model's own `e_score_correction_bias`.
- Sub-groups of a given size (`sync_group_size`) emulate "synchronise within a node" for a balance-BSZ sweep.
- Metrics per optimizer step (per layer and mean): global and micro LBL, MaxVio global and micro (micro = the micro
  scope's groups: chunks of `balance_group_size` sequences or the micro-batch), z-loss, bias spread (aux-free),
  with Quantile Balancing `qb_maxvio_after` (the step's tokens at the new bias, α held) and `qb_bin_width`, and
  MaxVio over devices: `maxvio_device` from the global counts (devices = the expert-parallel ranks of a model
  sharded with EP, else the virtual groups of `device_balance_groups`) and, under EP with `CountingAllToAllEP`,
  `maxvio_device_delivered` from what the all-to-all delivered; dead experts: `dead_experts` (experts that served no
  token in an optimizer step, all ranks and micro-steps, per layer and in total, averaged over the steps) and
  `dead_experts_window` (no token over the last `dead_expert_window` steps, as of the last step); with capacity,
  `dropped_fraction` (the share of the top-k selections dropped, per micro-step); under EP with `CountingAllToAllEP`,
  `sent_off_rank` (the share of the (token, expert) rows the all-to-all sent to another rank) and `tokens_off_rank`
  (the share of tokens with a row sent to another rank).

Loss-scale rule (the same for every scope): the objective of one optimizer step is the mean, over data-parallel
ranks × accumulation micro-steps, of the per-micro-batch balance loss. The loss a micro-step returns is therefore a
per-micro-batch mean; the loop divides it by the number of accumulation steps and DDP averages the gradients over
ranks. At a fixed global batch the router gradient does not depend on how the batch is split.
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils.logging import get_logger

from .any_moe import BALANCE_OPTIONS, StockMoE
from .configuration_qwenmoe_gb import uses_quantile_balancing
from .expert_parallel import delivered_counts, reset_delivered_counts, sent_off_rank
from .modeling_qwenmoe_gb import (
    RouterStats,
    balance_loss,
    group_matrix,
    group_sequences,
    micro_group_size,
    per_group_lbl,
)
from .quantile import QuantileState

logger = get_logger(__name__)


def find_moe_model(model: nn.Module) -> nn.Module | None:
    """The `QwenMoeGBModel` inside a model (through DDP / FSDP / PEFT / accelerate wrappers, or Hub remote code), or
    None for any other model."""
    return next((m for m in model.modules() if type(m).__name__ == "QwenMoeGBModel"), None)


class QwenMoeGBLayers:
    """What the balancer reads of a QwenMoE-GB model: its `QwenMoeGBModel` (config, step buffer, expert groups, the
    routers' aux-free biases); the statistics come out of the forward (`outputs.router_stats`). The same interface as
    `any_moe.StockMoE` for other transformers MoEs."""

    native = True  # the model adds the micro-scope losses itself unless told not to (`add_balance_loss=False`)

    def __init__(self, moe_model: nn.Module, **balance_options):
        self.moe_model, self.config = moe_model, moe_model.config
        unknown = set(balance_options) - set(BALANCE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown balance options {sorted(unknown)}: allowed {list(BALANCE_OPTIONS)}")
        given = {k: v for k, v in balance_options.items() if v is not None}
        if given:  # the model's config is the one place the options live: set them there, checked
            for name, value in given.items():
                setattr(self.config, name, value)
            self.config.validate_balance()

    @property
    def training(self) -> bool:
        return self.moe_model.training

    @property
    def step_expert_counts(self) -> torch.Tensor:
        return self.moe_model.step_expert_counts

    def expert_groups(self) -> list[list[int]] | None:
        return self.moe_model.expert_groups()

    def expert_parallel_groups(self) -> list[list[int]]:
        return self.moe_model.expert_parallel_groups()

    def biases(self) -> list[torch.Tensor]:
        return [router.expert_bias for router in self.moe_model.moe_routers()]

    def router_stats(self, outputs) -> RouterStats | None:
        return getattr(outputs, "router_stats", None)


def moe_layers(model: nn.Module, **balance_options) -> QwenMoeGBLayers | StockMoE:
    """The balancer's view of `model`: a QwenMoE-GB model (`QwenMoeGBLayers`) or any other transformers MoE whose
    router and experts fit (`any_moe.StockMoE`); `ValueError` naming the class of a model that is neither."""
    moe_model = find_moe_model(model)
    if moe_model is not None:
        return QwenMoeGBLayers(moe_model, **balance_options)
    return StockMoE(model, **balance_options)


def data_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The ranks that hold distinct data, for a model loaded with transformers' `distributed_config`: the
    data-parallel dims (dp_replicate × fsdp) of its device mesh. Ranks of one tensor-parallel group share a batch and
    must count it once. None (the whole world) for a model without a mesh, or when the data-parallel ranks are all."""
    manager = next((m._mesh_manager for m in model.modules() if getattr(m, "_mesh_manager", None) is not None), None)
    if manager is None:
        return None
    mesh = manager.get_mesh(("dp_replicate", "fsdp"))  # dense view: (pp, dp_replicate, fsdp, tp)
    if mesh.size() == dist.get_world_size():
        return None
    return mesh._flatten().get_group()  # one flat group per (pp, tp) coordinate


def device_groups(moe_model) -> list[list[int]] | None:
    """The devices whose load `maxvio_device` measures: the expert-parallel ranks of a model sharded with EP (the
    experts each holds), else the virtual groups of `device_balance_groups`; None when there is one device.
    `moe_model`: a `QwenMoeGBModel` or the balancer's view of a model (`moe_layers`)."""
    groups = moe_model.expert_parallel_groups()
    if len(groups) == 1 and moe_model.config.device_balance_groups is not None:
        groups = moe_model.expert_groups()
    return groups if len(groups) > 1 else None


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load − mean load) / mean load per layer, counts (..., E) -> (...)."""
    counts = counts.double()
    mean = counts.mean(-1).clamp_min(1e-12)
    return (counts.amax(-1) - mean) / mean


def per_layer_lbl(counts: torch.Tensor, stats: RouterStats) -> torch.Tensor:
    """E · Σ_i f_i P_i per layer (L,), no grad (a metric). `counts` (L, G, E) and `stats` grouped the same way
    (G sequence groups, averaged), or `counts` (L, E) against the whole micro-batch."""
    if counts.dim() == 2:
        counts, stats = counts[:, None], group_sequences(stats, None)
    return per_group_lbl(counts, stats.prob_sums.detach(), stats.num_tokens).mean(-1)  # (L, G) -> (L,)


class GlobalBalancer:
    """Balance loss of one micro-step from the model's `router_stats`, usable from any loop.

    Args:
        model: the (possibly wrapped: DDP, FSDP, PEFT) QwenMoE-GB model, or any transformers MoE whose router and
            experts fit (`any_moe.find_moe_layers`), trained as it is.
        group: the data-parallel process group to all-reduce over (default: the data-parallel ranks of a model loaded
            with transformers' `distributed_config` (`data_parallel_group`), else the whole world when
            `torch.distributed` is initialised; no communication otherwise).
        sync_group_size: all-reduce only within consecutive groups of this many ranks (a balance-BSZ between micro and
            global); must divide the world size.
        bias_update: `"global"` (default): aux-free biases move once per optimizer step from the step's global counts;
            `"micro"`: after every micro-batch from its local counts (the baseline the global update is compared to).
        max_pending: micro-steps whose metrics may wait for `pop_metrics` before they are computed (memory bound).
        dead_expert_window: optimizer steps over which `dead_experts_window` looks for experts that served no token.
        **balance_options: `balance_scope`, `router_aux_loss_coef`, `balance_group_size`, `micro_balance_coef`,
            `device_balance_groups`, `device_balance_coef`, `router_z_loss_coef`, `aux_free`,
            `aux_free_bias_update_rate` (the names and meaning of `QwenMoeGBConfig`'s fields; `router_scoring_func` too
            for other models). A QwenMoE-GB model's config holds them (given ones are set there); for another model
            they are the balancer's own (`self.config`, an `any_moe.BalanceConfig`), defaulting to the model's
            `router_aux_loss_coef` in our units.
        compile: put the balance loss (`balance_loss`, forward and backward) through `torch.compile`, as one graph of a
            few fused kernels instead of about 25 small eager ops; for a compiled model (the Trainer sets it from
            `TrainingArguments.torch_compile`). The all-reduce and the buffer updates stay eager.
    """

    def __init__(
        self,
        model: nn.Module,
        group: dist.ProcessGroup | None = None,
        sync_group_size: int | None = None,
        bias_update: str = "global",
        max_pending: int = 64,
        compile: bool = False,
        dead_expert_window: int = 100,
        **balance_options,
    ):
        if isinstance(dead_expert_window, bool) or not isinstance(dead_expert_window, int) or dead_expert_window < 1:
            raise ValueError(f"dead_expert_window={dead_expert_window!r} is not allowed: an integer >= 1 is required")
        self._window: deque[list[torch.Tensor]] = deque(maxlen=dead_expert_window)  # the last steps' increments
        if bias_update not in ("global", "micro"):
            raise ValueError(f"bias_update={bias_update!r} is unknown: allowed ['global', 'micro']")
        self.bias_update = bias_update
        self.max_pending = max_pending
        self._loss = torch.compile(self._balance_loss, fullgraph=True) if compile else self._balance_loss
        self.moe_model = moe_layers(model, **balance_options)
        self.config = self.moe_model.config
        self.quantile = QuantileState(self.config)
        if self.quantile_balancing:
            check_quantile_balancing(self.config, bias_update)
        self.model = model
        self.groups = self.moe_model.expert_groups()
        self.device_groups = device_groups(self.moe_model)
        self._device_matrix: torch.Tensor | None = None  # (E, D) 0/1, built at the first optimizer step
        self.last_delivered_counts: torch.Tensor | None = None
        self.group = group if group is not None else data_parallel_group(model)
        if sync_group_size is not None:
            world = dist.get_world_size() if dist.is_initialized() else 1
            if sync_group_size < 1 or world % sync_group_size:
                raise ValueError(f"sync_group_size={sync_group_size} must be a positive divisor of world size {world}")
            if dist.is_initialized():
                self.group, _ = dist.new_subgroups(group_size=sync_group_size)
        self._sums: dict[str, torch.Tensor] = defaultdict(lambda: 0)  # metric sums, on the model's device
        # The all-reduced (L, E) counts each micro-step added to the step buffer, in order: fresh tensors, never
        # mutated, so the metrics can refer to them instead of copying the buffer (their sums are taken when read).
        self._increments: list[torch.Tensor] = []
        self._last_step: list[torch.Tensor] = []  # the increments of the last optimizer step
        self._pending: list[tuple[RouterStats, list[torch.Tensor]]] = []  # micro-steps whose metrics wait
        self._pending_steps: list[list[torch.Tensor]] = []  # the increments of optimizer steps whose metrics wait
        self._micro_steps = 0
        self._steps = 0
        self._counted = False  # counts were added to the buffer since the last optimizer step

    # ----------------------------------------------------------------- per micro-step
    @property
    def step_counts(self) -> torch.Tensor:
        """(L, E) int64 counts of the current optimizer step so far (all-reduced, buffered)."""
        return self.moe_model.step_expert_counts

    def router_stats(self, outputs) -> RouterStats | None:
        """The router statistics of the forward that returned `outputs`: `outputs.router_stats` of a QwenMoE-GB
        model, the hooks' record of the last forward for any other MoE."""
        return self.moe_model.router_stats(outputs)

    def _world(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def accumulate(self, stats: RouterStats) -> torch.Tensor:
        """All-reduce this micro-step's (L, E) counts once and add them to the step buffer; returns the buffer."""
        counts = stats.counts.sum(1).to(torch.long)  # (L, B, E) -> (L, E); fp32 sums of 0/1 are exact below 2^24
        if self._world() > 1:
            dist.all_reduce(counts, group=self.group)
        buffer = self.step_counts
        buffer.add_(counts.to(buffer.device))
        self._increments.append(counts)
        self._counted = True
        return buffer

    def __call__(self, stats: RouterStats | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted balance loss (per-micro-batch mean scale) and its unweighted parts for one micro-step."""
        if stats is None:
            return torch.zeros(()), {}
        counting = self.moe_model.training and torch.is_grad_enabled()
        global_counts = self.accumulate(stats) if counting else None
        use_global = self.config.balance_scope == "global" and global_counts is not None
        loss, parts = self._loss(stats, global_counts if use_global else None)
        if counting:
            self._record(stats)
            if self.quantile_balancing:
                self.quantile.observe(stats)
            elif self.config.aux_free and self.bias_update == "micro":
                self._update_biases(stats.counts.detach().sum(1))
        return loss, parts

    @property
    def quantile_balancing(self) -> bool:
        return uses_quantile_balancing(self.config)

    def _balance_loss(
        self, stats: RouterStats, global_counts: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return balance_loss(self.config, stats, global_counts, self.groups)

    @torch.no_grad()
    def _update_biases(self, counts: torch.Tensor) -> None:
        """b += u · sign(mean(c) − c) per layer from (L, E) counts."""
        rate = self.config.aux_free_bias_update_rate
        for bias, layer_counts in zip(self.moe_model.biases(), counts.double()):
            delta = torch.sign(layer_counts.mean() - layer_counts) * rate  # (E,)
            bias.add_(delta.to(bias))

    def _record(self, stats: RouterStats) -> None:
        """Keep this micro-step's detached statistics and the increments of the step so far (whose sum is the buffer
        its loss saw); the metrics are computed in one batch when they are read (`pop_metrics`): a micro-step adds no
        op and no host sync."""
        fields = (stats.counts, stats.prob_sums, stats.num_tokens, stats.z_sums)
        detached = RouterStats(*(x.detach() if x.requires_grad else x for x in fields))
        self._pending.append((detached, list(self._increments)))
        self._micro_steps += 1
        if len(self._pending) >= self.max_pending:  # bound the memory when metrics are rarely read
            self._fold_pending()

    @torch.no_grad()
    def _fold_pending(self) -> None:
        """Per-layer metrics of the pending optimizer steps ((M, L, E) counts: MaxVio) and micro-steps, computed
        together for each shape: (M, L, B, E) stacks viewed as (M·L, B, E) so the grouping and the losses run once for
        all M micro-steps."""
        size = micro_group_size(self.config)
        if self._pending_steps:  # (M, L, E): MaxVio of the optimizer steps, globally and over devices
            counts = torch.stack([_total(step) for step in self._pending_steps]).double()
            self._pending_steps = []
            self._add("maxvio_global", max_violation(counts).sum(0))
            self._add("dead_experts", (counts == 0).sum(-1).double().sum(0))  # (L,) summed over the M steps
            if self.device_groups is not None:
                if self._device_matrix is None:
                    self._device_matrix = group_matrix(self.device_groups, self.config.num_experts, counts)  # (E, D)
                self._add("maxvio_device", max_violation(counts @ self._device_matrix).sum(0))
        by_shape: dict[tuple[int, ...], list[tuple[RouterStats, torch.Tensor]]] = defaultdict(list)
        for entry in self._pending:
            by_shape[tuple(entry[0].counts.shape)].append(entry)
        self._pending = []
        for entries in by_shape.values():
            m = len(entries)
            fields = zip(*((e[0].counts, e[0].prob_sums, e[0].num_tokens, e[0].z_sums) for e in entries))
            stats = RouterStats(*(torch.stack(x).flatten(0, 1) for x in fields))  # (M·L, B, ·)
            global_counts = torch.stack([_total(e[1]) for e in entries]).flatten(0, 1)  # (M·L, E): what f saw
            micro = group_sequences(stats, size)  # (M·L, G, E): the micro-scope groups
            z = stats.z_sums.sum(-1) / stats.num_tokens.sum(-1).clamp_min(1.0)  # (M·L,) z-loss per layer
            self._add("micro_lbl", _sum_steps(per_layer_lbl(micro.counts, micro), m))
            self._add("global_lbl", _sum_steps(per_layer_lbl(global_counts, stats), m))
            self._add("maxvio_micro", _sum_steps(max_violation(micro.counts).mean(-1), m))
            self._add("z_loss", _sum_steps(z.double(), m).mean())
            if getattr(self.config, "expert_capacity_factor", None) is not None:  # selections dropped over capacity
                routed = self.config.num_experts_per_tok * stats.num_tokens.sum(-1)  # (M·L,)
                self._add("dropped_fraction", _sum_steps((1 - stats.counts.sum((-1, -2)) / routed).double(), m))

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = self._sums[name] + value

    # ----------------------------------------------------------------- per optimizer step
    @torch.no_grad()
    def step(self) -> None:
        """At the optimizer step: update aux-free biases from the step's global counts, then reset the buffer.
        No host sync, and no metric work: the step's increments wait for `pop_metrics`, which computes the MaxVio of
        all the steps since the last read at once. Without aux-free routing this is one op (the reset)."""
        if not self._counted:
            return
        counts = self.step_counts
        self._last_step, self._increments = self._increments, []
        self._pending_steps.append(self._last_step)
        self._window.append(self._last_step)
        if self.device_groups is not None:
            delivered = delivered_counts(self.model, self.config.num_experts)  # (L, E), summed over ranks
            if delivered is not None:
                if self._device_matrix is None:
                    self._device_matrix = group_matrix(self.device_groups, self.config.num_experts, delivered.double())
                self.last_delivered_counts = delivered
                self._add("maxvio_device_delivered", max_violation(delivered.double() @ self._device_matrix))
                rows, tokens = sent_off_rank(self.model)
                self._add("sent_off_rank", rows.to(delivered.device))
                self._add("tokens_off_rank", tokens.to(delivered.device))
                reset_delivered_counts(self.model)
        if self.quantile_balancing:
            for name, value in self.quantile.update(self.moe_model.biases(), self.group).items():
                self._add(name, value)
        elif self.config.aux_free and self.bias_update == "global":
            self._update_biases(counts)
        if self.config.aux_free:  # the bias moves the selection only with aux-free routing
            bias = torch.stack(self.moe_model.biases())  # (L, E)
            self._add("bias_spread", (bias.amax(-1) - bias.amin(-1)).double())
        counts.zero_()
        self._counted = False
        self._steps += 1
        if len(self._pending_steps) >= self.max_pending:
            self._fold_pending()

    @property
    def last_step_counts(self) -> torch.Tensor | None:
        """(L, E) int64 expert selections of the last optimizer step, summed over its micro-steps and the ranks."""
        return _total(self._last_step) if self._last_step else None

    @property
    def last_step_load(self) -> torch.Tensor | None:
        """(L, E) share of the selections that went to each expert in the last optimizer step (CPU, float64)."""
        if not self._last_step:
            return None
        counts = self.last_step_counts.double().cpu()
        return counts / counts.sum(-1, keepdim=True).clamp_min(1)

    def register_step_hook(self, optimizer: torch.optim.Optimizer):
        """Call `step()` before every `optimizer.step()` (a plain loop's alternative to the Trainer callback)."""
        return optimizer.register_step_pre_hook(lambda *_: self.step())

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """What a resumed run needs to log the same metrics: the sums since the last `pop_metrics`, the micro-step and
        step counters, the last step's load. (The step buffer and the aux-free biases are model buffers.)"""
        self._fold_pending()
        sums = {k: torch.as_tensor(v).detach().cpu() for k, v in self._sums.items()}
        last = self.last_step_counts.cpu() if self._last_step else None
        window = [_total(step).cpu() for step in self._window]
        return {
            "sums": sums, "micro_steps": self._micro_steps, "steps": self._steps, "last_step_counts": last,
            "window_counts": window,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        device = self.step_counts.device
        self._pending, self._pending_steps, self._increments = [], [], []
        self._sums = defaultdict(lambda: 0, {k: v.to(device) for k, v in state["sums"].items()})
        self._micro_steps, self._steps = state["micro_steps"], state["steps"]
        last = state["last_step_counts"]
        self._last_step = [] if last is None else [last.to(device)]
        self._window.clear()
        self._window.extend([counts.to(device)] for counts in state.get("window_counts", []))

    # ----------------------------------------------------------------- metrics
    def pop_metrics(self, reduce: bool = True) -> dict[str, float]:
        """Metrics averaged since the last call (per layer and mean); micro metrics averaged over ranks too."""
        if self._micro_steps == 0:
            return {}
        self._fold_pending()
        names = sorted(self._sums)
        per_micro = {"micro_lbl", "global_lbl", "maxvio_micro", "z_loss", "dropped_fraction"}
        rows = []
        for name in names:
            value = torch.as_tensor(self._sums[name], dtype=torch.float64).cpu().reshape(-1)
            rows.append(value / (self._micro_steps if name in per_micro else max(self._steps, 1)))
        sizes = [len(r) for r in rows]
        flat = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64)
        if reduce and dist.is_initialized() and dist.get_world_size() > 1:
            flat = flat.to(_comm_device())
            dist.all_reduce(flat)
            flat = flat.cpu() / dist.get_world_size()
        self._sums.clear()
        self._micro_steps = self._steps = 0
        if self._window:  # experts without a token in the window, as of the last step (the same on every rank)
            names.append("dead_experts_window")
            window = torch.stack([_total(step) for step in self._window]).sum(0)  # (L, E)
            per_layer = (window == 0).sum(-1).double().cpu()  # (L,)
            sizes.append(len(per_layer))
            flat = torch.cat([flat, per_layer])
        metrics: dict[str, float] = {}
        for name, values in zip(names, flat.split(sizes)):
            summed = name in ("dead_experts", "dead_experts_window")  # a count: the total over the layers
            metrics[f"balance/{name}"] = float(values.sum() if summed else values.mean())
            if len(values) > 1:
                metrics.update({f"balance/{name}/layer_{i}": float(v) for i, v in enumerate(values)})
        return metrics


def check_quantile_balancing(config, bias_update: str = "global") -> None:
    """Quantile Balancing's settings against the rest: `ValueError` for a per-micro-batch bias update (QB's
    micro-batch form is `quantile_scope="micro_mean"`), a warning for a balance loss next to it."""
    if bias_update != "global":
        raise ValueError(
            f"bias_update={bias_update!r} with aux_free_method='quantile' is not allowed: QB sets the bias once per "
            "optimizer step; its per-micro-batch form is quantile_scope='micro_mean' (allowed bias_update='global')"
        )
    coefs = {n: getattr(config, n, 0.0) for n in ("router_aux_loss_coef", "micro_balance_coef", "device_balance_coef")}
    if coefs["device_balance_coef"] and getattr(config, "device_balance_groups", None) is None:
        coefs["device_balance_coef"] = 0.0  # off without groups
    active = {n: v for n, v in coefs.items() if v}
    if active:
        logger.warning(
            "aux_free_method='quantile' with %s: QB balances the selection by itself each step (Megatron-Core "
            "requires moe_aux_loss_coeff=0); a balance loss next to it only moves the router's scores. Keep it small "
            "(the study's QB + sequence-wise arm uses 1e-4 at balance_scope='sequence') or 0",
            ", ".join(f"{n}={v}" for n, v in active.items()),
        )


def _total(increments: list[torch.Tensor]) -> torch.Tensor:
    """(L, E) sum of a step's (L, E) count increments."""
    return increments[0] if len(increments) == 1 else torch.stack(increments).sum(0)


def _sum_steps(x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(M·L,) per-layer values of M micro-steps -> (L,) summed over the micro-steps."""
    return x.view(num_steps, -1).sum(0)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = [
    "GlobalBalancer",
    "check_quantile_balancing",
    "QwenMoeGBLayers",
    "moe_layers",
    "data_parallel_group",
    "device_groups",
    "find_moe_model",
    "max_violation",
    "per_layer_lbl",
]
