"""QwenMoE-GB configuration (shipped to the Hub next to `modeling_qwenmoe_gb.py`).

Features
- Qwen2-MoE shape: fine-grained routed experts + one shared expert (width = shared_expert_intermediate_size),
  optionally Qwen3-MoE attention (`use_qk_norm=True`, `attention_bias`), so Qwen1.5/2/3-MoE checkpoints load.
- Balance options: `balance_scope` (micro / global / sequence), `balance_group_size`, `micro_balance_coef`,
  `device_balance_groups` + `device_balance_coef`, `router_z_loss_coef`, `aux_free` + `aux_free_bias_update_rate`,
  `router_scoring_func` (softmax / sigmoid).
- `router_dtype`: the router linear in the model dtype or in fp32 under bf16/fp16 (a source of routing mismatch
  between generation and training in RL, see `routed_experts` on the model's forward).
- `n_group` / `topk_group` / `routed_scaling_factor`: DeepSeek-V3's group-limited routing and routed scaling.
- `expert_capacity_factor` / `moe_token_drop_policy`: capacity with token dropping in training.
- `moe_recompute`: MoE-aware selective recompute (the experts' activation, the experts, or the whole MoE block).
- `loss_implementation`: the chunked LM-head + cross-entropy loss (no (T, V) logits in training), Liger-Kernel's
  fused one on CUDA, or transformers' one.
- `num_params()` / `num_active_params()`: parameter counts from the config alone.

This file imports only the standard library and transformers (Hub custom-code rule).
"""

from transformers import Qwen2MoeConfig

BALANCE_SCOPES = ("micro", "global", "sequence")
ROUTER_SCORING_FUNCS = ("softmax", "sigmoid")
AUX_FREE_METHODS = ("sign", "quantile")  # the aux-free bias update: DeepSeek's ±u sign rule, Quantile Balancing
QUANTILE_SCOPES = ("global", "micro_mean")  # QB's quantile: pooled over the step (histogram), mean of micro-batches
LOSS_IMPLEMENTATIONS = ("chunked", "full", "liger")
ROUTER_DTYPES = ("auto", "float32")
MOE_RECOMPUTE = ("none", "expert_act", "experts", "moe")
TOKEN_DROP_POLICIES = ("probs", "position")
# The string fields with a closed set of values: what validation allows (`_check_choice`) and the reference lists
FIELD_CHOICES = {
    "balance_scope": BALANCE_SCOPES,
    "aux_free_method": AUX_FREE_METHODS,
    "quantile_scope": QUANTILE_SCOPES,
    "router_scoring_func": ROUTER_SCORING_FUNCS,
    "router_dtype": ROUTER_DTYPES,
    "moe_recompute": MOE_RECOMPUTE,
    "moe_token_drop_policy": TOKEN_DROP_POLICIES,
    "loss_implementation": LOSS_IMPLEMENTATIONS,
}


class QwenMoeGBConfig(Qwen2MoeConfig):
    r"""Configuration of a QwenMoE-GB model: a Qwen2-MoE model trained with global-batch load balancing.

    All Qwen2-MoE fields keep their transformers meaning (`num_experts`, `num_experts_per_tok`,
    `moe_intermediate_size`, `shared_expert_intermediate_size`, `norm_topk_prob`, `output_router_logits`, ...).
    `shared_expert_intermediate_size=0` drops the shared expert (Qwen3-MoE shape).

    Balance losses are normalised so that perfectly balanced routing scores 1.0 (f_i = counts_i / (K·T)) and are
    averaged over the MoE layers. transformers' `load_balancing_loss_func` scores K at balance, so a coefficient
    `c` here equals `c / K` in transformers' units.

    Args:
        router_aux_loss_coef (`float`, *optional*, defaults to 0.001):
            Coefficient of the expert-level load-balancing loss `E · Σ_i f_i · P_i` (the transformers name).
        balance_scope (`str`, *optional*, defaults to `"global"`):
            Over which tokens f_i is counted for the expert-level and device-level losses:
            - `"micro"`: the micro-batch (or chunks of `balance_group_size` sequences of it);
            - `"global"`: the whole optimizer step, all data-parallel ranks × all gradient-accumulation micro-steps
              so far (Qiu et al. 2025). Needs the trainer's balancer; a bare `forward` computes the micro loss;
            - `"sequence"`: each sequence on its own (DeepSeek-V3's sequence-wise loss).
        balance_group_size (`int`, *optional*):
            With `balance_scope="micro"`, count f over chunks of this many sequences (the balance batch size of a
            sweep on one device). `None` = the whole micro-batch.
        micro_balance_coef (`float`, *optional*, defaults to 0.0):
            Coefficient of an extra micro-batch expert-level loss added on top of the global one (paper Table 5).
        device_balance_groups (`int`, `list[list[int]]` or `"ep"`, *optional*):
            Device-level balance loss (DeepSeek-V2): `None` (off), an int D (D equal contiguous groups; D must divide
            `num_experts`), an explicit partition of all experts as lists of expert indices, or `"ep"`: group i = the
            experts that expert-parallel rank i holds, read from the loaded model (`QwenMoeGBModel.expert_groups()`;
            one group when the model is not expert-parallel).
        device_balance_coef (`float`, *optional*, defaults to 0.001):
            Coefficient of the device-level loss (used only when `device_balance_groups` is set).
        router_z_loss_coef (`float`, *optional*, defaults to 0.0):
            Coefficient of the router z-loss `mean_t (logsumexp_j x_tj)^2` (ST-MoE).
        aux_free (`bool`, *optional*, defaults to `False`):
            Auxiliary-loss-free balancing (Wang et al. 2024): a per-expert bias (buffer `expert_bias`, fp32, saved) is
            added to the scores for top-k selection only; the trainer updates it once per optimizer step from the
            global counts: `b += u · sign(mean(c) − c)`.
        aux_free_bias_update_rate (`float`, *optional*, defaults to 0.001):
            The update rate `u` of the aux-free bias (`aux_free_method="sign"`).
        aux_free_method (`str`, *optional*, defaults to `"sign"`):
            How the aux-free bias moves once per optimizer step: `"sign"` (DeepSeek's rule above, rate
            `aux_free_bias_update_rate`) or `"quantile"` (Quantile Balancing, Su 2026 / Kimi K3: no rate). QB sets the
            bias to the one dual step of "route every token to k experts, every expert to T·k/E tokens": per token
            α_t = the (k+1)-th largest biased score, margins r_tj = α_t − s_tj, and b_j = the (k/E)-quantile of r_:,j
            over the step's real tokens (the selection of expert j at that bias is exactly k/E of them); b is then
            mean-centred and replaces the old one (or is blended, `quantile_ema`). Requires `aux_free=True`.
        quantile_scope (`str`, *optional*, defaults to `"global"`):
            Which tokens QB's quantile is taken over: `"global"` (Kimi K3, TransformerEngine, torchtitan: per expert a
            histogram of margins, int64 counts summed over the step's micro-batches and the data-parallel ranks, the
            quantile read from the pooled histogram inside its bin) or `"micro_mean"` (Megatron-Core: the exact
            quantile of each micro-batch, the (⌊T·k/E⌋+1)-th smallest margin, averaged over micro-batches and ranks).
        quantile_bins (`int`, *optional*, defaults to 1000):
            Histogram bins per expert (`quantile_scope="global"`), uniform over [min b − 1, max b + 1] (margins of
            scores in [0, 1] lie there); the quantile is within one bin width of the exact pooled one. At least 10.
        quantile_ema (`float`, *optional*, defaults to 0.0):
            QB's new bias = `ema · old + (1 − ema) · quantiles`, then mean-centred; 0 replaces the bias (Su, Megatron's
            default). In [0, 1).
        router_scoring_func (`str`, *optional*, defaults to `"softmax"`):
            `"softmax"` or `"sigmoid"` router scores. With sigmoid, the balance losses use the scores normalised
            to sum to one over experts.
        router_dtype (`str`, *optional*, defaults to `"auto"`):
            Precision of the router linear (hidden states × router weight, the logits): `"auto"` computes it as the
            model runs (the weights' dtype, or the autocast dtype under bf16 / fp16 autocast); `"float32"` computes it
            in fp32 from upcast hidden states and weights, outside autocast, whatever the model dtype. The scores
            (softmax / sigmoid) and top-k are fp32 either way. In RL, a low-precision router linear makes generation
            and training select different experts for near-tied tokens.
        moe_recompute (`str`, *optional*, defaults to `"none"`):
            What the sparse MoE layers recompute in backward instead of keeping for it (training with grad only):
            - `"none"`: keep everything (whole-layer `gradient_checkpointing` is the separate transformers option);
            - `"expert_act"`: the experts' activation (`act(gate) · up`) and every other op of the experts but the
              projections (gate weighting, token gathers / scatters); the projections' outputs are kept, so no
              matmul runs twice (torch's selective activation checkpointing);
            - `"experts"`: the whole expert computation (gate_up, activation, down), from the kept routing;
            - `"moe"`: the whole MoE block, router and shared expert included. The routing and the router statistics
              are the forward's, computed once (the recomputed router is the same deterministic function of the same
              input); gradients equal the unrecomputed step's.
        loss_implementation (`str`, *optional*, defaults to `"chunked"`):
            How training computes the language-model loss: `"chunked"` (the LM head and cross-entropy over chunks of
            tokens from the hidden states, forward and backward, so the (T, V) logits never exist; `logits` is None
            in training unless `return_logits=True`; a micro-batch of at most one chunk takes the plain path) or
            `"full"` (transformers' LM head + `ForCausalLMLoss`), or `"liger"` (Liger-Kernel's fused linear
            cross-entropy, Triton: where `liger_kernel` is installed and the model is on a CUDA device; elsewhere the
            chunked loss, with a warning). Evaluation and generation always compute logits.
        loss_chunk_size (`int`, *optional*):
            Tokens per chunk of the chunked loss; `None` = 2**27 // vocab_size (512 MiB of fp32 logits per chunk).
        use_qk_norm (`bool`, *optional*, defaults to `False`):
            Use Qwen3-MoE attention (RMSNorm on queries and keys per head, `attention_bias` instead of `qkv_bias`).
        attention_bias (`bool`, *optional*, defaults to `False`):
            Bias on q/k/v/o projections when `use_qk_norm=True`.
        n_group (`int`, *optional*, defaults to 1):
            Group-limited routing (DeepSeek-V3): the experts form `n_group` contiguous groups of
            `num_experts // n_group`; a group scores the sum of its two highest (biased) scores and each token chooses
            its top-k among the experts of its `topk_group` best groups. 1 = no limit. `n_group = ep_size` (the
            contiguous experts each expert-parallel rank holds) is device-limited routing: a token reaches at most
            `topk_group` ranks.
        topk_group (`int`, *optional*, defaults to 1):
            Groups each token may use (with `n_group > 1`); `topk_group · num_experts // n_group` must be at least
            `num_experts_per_tok`.
        routed_scaling_factor (`float`, *optional*, defaults to 1.0):
            Multiplies the routed experts' gate weights (after `norm_topk_prob`), as DeepSeek-V3 / GLM-4.5.
        expert_capacity_factor (`float`, *optional*):
            Token dropping in training (GShard / Switch): each expert of each MoE layer serves at most
            `C = ceil(factor · T · K / E)` of the T·K selections of a forward (T tokens, padding included); the rest
            are dropped: their gate weight is 0, the experts do not compute them, and the statistics do not count
            them (`counts` = selections served, so f_i is the share of the served selections and the dropped
            fraction is `1 − Σ counts / (K · tokens)`). `None` = dropless. Evaluation and generation are dropless
            (as the stock export and vLLM serve the model).
        moe_token_drop_policy (`str`, *optional*, defaults to `"probs"`):
            Which selections an over-capacity expert keeps: `"probs"` the C with the highest gate weight,
            `"position"` the first C in token order (Megatron's names).
        head_dim (`int`, *optional*):
            Attention head size; defaults to `hidden_size // num_attention_heads`.
    """

    model_type = "qwenmoe_gb"

    balance_scope: str = "global"
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
    router_scoring_func: str = "softmax"
    router_dtype: str = "auto"
    moe_recompute: str = "none"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    expert_capacity_factor: float | None = None
    moe_token_drop_policy: str = "probs"
    loss_implementation: str = "chunked"
    loss_chunk_size: int | None = None
    use_qk_norm: bool = False
    attention_bias: bool = False
    head_dim: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate_balance()
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------ validation
    def validate_balance(self) -> None:
        """Raise `ValueError` naming the field, the value and what is allowed."""
        validate_balance_fields(self)
        for name in ("router_scoring_func", "router_dtype", "moe_recompute"):
            _check_choice(name, getattr(self, name))
        self.validate_routing()
        _check_choice("loss_implementation", self.loss_implementation)
        if self.loss_chunk_size is not None:
            _check_int("loss_chunk_size", self.loss_chunk_size, minimum=1)

    def validate_routing(self) -> None:
        """Check group-limited routing, routed scaling and capacity; `ValueError` naming the field and value."""
        _check_int("n_group", self.n_group, minimum=1)
        _check_int("topk_group", self.topk_group, minimum=1)
        if self.n_group > 1:
            if self.num_experts % self.n_group or self.num_experts // self.n_group < 2:
                raise ValueError(
                    f"n_group={self.n_group} must divide num_experts={self.num_experts} into groups of at least 2 "
                    "experts (a group scores the sum of its two highest scores)"
                )
            if self.topk_group > self.n_group:
                raise ValueError(
                    f"topk_group={self.topk_group} is above n_group={self.n_group}: allowed 1..{self.n_group}"
                )
            group_size = self.num_experts // self.n_group
            if self.topk_group * group_size < self.num_experts_per_tok:
                raise ValueError(
                    f"topk_group={self.topk_group} groups of {group_size} experts hold fewer than "
                    f"num_experts_per_tok={self.num_experts_per_tok}: raise topk_group"
                )
        for name in ("routed_scaling_factor", "expert_capacity_factor"):
            value = getattr(self, name)
            if value is None and name == "expert_capacity_factor":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} is not allowed: a number > 0 is required")
        _check_choice("moe_token_drop_policy", self.moe_token_drop_policy)

    def expert_groups(self) -> list[list[int]] | None:
        """`device_balance_groups` as an explicit partition (list of expert-index lists), or None. `"ep"` depends on
        how the model was sharded: ask the model (`QwenMoeGBModel.expert_groups()`)."""
        return expert_partition(self.device_balance_groups, self.num_experts)

    # ------------------------------------------------------------------ parameter counts
    def moe_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that hold a sparse MoE block (Qwen2-MoE's rule)."""
        return [
            i
            for i in range(self.num_hidden_layers)
            if i not in (self.mlp_only_layers or [])
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        ]

    def num_params(self, active: bool = False) -> int:
        """Number of parameters of `QwenMoeGBForCausalLM` (buffers excluded); `active=True` counts only the
        `num_experts_per_tok` routed experts a token uses (plus everything dense)."""
        d, v = self.hidden_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        if self.use_qk_norm:
            attn = d * q + 2 * d * kv + q * d + 2 * self.head_dim
            attn += (q + 2 * kv + d) if self.attention_bias else 0
        else:
            attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if self.qkv_bias else 0)
        norms = 2 * d
        experts = self.num_experts_per_tok if active else self.num_experts
        moe = experts * 3 * d * self.moe_intermediate_size + self.num_experts * d  # experts + router
        if self.shared_expert_intermediate_size > 0:
            moe += 3 * d * self.shared_expert_intermediate_size + d  # shared expert + its gate
        dense = 3 * d * self.intermediate_size
        n_moe = len(self.moe_layer_indices())
        layers = self.num_hidden_layers * (attn + norms) + n_moe * moe + (self.num_hidden_layers - n_moe) * dense
        embeddings = v * d * (1 if self.tie_word_embeddings else 2)
        return embeddings + layers + d  # + final norm

    def num_active_params(self) -> int:
        return self.num_params(active=True)


BALANCE_COEFFICIENTS = (
    "router_aux_loss_coef",
    "micro_balance_coef",
    "device_balance_coef",
    "router_z_loss_coef",
    "aux_free_bias_update_rate",
)


def validate_balance_fields(config) -> None:
    """Check the balance fields of `config` (this config, or the balancer's settings for another MoE: the same names)
    and normalise `device_balance_groups`; `ValueError` naming the field, the value and what is allowed."""
    _check_int("num_experts", config.num_experts, minimum=1)
    _check_int("num_experts_per_tok", config.num_experts_per_tok, minimum=1)
    if config.num_experts_per_tok > config.num_experts:
        raise ValueError(
            f"num_experts_per_tok={config.num_experts_per_tok} is above num_experts={config.num_experts}: "
            f"allowed 1..{config.num_experts}"
        )
    _check_choice("balance_scope", config.balance_scope)
    if config.balance_group_size is not None:
        _check_int("balance_group_size", config.balance_group_size, minimum=1)
    for name in BALANCE_COEFFICIENTS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name}={value!r} is not allowed: a number >= 0 is required")
    if not isinstance(config.aux_free, bool):
        raise ValueError(f"aux_free={config.aux_free!r} is not allowed: True or False")
    validate_quantile_fields(config)
    config.device_balance_groups = _normalise_groups(config.device_balance_groups, config.num_experts)


def uses_quantile_balancing(config) -> bool:
    """The aux-free bias of `config` (this config, or the balancer's settings for another MoE) is set by Quantile
    Balancing."""
    return bool(config.aux_free) and getattr(config, "aux_free_method", "sign") == "quantile"


def validate_quantile_fields(config) -> None:
    """Check the aux-free method and Quantile Balancing's fields (`ValueError` naming the field)."""
    method = getattr(config, "aux_free_method", "sign")
    _check_choice("aux_free_method", method)
    _check_choice("quantile_scope", config.quantile_scope)
    _check_int("quantile_bins", config.quantile_bins, minimum=10)
    ema = config.quantile_ema
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
        raise ValueError(f"quantile_ema={ema!r} is not allowed: a number in [0, 1) is required (0 = replace)")
    if method != "quantile":
        return
    if not config.aux_free:
        raise ValueError(
            "aux_free_method='quantile' moves the aux-free bias, and aux_free=False adds no bias to the selection: "
            "set aux_free=True"
        )
    if config.num_experts_per_tok >= config.num_experts:
        raise ValueError(
            f"aux_free_method='quantile' with num_experts_per_tok={config.num_experts_per_tok} of "
            f"num_experts={config.num_experts}: every token uses every expert, there is nothing to balance"
        )
    n_group, topk_group = getattr(config, "n_group", None) or 1, getattr(config, "topk_group", None) or 1
    if n_group > 1 and topk_group < n_group:
        raise ValueError(
            f"aux_free_method='quantile' with group-limited routing (n_group={n_group}, topk_group={topk_group}) is "
            "not supported: the quantile is the dual of top-k over all experts, and the group limit removes experts "
            "per token before it (Megatron-Core refuses it too); allowed n_group=1 or topk_group=n_group"
        )


def expert_partition(groups: int | list | str | None, num_experts: int) -> list[list[int]] | None:
    """A validated `device_balance_groups` as an explicit partition (list of expert-index lists), or None. `"ep"`
    depends on how the model was sharded and is resolved by the model (or the balancer's view of it)."""
    if groups is None:
        return None
    if groups == "ep":
        raise ValueError(
            "device_balance_groups='ep' is read from the loaded model's expert-parallel sharding: use "
            "QwenMoeGBModel.expert_groups() (the model and the balancer do)"
        )
    if isinstance(groups, int):
        size = num_experts // groups
        return [list(range(d * size, (d + 1) * size)) for d in range(groups)]
    return [list(g) for g in groups]


def _check_choice(name: str, value: object) -> None:
    if value not in FIELD_CHOICES[name]:
        raise ValueError(f"{name}={value!r} is unknown: allowed {list(FIELD_CHOICES[name])}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: an integer >= {minimum} is required")


def _normalise_groups(groups: object, num_experts: int) -> int | list[list[int]] | None:
    """Validate `device_balance_groups`; return it unchanged (int) or as a list of sorted int lists."""
    if groups is None or groups == "ep":
        return groups
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1 or num_experts % groups != 0:
            raise ValueError(f"device_balance_groups={groups} must be a positive divisor of num_experts={num_experts}")
        return groups
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, (list, tuple)) and g for g in groups):
        raise ValueError(
            f"device_balance_groups={groups!r} is not allowed: None, an int dividing num_experts, "
            "a list of non-empty lists of expert indices, or 'ep'"
        )
    flat = [i for g in groups for i in g]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in flat) or sorted(flat) != list(
        range(num_experts)
    ):
        raise ValueError(
            f"device_balance_groups={groups!r} is not a partition of the experts 0..{num_experts - 1}: "
            "every expert index must appear in exactly one group"
        )
    return [sorted(int(i) for i in g) for g in groups]


__all__ = [
    "QwenMoeGBConfig",
    "BALANCE_COEFFICIENTS",
    "BALANCE_SCOPES",
    "LOSS_IMPLEMENTATIONS",
    "MOE_RECOMPUTE",
    "ROUTER_SCORING_FUNCS",
    "AUX_FREE_METHODS",
    "QUANTILE_SCOPES",
    "TOKEN_DROP_POLICIES",
    "expert_partition",
    "validate_balance_fields",
    "validate_quantile_fields",
    "uses_quantile_balancing",
]
