"""Global-batch balance for any transformers MoE, trained as it is: Qwen2/3-MoE, OLMoE, Mixtral, GPT-OSS, DeepSeek-V3,
GLM-4.5, ERNIE-4.5, dots1, MiniMax-M2, ... (every model whose router and experts fit, see `find_moe_layers`).

Features
- `find_moe_layers(model)`: the MoE layers of a transformers model, found from its own classes, not from a list of
  names: the module its `_can_record_outputs["router_logits"]` records (the router, or the MoE block), paired with
  the experts module of the same block (a class decorated with transformers' `use_experts_implementation`, called as
  `experts(hidden_states, top_k_index, top_k_weights)`: the experts the model chose, after its own bias, group limits
  and normalisation). A model without them is refused, naming its class.
- `StockMoE(model, **balance_options)`: forward hooks that turn every training forward into the `RouterStats` a
  QwenMoE-GB model emits, (L, B, E): counts from the experts' `top_k_index`; differentiable probability sums from the
  router's output with the model's own scoring (softmax, or sigmoid normalised over the experts as DeepSeek-V3's
  sequence-wise loss does), read once from the autograd graph of the gate weights the model computed; z-loss sums;
  padding excluded through the 2-D attention mask. Each layer is reduced to (B, E) in its hook: no router logits are
  kept as outputs (what autograd keeps for P's gradient is one (T, E) softmax per layer, dropped under gradient
  checkpointing).
- Counted once under gradient checkpointing: statistics are recorded only while the base model's own forward runs;
  the recomputation in backward repeats the same ops (so the checkpoint sees the same saved tensors) and records
  nothing. Reentrant checkpointing, which runs the layers without grad, is refused with the fix in the message.
- The aux-free bias of DeepSeek-V3-style routers (`e_score_correction_bias`, on the router or any module of its MoE
  block), which transformers never updates, for the balancer's once-per-step update; the checkpoint keeps it under
  its own name.
- `BalanceConfig`: the balance options, with the names and the validation of `QwenMoeGBConfig`.
- Quantile Balancing (`aux_free_method="quantile"`) for routers with an `e_score_correction_bias` added to their
  scores: each layer's margin histogram (and micro-batch quantile) is computed in its hook from the scores and the
  bias, as the QwenMoE-GB forward does; group-limited routing (`n_group > 1`, `topk_group < n_group`) is refused.
- The model's own aux loss is switched off (`output_router_logits=False`), with a log line: the balancer adds the loss.

Shape legend: B batch, S sequence, T = B·S tokens, E experts, K top-k, L MoE layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations import use_experts_implementation
from transformers.utils.logging import get_logger

from .configuration_qwenmoe_gb import (
    ROUTER_SCORING_FUNCS,
    expert_partition,
    uses_quantile_balancing,
    validate_balance_fields,
)
from .modeling_qwenmoe_gb import RouterStats, layer_quantile_statistics, router_statistics, token_mask_from

logger = get_logger(__name__)

BIAS_NAME = "e_score_correction_bias"  # DeepSeek-V3's aux-free selection bias, as transformers names it
COUNTS_BUFFER = "step_expert_counts"  # the balancer's step buffer, registered on the base model (not saved)
# autograd nodes of the two scoring functions, and nodes that only change dtype or shape
_SCORING_NODES = {"SoftmaxBackward0": "softmax", "LogSoftmaxBackward0": "softmax", "SigmoidBackward0": "sigmoid"}
_PASS_THROUGH = {"ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0"}
_MATMUL_NODES = {"MmBackward0", "AddmmBackward0", "BmmBackward0", "LinearBackward0", "MatmulBackward0"}


@dataclass
class BalanceConfig:
    """The balance options of a model that is not a QwenMoE-GB model: the fields of `QwenMoeGBConfig` with the same
    names and meaning (see its docstring), validated the same way, plus `router_scoring_func`: `None` (the model's own
    scoring, read from its graph) or `"softmax"` / `"sigmoid"` to state it."""

    num_experts: int
    num_experts_per_tok: int
    balance_scope: str = "global"
    router_aux_loss_coef: float = 0.001
    balance_group_size: int | None = None
    micro_balance_coef: float = 0.0
    device_balance_groups: int | list | str | None = None
    device_balance_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    aux_free: bool = False
    aux_free_bias_update_rate: float = 0.001
    aux_free_method: str = "sign"
    quantile_scope: str = "global"
    quantile_bins: int = 1000
    quantile_ema: float = 0.0
    router_scoring_func: str | None = None

    def __post_init__(self):
        self.validate_balance()

    def validate_balance(self) -> None:
        validate_balance_fields(self)
        if self.router_scoring_func is not None and self.router_scoring_func not in ROUTER_SCORING_FUNCS:
            raise ValueError(
                f"router_scoring_func={self.router_scoring_func!r} is unknown: allowed None (the model's own) or "
                f"{list(ROUTER_SCORING_FUNCS)}"
            )

    def expert_groups(self) -> list[list[int]] | None:
        return expert_partition(self.device_balance_groups, self.num_experts)


SHAPE_FIELDS = ("num_experts", "num_experts_per_tok")  # read from the model
BALANCE_OPTIONS = tuple(n for n in BalanceConfig.__dataclass_fields__ if n not in SHAPE_FIELDS)  # given by the user


# --------------------------------------------------------------------------------------------- finding the layers


def _experts_forward_code():
    """The code object of the forward that `use_experts_implementation` gives a class (the same for every class)."""

    class Probe(nn.Module):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    return use_experts_implementation(Probe).forward.__code__


_EXPERTS_FORWARD = _experts_forward_code()


def is_experts_module(module: nn.Module) -> bool:
    """The module's class goes through transformers' experts interface (`@use_experts_implementation`)."""
    forward = getattr(type(module), "forward", None)
    return getattr(forward, "__code__", None) is _EXPERTS_FORWARD


@dataclass
class MoELayer:
    """One MoE block of a transformers model: where its router output and its experts' inputs are read."""

    block: str  # qualified name of the block (the experts' nearest ancestor that holds the router)
    routers: list[nn.Module]  # the recorded module(s): the router (a PEFT `modules_to_save` copy too), or the block
    index: int  # which output of the router is `router_logits`
    experts: nn.Module
    bias_owner: nn.Module | None = None  # the module holding `e_score_correction_bias`, if any

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.bias_owner is None else getattr(self.bias_owner, BIAS_NAME)


def base_model_of(model: nn.Module) -> PreTrainedModel:
    """The innermost transformers model that records `router_logits` (through DDP / FSDP / PEFT wrappers): its forward
    runs every MoE layer once per call."""
    found = [
        m
        for m in model.modules()
        if isinstance(m, PreTrainedModel) and "router_logits" in (getattr(m, "_can_record_outputs", None) or {})
    ]
    if not found:
        raise ValueError(
            f"model={type(model).__name__} is not a transformers MoE the balancer can read: no model in it records "
            "router_logits (`_can_record_outputs`); allowed QwenMoE-GB models and transformers MoE models whose "
            "router is recorded for router_logits and whose experts use transformers' experts interface"
        )
    return min(found, key=lambda m: sum(1 for _ in m.modules()))


def _recorded(spec) -> tuple[type | None, str | None, int, str | None]:
    """(class, class-name suffix, output index, layer name) of a `_can_record_outputs` entry (a class or an
    `OutputRecorder`)."""
    if isinstance(spec, type):
        return spec, None, 0, None
    index = getattr(spec, "index", 0)
    return (
        getattr(spec, "target_class", None),
        getattr(spec, "class_name", None),
        0 if index is None else index,
        (getattr(spec, "layer_name", None)),
    )


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of `model` in module order, each its recorded router paired with the experts module of the same
    block; `ValueError` naming the model's class when it has no such pair, or a router without experts."""
    base = base_model_of(model)
    target, suffix, index, layer_name = _recorded(base._can_record_outputs["router_logits"])

    def is_router(name: str, module: nn.Module) -> bool:
        hit = isinstance(module, target) if target is not None else type(module).__name__.endswith(suffix or "\0")
        return hit and (layer_name is None or layer_name in name)

    routers = [(n, m) for n, m in base.named_modules() if is_router(n, m)]
    experts = [(n, m) for n, m in base.named_modules() if is_experts_module(m)]
    layers, paired = [], set()
    for name, module in experts:
        block, inside = _block_of(name, [n for n, _ in routers])
        if block is None:
            continue
        owners = [m for n, m in base.named_modules() if _under(n, block) and BIAS_NAME in _tensors(m)]
        layers.append(MoELayer(block, [m for n, m in routers if n in inside], index, module, (owners or [None])[0]))
        paired.update(inside)
    router_class = target.__name__ if target is not None else suffix
    if not layers:
        raise ValueError(
            f"model={type(model).__name__} ({type(base).__name__}) is not a transformers MoE the balancer can read: "
            f"it has {len(routers)} {router_class} modules (recorded for router_logits) and {len(experts)} experts "
            "modules using transformers' experts interface (`use_experts_implementation`), and no block holds both"
        )
    alone = [n for n, _ in routers if n not in paired]
    if alone:
        raise ValueError(
            f"model={type(model).__name__}: the routers {alone} ({router_class}) have no experts module using "
            "transformers' experts interface in their block, so their selections cannot be counted"
        )
    blocks = [layer.block for layer in layers]
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"model={type(model).__name__}: a block holds several experts modules ({blocks})")
    return layers


def _under(name: str, prefix: str) -> bool:
    return name == prefix or prefix == "" or name.startswith(prefix + ".")


def _block_of(experts: str, routers: list[str]) -> tuple[str | None, list[str]]:
    """The experts' nearest ancestor (by name) under which a router lives (not inside the experts), and those
    routers."""
    parts = experts.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        inside = [r for r in routers if _under(r, prefix) and not _under(r, experts)]
        if inside:
            return prefix, inside
    return None, []


def _tensors(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_buffers(recurse=False)} | {n for n, _ in module.named_parameters(recurse=False)}


# --------------------------------------------------------------------------------------------- scoring


def _own_scoring(tensor: torch.Tensor) -> str | None:
    """ "softmax" / "sigmoid" when `tensor` is that function's output (up to dtype and shape changes): the router
    returned probabilities or scores, not logits. None for logits (or no graph)."""
    node = tensor.grad_fn
    while node is not None and node.name() in _PASS_THROUGH:
        node = node.next_functions[0][0]
    return None if node is None else _SCORING_NODES.get(node.name())


def scoring_in_graph(weights: torch.Tensor, router_output: torch.Tensor) -> str | None:
    """The scoring function between a router's output and the gate weights the model computed from it, read from the
    autograd graph of the weights: the softmax / sigmoid nodes met going back from the weights, not past the router
    output, a scoring node or a matrix product (where other inputs join). None when there is none, or several."""
    stop, found, seen = router_output.grad_fn, set(), set()
    frontier = [weights.grad_fn]
    while frontier and len(seen) < 256:
        node = frontier.pop()
        if node is None or node is stop or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if name in _SCORING_NODES:
            found.add(_SCORING_NODES[name])
        elif name not in _MATMUL_NODES:
            frontier.extend(n for n, _ in node.next_functions)
    return found.pop() if len(found) == 1 else None


def router_scores(output: torch.Tensor, scoring: str, output_is_scores: bool) -> torch.Tensor:
    """(T, E) fp32 scores of a router output: softmax or sigmoid of the logits (`output_is_scores`: the output is
    already the scores)."""
    x = output.float()
    if output_is_scores:
        return x
    return x.softmax(-1) if scoring == "softmax" else x.sigmoid()


def router_probabilities(scores: torch.Tensor, scoring: str) -> torch.Tensor:
    """(T, E) probabilities P_t from `router_scores`: the softmax itself, or the sigmoid scores normalised to sum to
    one over the experts (DeepSeek-V3's sequence-wise loss)."""
    return scores if scoring == "softmax" else scores / scores.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------- the statistics


@dataclass
class _Forward:
    """One forward of the base model: its geometry and what each layer's hooks produced."""

    batch: int
    seq: int
    mask: torch.Tensor | None  # (B, S) fp32, or None: every token is real
    record: bool  # this forward's statistics are kept (not a recomputation, not a no-grad eval)
    training: bool  # a training forward with grad (its layers must run with grad too)
    stats: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # counts, prob_sums, num_tokens, z_sums
    topk_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # (B,) top-K score sums (analysis only)
    stacked: RouterStats | None = None  # the layers' statistics stacked, once read


class StockMoE:
    """What the balancer reads of a transformers MoE that is not a QwenMoE-GB model: its MoE layers, their per-step
    statistics and their aux-free biases, through forward hooks (removed by `remove()`).

    Args:
        model: the (possibly wrapped: PEFT, DDP, FSDP) transformers model.
        **balance_options: the fields of `BalanceConfig` (`balance_scope`, `router_aux_loss_coef`, ...). The default
            coefficient is the model's own `router_aux_loss_coef` in our units (× K: transformers' loss is K at
            balance), or 0.001 when the model has none.
    """

    native = False  # the model does not add the balance losses itself (no `add_balance_loss` argument)

    def __init__(self, model: nn.Module, **balance_options):
        unknown = set(balance_options) - set(BALANCE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown balance options {sorted(unknown)}: allowed {list(BALANCE_OPTIONS)}")
        self.base = base_model_of(model)
        self.layers = find_moe_layers(model)
        outermost = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)  # under DDP / PEFT
        self.model_class = type(outermost).__name__
        config = self.base.config
        num_experts, top_k = experts_and_top_k(self.layers[0], config)
        options = {k: v for k, v in balance_options.items() if v is not None}
        if "router_aux_loss_coef" not in options:
            own = getattr(config, "router_aux_loss_coef", None)
            options["router_aux_loss_coef"] = own * top_k if isinstance(own, (int, float)) and own > 0 else 0.001
        self.config = BalanceConfig(num_experts, top_k, **options)
        if self.config.aux_free and any(layer.bias is None for layer in self.layers):
            raise ValueError(
                f"aux_free=True is not allowed for {self.model_class}: its routers hold no {BIAS_NAME} (the aux-free "
                f"selection bias of DeepSeek-V3-style routers) for aux_free_method={self.config.aux_free_method!r} to "
                "update; allowed for models that have one (DeepSeek-V3, GLM-4.5, dots1, ERNIE-4.5-MoE, ...) and for "
                "QwenMoE-GB models"
            )
        self.quantile = uses_quantile_balancing(self.config)
        n_group, topk_group = getattr(config, "n_group", None) or 1, getattr(config, "topk_group", None) or 1
        if self.quantile and n_group > 1 and topk_group < n_group:
            raise ValueError(
                f"aux_free_method='quantile' is not allowed for {self.model_class} with group-limited routing "
                f"(n_group={n_group}, topk_group={topk_group}): the quantile is the dual of top-k over all experts "
                "(Megatron-Core refuses it too); allowed n_group=1 or topk_group=n_group in the model's config"
            )
        if getattr(config, "output_router_logits", False):
            config.output_router_logits = False
            logger.warning(
                "%s: output_router_logits set to False, so the model adds no aux loss of its own; the balancer adds "
                "the balance loss (balance_scope=%s, router_aux_loss_coef=%s in QwenMoE-GB units, 1.0 at balance)",
                self.model_class, self.config.balance_scope, self.config.router_aux_loss_coef,
            )  # fmt: skip
        previous = getattr(self.base, "_qwenmoe_gb_stats", None)
        if previous is not None:  # one set of hooks per model: a new balancer replaces the old one's
            previous.remove()
        self.base._qwenmoe_gb_stats = self
        device = _device_of(self.layers[0].experts)
        if COUNTS_BUFFER not in _tensors(self.base):
            counts = torch.zeros(len(self.layers), num_experts, dtype=torch.long, device=device)
            self.base.register_buffer(COUNTS_BUFFER, counts, persistent=False)
        self.scoring = self.config.router_scoring_func  # None until read from the first forward with a graph
        self.output_is_scores: bool | None = None
        self.recording = False  # `analysis()`: record eval / no-grad forwards too
        self._current: _Forward | None = None  # the forward being recorded
        self._geometry: _Forward | None = None  # the last training forward's (for its recomputation in backward)
        self._pending: dict[int, tuple[_Forward, torch.Tensor]] = {}  # a layer's router output until its experts run
        self.last: _Forward | None = None  # the last recorded forward
        self._handles = self._register()

    # ------------------------------------------------------------------ what the balancer reads
    @property
    def training(self) -> bool:
        return self.base.training

    @property
    def step_expert_counts(self) -> torch.Tensor:
        return getattr(self.base, COUNTS_BUFFER)

    def expert_parallel_groups(self) -> list[list[int]]:
        """The experts each expert-parallel rank holds (transformers' EP sets `experts.num_experts` to the local
        count); one group without expert parallel."""
        local = getattr(self.layers[0].experts, "num_experts", self.config.num_experts)
        return [list(range(r * local, (r + 1) * local)) for r in range(self.config.num_experts // local)]

    def expert_groups(self) -> list[list[int]] | None:
        if self.config.device_balance_groups == "ep":
            return self.expert_parallel_groups()
        return self.config.expert_groups()

    def biases(self) -> list[torch.Tensor]:
        """The aux-free biases, one (E,) view per layer (the model's own tensors: updating them updates the model)."""
        return [layer.bias.view(-1) for layer in self.layers if layer.bias is not None]

    def router_stats(self, outputs=None) -> RouterStats | None:
        """The statistics of the last recorded forward, (L, B, E); None when none was recorded."""
        if self.last is None:
            return None
        if self.last.stacked is None:
            self.last.stacked = _stack(self.last)
        return self.last.stacked

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def analysis(self):
        """Record every forward inside (eval and no-grad ones too), with the top-K score sums: for evaluation."""
        if self.scoring is None or self.output_is_scores is None:
            self.detect_scoring()
        self.recording = True
        try:
            yield self
        finally:
            self.recording = False

    def last_topk_score_sums(self) -> torch.Tensor | None:
        """(L,) Σ over the last recorded forward's real tokens of the selected experts' scores (inside `analysis`)."""
        if self.last is None or not self.last.topk_scores:
            return None
        return torch.stack([self.last.topk_scores[i].sum() for i in sorted(self.last.topk_scores)]).double()

    @torch.enable_grad()
    def detect_scoring(self) -> None:
        """Read the scoring from a forward of 2 tokens whose embeddings require grad (a graph without training or
        trainable parameters)."""
        embed = self.base.get_input_embeddings()
        weight = embed.weight.to_local() if hasattr(embed.weight, "to_local") else embed.weight
        probe = torch.ones(1, 2, weight.shape[-1], device=weight.device, dtype=weight.dtype, requires_grad=True)
        self.base(inputs_embeds=probe, use_cache=False)

    # ------------------------------------------------------------------ hooks
    def _register(self) -> list:
        handles = [
            self.base.register_forward_pre_hook(self._begin, with_kwargs=True),
            self.base.register_forward_hook(self._end, with_kwargs=True),
        ]
        for i, layer in enumerate(self.layers):
            for router in layer.routers:
                handles.append(router.register_forward_hook(self._router_hook(i, layer.index)))
            handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(i), with_kwargs=True))
        return handles

    def _begin(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        source = ids if ids is not None else kwargs.get("inputs_embeds")
        training = module.training and torch.is_grad_enabled()
        detect = self.scoring is None or self.output_is_scores is None
        if source is None or not (training or self.recording or (detect and torch.is_grad_enabled())):
            self._current = None
            return
        batch, seq = source.shape[:2]
        mask = token_mask_from(kwargs.get("attention_mask"), seq, source.device)
        self._current = _Forward(batch, seq, mask, record=training or self.recording, training=training)
        if training:
            self._geometry = self._current

    def _end(self, module, args, kwargs, output) -> None:
        current, self._current = self._current, None
        if current is None or not current.record:
            return
        if len(current.stats) != len(self.layers):
            raise ValueError(
                f"{self.model_class}: only the MoE layers {sorted(current.stats)} of {len(self.layers)} ran in a "
                "forward: allowed models that run every MoE layer on every forward"
            )
        self.last = current

    def _active(self, module: nn.Module) -> _Forward | None:
        """The forward the hooks compute for: the recorded one, or, for a recomputation in backward (gradient
        checkpointing), the last training forward's geometry (the same ops as then, nothing recorded)."""
        if self._current is not None:
            if self._current.training and not torch.is_grad_enabled():
                raise ValueError(
                    f"{self.model_class}: its MoE layers ran without grad inside a training forward (reentrant "
                    "gradient checkpointing), so the router statistics have no gradient; use non-reentrant "
                    'checkpointing (transformers\' default: gradient_checkpointing_kwargs={"use_reentrant": False})'
                )
            return self._current
        if module.training and torch.is_grad_enabled() and self._geometry is not None:
            geometry = self._geometry
            return _Forward(geometry.batch, geometry.seq, geometry.mask, record=False, training=True)
        return None

    def _router_hook(self, layer: int, index: int):
        def hook(module, args, output):
            forward = self._active(module)
            if forward is not None:
                self._pending[layer] = (forward, output[index] if isinstance(output, (tuple, list)) else output)

        return hook

    def _experts_hook(self, layer: int):
        def hook(module, args, kwargs):
            forward, output = self._pending.pop(layer, (None, None))
            if forward is None:
                return
            top_k_index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            top_k_weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            if not self._read_scoring(output, top_k_weights, required=forward.record):
                return
            scores = router_scores(output, self.scoring, self.output_is_scores)  # (T', E)
            stats = self._layer_stats(forward, output, scores, top_k_index, layer)
            if not forward.record:
                return
            forward.stats[layer] = stats
            if self.recording:  # Σ over each sequence's real tokens of the chosen experts' scores: (B,)
                index = top_k_index.reshape(forward.batch, forward.seq, -1)  # (B, S, K)
                chosen = scores.detach().view(forward.batch, forward.seq, -1).gather(-1, index).sum(-1)  # (B, S)
                forward.topk_scores[layer] = (chosen if forward.mask is None else chosen * forward.mask).sum(-1)

        return hook

    def _read_scoring(self, output: torch.Tensor, weights: torch.Tensor | None, required: bool) -> bool:
        """Decide once, from the first forward with a graph, whether the router output is logits or scores and which
        scoring function the gate weights came from. False when it is still unknown (and not `required`)."""
        if self.scoring is not None and self.output_is_scores is not None:
            return True
        if output.grad_fn is None or weights is None or weights.grad_fn is None:
            if self.scoring is not None:  # stated by `router_scoring_func`: the output is taken as logits
                self.output_is_scores = False
                return True
            if not required:
                return False
            raise ValueError(
                f"{self.model_class}: the router's scoring function is read from the first forward with an autograd "
                "graph, and this one has none; run a training forward first, or call detect_scoring()"
            )
        own = _own_scoring(output)
        scoring = own or scoring_in_graph(weights, output)
        if scoring is None:
            raise ValueError(
                f"{self.model_class}: no softmax or sigmoid was found between its router output and its gate weights; "
                "allowed routers that score with softmax or sigmoid (pass router_scoring_func to state it)"
            )
        if self.scoring is not None and self.scoring != scoring:
            logger.warning("%s scores with %s; using router_scoring_func=%s", self.model_class, scoring, self.scoring)
        self.scoring = self.scoring or scoring
        self.config.router_scoring_func = self.scoring  # the settings (and the card) say what was used
        self.output_is_scores = own is not None
        if self.output_is_scores and self.config.router_z_loss_coef > 0:
            raise ValueError(
                f"router_z_loss_coef={self.config.router_z_loss_coef} is not allowed for {self.model_class}: its "
                "router returns probabilities, not logits, so there is no z-loss to compute; allowed 0"
            )
        logger.info("%s: router scores read as %s of its %s", self.model_class, self.scoring,
                    "scores" if self.output_is_scores else "logits")  # fmt: skip
        return True

    def _layer_stats(
        self, forward: _Forward, output: torch.Tensor, scores: torch.Tensor, top_k_index, layer: int
    ) -> tuple:
        """This layer's (B, E) counts, (B, E) probability sums, (B,) tokens and (B,) z sums; with Quantile Balancing
        in a training forward also its (E, bins) margin histogram and (E,) micro-batch quantile (or None)."""
        tokens = forward.batch * forward.seq
        if scores.numel() != tokens * self.config.num_experts:
            raise ValueError(
                f"{self.model_class}: a router output of shape {tuple(output.shape)} for a batch of {forward.batch} × "
                f"{forward.seq} tokens and {self.config.num_experts} experts: allowed routers that score every token "
                "of the batch over all experts"
            )
        probs = router_probabilities(scores, self.scoring).reshape(tokens, -1)  # (T, E)
        logits = None if self.output_is_scores else output.reshape(tokens, -1)  # (T, E)
        index = top_k_index.reshape(tokens, -1)  # (T, K)
        z_grad = self.config.router_z_loss_coef > 0
        stats = router_statistics(logits, probs, index, forward.mask, z_grad, forward.batch)
        if not (self.quantile and forward.training):
            return stats
        bias = self.layers[layer].bias.detach().float().view(-1)  # (E,): the bias this layer routed with
        mask = None if forward.mask is None else forward.mask.reshape(-1)  # (T,)
        qb = layer_quantile_statistics(scores.reshape(tokens, -1), bias, self.config, mask)  # (E, bins), (E,) | None
        return (*stats, *qb)


def _stack(forward: _Forward) -> RouterStats:
    """The layers' statistics stacked in layer order: (L, B, E) counts and probability sums, (L, B) tokens and z."""
    per_layer = [forward.stats[i] for i in sorted(forward.stats)]
    return RouterStats(*(None if x[0] is None else torch.stack(x) for x in zip(*per_layer)))


def experts_and_top_k(layer: MoELayer, config) -> tuple[int, int]:
    """E and K of a layer, from its router (`num_experts`, `top_k`) or, failing that, the model's config."""
    router = layer.routers[0]
    num_experts = getattr(router, "num_experts", None)
    top_k = getattr(router, "top_k", None)
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        num_experts = num_experts if isinstance(num_experts, int) else getattr(config, name, None)
    for name in ("num_experts_per_tok", "top_k_experts", "moe_topk"):
        top_k = top_k if isinstance(top_k, int) else getattr(config, name, None)
    if not isinstance(num_experts, int) or not isinstance(top_k, int):
        raise ValueError(f"{type(router).__name__}: the number of experts and the top-k could not be read")
    return num_experts, top_k


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        return torch.device("cpu")
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.device


__all__ = [
    "BALANCE_OPTIONS",
    "BalanceConfig",
    "MoELayer",
    "StockMoE",
    "base_model_of",
    "experts_and_top_k",
    "find_moe_layers",
    "is_experts_module",
    "router_probabilities",
    "router_scores",
    "scoring_in_graph",
]
