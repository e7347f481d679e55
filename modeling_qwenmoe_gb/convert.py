"""Into and out of stock Qwen MoE checkpoints: Qwen1.5-MoE / Qwen2-MoE / Qwen3-MoE (local folder or Hub name).

Features
- `from_qwen_moe(path)`: a Qwen2/3-MoE checkpoint (or a folder `export_qwen_moe` wrote) as a `QwenMoeGBForCausalLM`,
  identical logits; balance options set at the same time.
- `to_qwen_moe(model, to="auto")`: the model as transformers' own `Qwen3MoeForCausalLM` / `Qwen2MoeForCausalLM`,
  identical logits, or a `ValueError` naming every setting that no stock architecture represents.
- `export_qwen_moe(model_or_dir, out)`: a folder that transformers, vLLM's native classes and llama.cpp's converter
  load as a stock Qwen-MoE: per-expert weight names, no code, no `auto_map`, the tokenizer, the generation config, a
  card recording how the model was trained and how to serve it (`qwenmoe-gb export`).

Units: transformers' `load_balancing_loss_func` scores K (`num_experts_per_tok`) at perfect balance, ours scores 1.0.
A Qwen checkpoint's `router_aux_loss_coef` is in transformers' units, so the conversion in multiplies it by K (a
converted Qwen3-MoE, K = 8, coefficient 0.001, trains with 0.008 here: the same balance strength) and the export
divides by K. A `router_aux_loss_coef` passed to `from_qwen_moe` is taken in our units, unchanged.

Exactness: both stock architectures route as ours does (softmax of the router logits, top-k, `norm_topk_prob`), so
the export is exact when the model has softmax scores and no nonzero aux-free bias. Qwen3-MoE has QK-norm and no
shared expert; Qwen2-MoE has no QK-norm, q/k/v biases (written as zeros when the model has none), head size
hidden / heads and a shared expert (a model without one gets a width-1 shared expert with zero weights, which adds
exactly 0 and which `from_qwen_moe` removes again).

GLM-4.5-MoE (`glm4_moe`, `to="auto"` for a model with sigmoid scores, a nonzero aux-free bias, group-limited routing or
routed scaling): DeepSeek-V3's router (sigmoid, `e_score_correction_bias` for selection, `n_group` / `topk_group`,
`norm_topk_prob`, `routed_scaling_factor`), q/k/v biases and QK-norm optional, full rotary (`partial_rotary_factor`
1.0), every layer MoE (`first_k_dense_replace=0`) and an ungated shared expert, written as zeros (adds exactly 0)
when the model has none; a model with a sigmoid-gated shared expert is refused. Capacity dropping is training-only:
the export serves dropless, as our model evaluates.
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from .configuration_qwenmoe_gb import QwenMoeGBConfig
from .modeling_qwenmoe_gb import QwenMoeGBForCausalLM, QwenMoeGBSparseMoeBlock

SUPPORTED = ("qwen2_moe", "qwen3_moe", "qwenmoe_gb")
TRANSFORMERS_UNITS = ("qwen2_moe", "qwen3_moe")  # model types whose router_aux_loss_coef is in transformers' units
STOCK = {
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM),  # sigmoid scores, selection bias, group-limited, routed scaling
}
EXPORT_TARGETS = ("auto", *STOCK)
# The training settings an export keeps in its config.json (key `qwenmoe_gb`, ignored by transformers and the
# engines), so that `from_qwen_moe` gives back the model as it was trained.
TRAINING_FIELDS = (
    "balance_scope", "balance_group_size", "micro_balance_coef", "device_balance_groups", "device_balance_coef",
    "router_z_loss_coef", "aux_free", "aux_free_bias_update_rate", "aux_free_method", "quantile_scope",
    "quantile_bins", "quantile_ema", "router_aux_loss_coef", "loss_implementation",
    "loss_chunk_size", "router_dtype", "moe_recompute", "expert_capacity_factor", "moe_token_drop_policy",
)  # fmt: skip
# llama.cpp hard-codes top-k renormalisation per architecture (its qwen3moe / qwen2moe graphs).
LLAMA_CPP_NORM_TOPK = {"qwen3_moe": True, "qwen2_moe": False}
SERVE_OWN_CODE = (
    "serve it with its own code instead: vLLM's Transformers backend (LLM(model=DIR, model_impl='transformers', "
    "trust_remote_code=True), or `vllm serve DIR --model-impl transformers --trust-remote-code`) or transformers "
    "(AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True))"
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- in


def qwen_moe_config(source, **balance) -> QwenMoeGBConfig:
    """A `QwenMoeGBConfig` with the architecture of a Qwen2-MoE / Qwen3-MoE config (object, path or Hub name); its
    `router_aux_loss_coef` converted to our units (× K) unless `balance` gives one. A config written by
    `export_qwen_moe` brings back the training settings it recorded (`balance` still wins)."""
    config = source if not isinstance(source, str) else AutoConfig.from_pretrained(source)
    if config.model_type == "glm4_moe":
        return glm4_moe_config(config, **balance)
    if config.model_type not in SUPPORTED:
        raise ValueError(f"model_type={config.model_type!r} cannot be converted: allowed {list(SUPPORTED)}")
    fields = config.to_dict()
    recorded = fields.pop("qwenmoe_gb", None) or {}
    for alias, stored in getattr(config, "attribute_map", {}).items():  # e.g. Qwen3: num_experts -> num_local_experts
        fields[alias] = getattr(config, alias)
        fields.pop(stored, None)
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        fields.pop(key, None)
    if config.model_type == "qwen3_moe":
        fields.update(use_qk_norm=True, qkv_bias=False, shared_expert_intermediate_size=0)
    training = recorded.get("training", {})  # an export's own record: our units
    fields.update(training)
    if config.model_type in TRANSFORMERS_UNITS and "router_aux_loss_coef" not in {**balance, **training}:
        stored, k = fields["router_aux_loss_coef"], fields["num_experts_per_tok"]
        fields["router_aux_loss_coef"] = stored * k
        logger.warning(
            "router_aux_loss_coef=%s of the %s checkpoint is in transformers' units (LBL = K = %d at balance): "
            "converted to %s in QwenMoE-GB units (LBL = 1.0 at balance), the same balance strength",
            stored, config.model_type, k, stored * k,
        )  # fmt: skip
    allowed = {f for f in QwenMoeGBConfig.__dataclass_fields__}
    kept = {k: v for k, v in fields.items() if k in allowed}
    return QwenMoeGBConfig(**{**kept, **balance})


def from_qwen_moe(source: str, **kwargs) -> QwenMoeGBForCausalLM:
    """Load a Qwen1.5/2/3-MoE checkpoint as a QwenMoE-GB model. Config fields (e.g. `balance_scope="global"`,
    `router_aux_loss_coef=0.01`) go to the config; other kwargs (dtype, device_map, ...) to `from_pretrained`."""
    balance = {k: kwargs.pop(k) for k in list(kwargs) if k in QwenMoeGBConfig.__dataclass_fields__}
    source_config = AutoConfig.from_pretrained(source)  # read once: the architecture and an export's record
    if source_config.model_type == "glm4_moe":
        return _from_glm4_moe(source, source_config, balance, kwargs)
    model = QwenMoeGBForCausalLM.from_pretrained(source, config=qwen_moe_config(source_config, **balance), **kwargs)
    recorded = getattr(source_config, "qwenmoe_gb", None) or {}
    _drop_stand_ins(model, recorded.get("stand_ins", []))
    return model


def _fill_meta_buffers(module: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """The buffers a meta-device build left empty (non-persistent ones, which no state dict carries): `source`'s
    tensor of the same name, zeros where `source` has none."""
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            value = source[name] if name in source else torch.zeros(buffer.shape, dtype=buffer.dtype)
            setattr(module.get_submodule(owner), attr, value)


def glm4_moe_config(config: Glm4MoeConfig, **balance) -> QwenMoeGBConfig:
    """Our config for a GLM-4.5-MoE whose layers are all MoE with one shared expert of zeros (what the export
    writes): sigmoid scores, its groups and scaling, the training settings an export recorded."""
    if config.first_k_dense_replace != 0:
        raise ValueError(
            f"first_k_dense_replace={config.first_k_dense_replace} cannot be converted: QwenMoE-GB makes every layer "
            "MoE here (allowed 0); train it as it is with --model_name_or_path"
        )
    rope = dict(config.rope_parameters)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"partial_rotary_factor={rope['partial_rotary_factor']} cannot be converted: QwenMoE-GB rotates every "
            "dimension (allowed 1.0); train it as it is with --model_name_or_path"
        )
    rope.pop("partial_rotary_factor", None)
    recorded = getattr(config, "qwenmoe_gb", None) or {}
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope,
        use_qk_norm=config.use_qk_norm, qkv_bias=config.attention_bias and not config.use_qk_norm,
        attention_bias=config.attention_bias and config.use_qk_norm, moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
        shared_expert_intermediate_size=0, norm_topk_prob=config.norm_topk_prob, n_group=config.n_group,
        topk_group=config.topk_group, routed_scaling_factor=config.routed_scaling_factor, router_scoring_func="sigmoid",
        router_aux_loss_coef=config.router_aux_loss_coef * config.num_experts_per_tok,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )  # fmt: skip
    fields.update(recorded.get("training", {}))
    return QwenMoeGBConfig(**{**fields, **balance})


def _from_glm4_moe(source: str, source_config: Glm4MoeConfig, balance: dict, kwargs: dict) -> QwenMoeGBForCausalLM:
    """A GLM-4.5-MoE (an export of ours, or one shaped like it) as our model: the shared experts must be zero."""
    stock = Glm4MoeForCausalLM.from_pretrained(source, **kwargs)
    config = glm4_moe_config(source_config, **balance)
    state = {}
    for key, value in stock.state_dict().items():
        if ".mlp.shared_experts." in key:
            if value.any():
                raise ValueError(
                    f"{key} is nonzero: QwenMoE-GB's shared expert is sigmoid-gated, GLM-4.5-MoE's is not; only a zero "
                    "shared expert (what export writes) converts exactly. Train it as it is with --model_name_or_path"
                )
            continue
        state[key.replace("mlp.gate.e_score_correction_bias", "mlp.gate.expert_bias")] = value
    if any(v.ne(0).any() for k, v in state.items() if k.endswith("expert_bias")):
        config.aux_free = True  # the bias moves the selection only with aux-free routing
    with torch.device("meta"):
        model = QwenMoeGBForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    _fill_meta_buffers(model, dict(stock.named_buffers()))  # the rotary frequencies; our step buffer: zeros
    model.config._experts_implementation = stock.config._experts_implementation
    model.tie_weights()
    model.generation_config = stock.generation_config
    return model.eval()


def _drop_stand_ins(model: QwenMoeGBForCausalLM, stand_ins: list[str]) -> None:
    """Remove what an export added to fit Qwen2-MoE (`"shared_expert"`: a width-1 shared expert; `"qkv_bias"`: q/k/v
    biases), if it is still all zero (it adds exactly 0): the model the export started from."""
    layers = model.model.layers
    if "shared_expert" in stand_ins:
        blocks = [layer.mlp for layer in layers if isinstance(layer.mlp, QwenMoeGBSparseMoeBlock)]
        if all(not p.any() for b in blocks for p in (*b.shared_expert.parameters(), b.shared_expert_gate.weight)):
            for block in blocks:
                block.shared_expert = None
                del block.shared_expert_gate
            model.config.shared_expert_intermediate_size = 0
    if "qkv_bias" in stand_ins:
        projections = [getattr(layer.self_attn, name) for layer in layers for name in ("q_proj", "k_proj", "v_proj")]
        if not any(p.bias.any() for p in projections):
            for projection in projections:
                projection.bias = None
            model.config.qkv_bias = False


# ----------------------------------------------------------------------------------------- up from dense

DENSE = ("qwen2", "qwen3", "llama")
UPCYCLE_RECIPES = ("copy", "segment")
DENSE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "dtype",
)  # fmt: skip


def dense_moe_config(
    source,
    num_experts: int,
    num_experts_per_tok: int,
    moe_intermediate_size: int | None = None,
    shared_expert_intermediate_size: int = 0,
    recipe: str = "copy",
    **fields,
) -> QwenMoeGBConfig:
    """The `QwenMoeGBConfig` of a dense Qwen2 / Qwen3 / Llama config (object, path or Hub name) upcycled into
    `num_experts` experts of width `moe_intermediate_size` (default: the dense width for `copy`; required for
    `segment`, a divisor of the dense width), top-`num_experts_per_tok`, normalised top-k weights. `fields`: any other
    config field (balance options). Every setting that cannot work raises a ValueError naming the field."""
    dense = source if not isinstance(source, str) else AutoConfig.from_pretrained(source)
    if dense.model_type not in DENSE:
        raise ValueError(f"model_type={dense.model_type!r} is not a supported dense model: allowed {list(DENSE)}")
    if recipe not in UPCYCLE_RECIPES:
        raise ValueError(f"recipe={recipe!r} is unknown: allowed {list(UPCYCLE_RECIPES)}")
    for name in ("mlp_bias", "attention_bias"):
        if dense.model_type == "llama" and getattr(dense, name, False):
            raise ValueError(f"{name}=True (llama): QwenMoE-GB's Llama-shaped attention and experts have no such bias")
    width = dense.intermediate_size
    if recipe == "copy":
        moe_intermediate_size = moe_intermediate_size or width
        if moe_intermediate_size != width:
            raise ValueError(
                f"moe_intermediate_size={moe_intermediate_size}: recipe 'copy' needs the dense width {width}"
            )
    elif not moe_intermediate_size or width % moe_intermediate_size:
        raise ValueError(
            f"moe_intermediate_size={moe_intermediate_size} does not divide intermediate_size={width}: recipe "
            "'segment' splits the dense FFN into segments of that width"
        )
    if recipe == "segment":
        rest = width if shared_expert_intermediate_size in (0, width) else width - shared_expert_intermediate_size
        if rest <= 0 or rest % moe_intermediate_size:
            raise ValueError(
                f"shared_expert_intermediate_size={shared_expert_intermediate_size}: 0, the dense width {width}, or a "
                f"smaller width that leaves a multiple of moe_intermediate_size={moe_intermediate_size} for the experts"
            )
        if num_experts % (segments := rest // moe_intermediate_size):
            raise ValueError(f"num_experts={num_experts} is not a multiple of the {segments} segments of the FFN")
    elif not 0 <= shared_expert_intermediate_size <= width:
        raise ValueError(f"shared_expert_intermediate_size={shared_expert_intermediate_size}: allowed 0..{width}")
    kept = {k: getattr(dense, k) for k in DENSE_FIELDS if getattr(dense, k, None) is not None}
    if dense.model_type == "qwen3":
        kept.update(use_qk_norm=True, qkv_bias=False, head_dim=dense.head_dim)
        kept["attention_bias"] = getattr(dense, "attention_bias", False)
    else:
        kept.update(use_qk_norm=False, qkv_bias=dense.model_type == "qwen2")
        kept["head_dim"] = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    kept.update(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, norm_topk_prob=True,
                moe_intermediate_size=moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
                shared_expert_intermediate_size=shared_expert_intermediate_size)  # fmt: skip
    return QwenMoeGBConfig(**{**kept, **fields})


def from_dense(
    source,
    num_experts: int,
    num_experts_per_tok: int,
    moe_intermediate_size: int | None = None,
    shared_expert_intermediate_size: int = 0,
    recipe: str = "copy",
    reinit_ratio: float = 0.0,
    seed: int | None = None,
    **kwargs,
) -> QwenMoeGBForCausalLM:
    """Upcycle a dense Qwen2 / Qwen3 / Llama causal LM (a model, a folder or a Hub name) into a QwenMoE-GB MoE.
    Embeddings, attention (Qwen3: QK-norm; Qwen2: q/k/v bias), norms and LM head are copied; each FFN becomes experts:

    - `recipe="copy"` (sparse upcycling, Komatsuzaki et al. 2022): every expert is the dense FFN. The top-k weights
      are normalised (they sum to 1), so the MoE computes exactly the dense function at initialisation, whatever the
      (random) router. A shared expert (`shared_expert_intermediate_size` S > 0) starts from the first S units of the
      FFN with a zero down projection and a zero gate: it adds exactly 0.
    - `recipe="segment"` (fine-grained, as Qwen1.5-MoE): the FFN's hidden units are split into segments of
      `moe_intermediate_size`; expert e is segment e mod G (replicated to `num_experts`). With a shared expert of the
      full dense width (S = `intermediate_size`) the shared expert *is* the dense FFN (down projection × 2 against
      sigmoid(0) = ½ of its zero-initialised gate) and the routed experts start with zero down projections: exactly
      the dense function. Otherwise it is not preserved: the shared expert holds the first S units (× 2 as above),
      the routed experts the G segments of the rest with their down projections × G, so that the normalised top-k
      mixture equals the remaining FFN in expectation over uniformly routed segments (the initial loss gap is
      measured in the tests and docs/guides/upcycling.md).
    - `reinit_ratio` r (Drop-Upcycling, Nakamura et al. 2025): in every routed expert a random r of its hidden units
      (from a generator seeded by `seed`, default: drawn from torch's global RNG) are re-initialised from a normal
      with the mean and std of the dense weights, for expert diversity; with r > 0 no recipe keeps the dense
      function.

    The router is initialised as a fresh model's (normal, `initializer_range`) and the aux-free bias starts at zero.
    Config fields in `kwargs` (balance options, ...) go to the config; `dtype` etc. to loading the dense model."""
    from transformers import AutoModelForCausalLM

    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in QwenMoeGBConfig.__dataclass_fields__}
    if not 0.0 <= reinit_ratio <= 1.0:
        raise ValueError(f"reinit_ratio={reinit_ratio}: allowed 0.0..1.0")
    dense = source if isinstance(source, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(source, **kwargs)
    config = dense_moe_config(dense.config, num_experts, num_experts_per_tok, moe_intermediate_size,
                              shared_expert_intermediate_size, recipe, **fields)  # fmt: skip
    model = QwenMoeGBForCausalLM(config).to(dense.dtype).eval()
    dense_state = dense.state_dict()
    state = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    missing = set(model.load_state_dict(state, strict=False).missing_keys)
    left = [k for k in missing if ".mlp." not in k and "expert_bias" not in k and not k.endswith("lm_head.weight")]
    if left:
        raise ValueError(f"the dense checkpoint lacks {sorted(left)[:4]}: not a {dense.config.model_type} model?")
    seed = int(torch.randint(2**31 - 1, ())) if seed is None else seed  # set_seed(...) makes it reproducible
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}.mlp"
            ffn = [dense_state[f"{prefix}.{n}_proj.weight"] for n in ("gate", "up", "down")]  # (I, D), (I, D), (D, I)
            _upcycle_layer(layer.mlp, *ffn, config, recipe, reinit_ratio, generator)
    model.config._name_or_path = getattr(dense.config, "_name_or_path", "")
    return model


def _upcycle_layer(block, gate, up, down, config, recipe, reinit_ratio, generator) -> None:
    """Fill one sparse block from the dense FFN's gate (I, D), up (I, D), down (D, I) weights."""
    width, size, shared = gate.shape[0], config.moe_intermediate_size, config.shared_expert_intermediate_size
    if shared:
        block.shared_expert.gate_proj.weight.copy_(gate[:shared])  # (S, D)
        block.shared_expert.up_proj.weight.copy_(up[:shared])  # (S, D)
        factor = 2.0 if recipe == "segment" else 0.0  # segment: × 2 against sigmoid(0) = 1/2; copy: adds exactly 0
        block.shared_expert.down_proj.weight.copy_(down[:, :shared] * factor)  # (D, S)
        block.shared_expert_gate.weight.zero_()
    start = shared if recipe == "segment" and 0 < shared < width else 0
    segments = (width - start) // size
    scale = 1.0 if recipe == "copy" else (0.0 if shared == width else float(segments))
    moments = [(w.float().std(), w.float().mean()) for w in (gate, up, down)] if reinit_ratio > 0 else []
    for e in range(config.num_experts):
        units = slice(start + (e % segments) * size, start + (e % segments + 1) * size)
        expert_gate, expert_up, expert_down = gate[units].clone(), up[units].clone(), down[:, units] * scale
        if reinit_ratio > 0:
            chosen = torch.randperm(size, generator=generator)[: round(reinit_ratio * size)]
            for weight, (std, mean), dim in zip((expert_gate, expert_up, expert_down), moments, (0, 0, 1)):
                fresh = torch.randn(weight.shape, generator=generator) * std + mean
                weight.index_copy_(dim, chosen, fresh.to(weight.dtype).index_select(dim, chosen))
        block.experts.gate_up_proj[e].copy_(torch.cat([expert_gate, expert_up]))  # (2I, D)
        block.experts.down_proj[e].copy_(expert_down)  # (D, I)


# ----------------------------------------------------------------------------------------- out


def _nonzero_bias(model: QwenMoeGBForCausalLM) -> list[str]:
    return [
        f"layer {i} max |expert_bias| = {router.expert_bias.abs().max().item():.4g}"
        for i, router in zip(model.config.moe_layer_indices(), model.model.moe_routers())
        if bool(router.expert_bias.ne(0).any())
    ]


def _glm4_unrepresentable(config: QwenMoeGBConfig) -> list[str]:
    reasons = []
    if config.router_scoring_func != "sigmoid":
        reasons.append(f"router_scoring_func={config.router_scoring_func!r} (GLM-4.5-MoE's router is sigmoid)")
    if config.shared_expert_intermediate_size > 0:
        reasons.append(
            f"shared_expert_intermediate_size={config.shared_expert_intermediate_size} with its sigmoid gate "
            "(GLM-4.5-MoE's shared expert has no gate)"
        )
    if config.use_qk_norm and config.attention_bias:
        reasons.append("attention_bias=True with QK-norm (GLM-4.5-MoE's output projection has no bias)")
    if len(config.moe_layer_indices()) != config.num_hidden_layers:
        reasons.append(f"dense layers {sorted(set(range(config.num_hidden_layers)) - set(config.moe_layer_indices()))}"
                       " (GLM-4.5-MoE makes every layer MoE here)")  # fmt: skip
    if "sliding_attention" in config.layer_types[: config.num_hidden_layers]:
        reasons.append(f"layer_types={config.layer_types} (GLM-4.5-MoE has no sliding window)")
    return reasons


def needs_glm4(model: QwenMoeGBForCausalLM) -> bool:
    """Routing only DeepSeek-V3's router computes: sigmoid, a nonzero bias, group limits or routed scaling."""
    config = model.config
    return bool(
        config.router_scoring_func == "sigmoid" or _nonzero_bias(model) or config.n_group > 1
        or config.routed_scaling_factor != 1.0
    )  # fmt: skip


def unrepresentable(model: QwenMoeGBForCausalLM, to: str) -> list[str]:
    """The settings of `model` that the stock architecture `to` cannot compute exactly (empty: exportable)."""
    config = model.config
    if to == "glm4_moe":
        return _glm4_unrepresentable(config)
    reasons = []
    if config.n_group > 1:
        reasons.append(f"n_group={config.n_group} (stock Qwen MoE routers are not group-limited; glm4_moe is)")
    if config.routed_scaling_factor != 1.0:
        reasons.append(f"routed_scaling_factor={config.routed_scaling_factor} (glm4_moe scales, Qwen MoE does not)")
    if config.router_scoring_func != "softmax":
        reasons.append(f"router_scoring_func={config.router_scoring_func!r} (stock Qwen MoE routers are softmax)")
    if biased := _nonzero_bias(model):
        reasons.append(
            f"aux_free={config.aux_free} with a nonzero expert_bias ({'; '.join(biased)}): no stock Qwen MoE adds a "
            "selection-only bias (vLLM's native classes would drop it without an error)"
        )
    if to == "qwen3_moe":
        if not config.use_qk_norm:
            reasons.append("use_qk_norm=False (Qwen3-MoE always normalises queries and keys)")
        if config.shared_expert_intermediate_size > 0:
            reasons.append(
                f"use_qk_norm={config.use_qk_norm} with shared_expert_intermediate_size="
                f"{config.shared_expert_intermediate_size} (Qwen3-MoE has no shared expert, Qwen2-MoE no QK-norm)"
            )
        if "sliding_attention" in config.layer_types[: config.num_hidden_layers]:
            reasons.append(f"layer_types={config.layer_types} (Qwen3-MoE has no per-layer sliding window)")
    else:
        if config.use_qk_norm:
            reasons.append("use_qk_norm=True (Qwen2-MoE has no QK-norm; Qwen3-MoE has it)")
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            reasons.append(
                f"head_dim={config.head_dim} with hidden_size={config.hidden_size} and num_attention_heads="
                f"{config.num_attention_heads} (Qwen2-MoE's head size is hidden_size // num_attention_heads)"
            )
    return reasons


def stock_architecture(model: QwenMoeGBForCausalLM, to: str = "auto") -> str:
    """The stock model type to export to: `to`, or for `"auto"` the one that represents the model exactly (GLM-4.5-MoE
    for sigmoid, biased, group-limited or scaled routing; else Qwen3-MoE with QK-norm, Qwen2-MoE without). Raises
    `ValueError` naming every setting that the candidates cannot represent."""
    if to not in EXPORT_TARGETS:
        raise ValueError(f"to={to!r} is unknown: allowed {list(EXPORT_TARGETS)}")
    preferred = "qwen3_moe" if model.config.use_qk_norm else "qwen2_moe"
    candidates = [to] if to != "auto" else ["glm4_moe", preferred] if needs_glm4(model) else [preferred, "glm4_moe"]
    problems = {target: unrepresentable(model, target) for target in candidates}
    target = next((t for t in candidates if not problems[t]), None)
    if target is None:
        named = problems[to] if to != "auto" else [f"{t}: " + ", ".join(problems[t]) for t in candidates]
        raise ValueError(
            f"cannot export to {' or '.join(candidates)} (to={to!r}) without changing what the model computes: "
            + "; ".join(named)
            + f". {SERVE_OWN_CODE}"
        )
    return target


def stock_config(config: QwenMoeGBConfig, to: str) -> Qwen2MoeConfig | Qwen3MoeConfig:
    """The stock config of architecture `to` (checked by `stock_architecture`) with our architecture fields,
    `router_aux_loss_coef` back in transformers' units (÷ K), and our training settings under `qwenmoe_gb`."""
    config_class = STOCK[to][0]
    if to == "glm4_moe":
        return _glm4_config(config)
    fields = {k: v for k, v in config.to_dict().items() if k in config_class.__dataclass_fields__}
    for key in ("model_type", "auto_map", "architectures", "transformers_version", "layer_types"):
        fields.pop(key, None)
    fields["router_aux_loss_coef"] = config.router_aux_loss_coef / config.num_experts_per_tok
    stand_ins = []  # what Qwen2-MoE needs and the model lacks, added as zeros
    if to == "qwen3_moe":
        fields.update(head_dim=config.head_dim, attention_bias=config.attention_bias)
    else:
        stand_ins += ["shared_expert"] if config.shared_expert_intermediate_size == 0 else []
        stand_ins += [] if config.qkv_bias else ["qkv_bias"]
        fields.update(qkv_bias=True, shared_expert_intermediate_size=config.shared_expert_intermediate_size or 1)
        fields["layer_types"] = config.layer_types
    training = {k: getattr(config, k) for k in TRAINING_FIELDS}
    return config_class(**fields, qwenmoe_gb={"training": training, "stand_ins": stand_ins})


def _glm4_config(config: QwenMoeGBConfig) -> Glm4MoeConfig:
    """GLM-4.5-MoE with our architecture and routing: every layer MoE, a zero stand-in shared expert, full rotary."""
    rope = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}, partial_rotary_factor=1.0)
    training = {k: getattr(config, k) for k in TRAINING_FIELDS}
    return Glm4MoeConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, use_cache=config.use_cache, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope, attention_bias=config.attention_bias if config.use_qk_norm else config.qkv_bias,
        attention_dropout=config.attention_dropout, moe_intermediate_size=config.moe_intermediate_size,
        num_experts_per_tok=config.num_experts_per_tok, n_shared_experts=1, n_routed_experts=config.num_experts,
        routed_scaling_factor=config.routed_scaling_factor, n_group=config.n_group, topk_group=config.topk_group,
        first_k_dense_replace=0, norm_topk_prob=config.norm_topk_prob, use_qk_norm=config.use_qk_norm,
        router_aux_loss_coef=config.router_aux_loss_coef / config.num_experts_per_tok,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        qwenmoe_gb={"training": training, "stand_ins": ["shared_expert"]},
    )  # fmt: skip


def _glm4_state_dict(model: QwenMoeGBForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under GLM-4.5-MoE's names: the bias as `e_score_correction_bias`, a zero shared expert."""
    config, state = model.config, {}
    for key, value in model.state_dict().items():
        state[key.replace("mlp.gate.expert_bias", "mlp.gate.e_score_correction_bias")] = value
    like = model.model.embed_tokens.weight
    d, width = config.hidden_size, config.moe_intermediate_size
    for i in range(config.num_hidden_layers):
        shared = f"model.layers.{i}.mlp.shared_experts"
        state[f"{shared}.gate_proj.weight"] = like.new_zeros(width, d)  # (I, D)
        state[f"{shared}.up_proj.weight"] = like.new_zeros(width, d)  # (I, D)
        state[f"{shared}.down_proj.weight"] = like.new_zeros(d, width)  # (D, I): the stand-in adds exactly 0
    return state


def _stock_state_dict(model: QwenMoeGBForCausalLM, to: str) -> dict[str, torch.Tensor]:
    """Our weights under the stock model's (in-memory, fused-experts) names: the aux-free bias dropped (checked
    zero), and for Qwen2-MoE zero q/k/v biases and a zero width-1 shared expert where the model has none."""
    config = model.config
    if to == "glm4_moe":
        return _glm4_state_dict(model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("mlp.gate.expert_bias")}
    if to != "qwen2_moe":
        return state
    like = model.model.embed_tokens.weight
    d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    for i in range(config.num_hidden_layers):
        attn = f"model.layers.{i}.self_attn"
        for name, size in (("q_proj", config.num_attention_heads * config.head_dim), ("k_proj", kv), ("v_proj", kv)):
            state.setdefault(f"{attn}.{name}.bias", like.new_zeros(size))
        if i in config.moe_layer_indices() and config.shared_expert_intermediate_size == 0:
            mlp = f"model.layers.{i}.mlp"
            state[f"{mlp}.shared_expert.gate_proj.weight"] = like.new_zeros(1, d)  # (1, D)
            state[f"{mlp}.shared_expert.up_proj.weight"] = like.new_zeros(1, d)  # (1, D)
            state[f"{mlp}.shared_expert.down_proj.weight"] = like.new_zeros(d, 1)  # (D, 1)
            state[f"{mlp}.shared_expert_gate.weight"] = like.new_zeros(1, d)  # (1, D)
    return state


def to_qwen_moe(model: QwenMoeGBForCausalLM, to: str = "auto") -> Qwen2MoeForCausalLM | Qwen3MoeForCausalLM:
    """`model` as transformers' `Qwen3MoeForCausalLM` / `Qwen2MoeForCausalLM` (`stock_architecture` picks or checks
    `to`), with identical logits. The stock model shares its tensors with `model` (no copy)."""
    target = stock_architecture(model, to)
    config = stock_config(model.config, target)
    config.dtype = model.dtype
    with torch.device("meta"):
        stock = STOCK[target][1](config)
    stock.load_state_dict(_stock_state_dict(model, target), strict=True, assign=True)
    _fill_meta_buffers(stock, dict(model.named_buffers()))  # the rotary frequencies: ours
    stock.config._experts_implementation = model.config._experts_implementation
    stock.tie_weights()
    stock.generation_config = model.generation_config
    return stock.train(model.training)


def llama_cpp_notes(config: QwenMoeGBConfig, to: str, tokenizer=None) -> list[str]:
    """Where llama.cpp (GGUF) would compute or tokenize differently from transformers for this export."""
    notes = []
    if to == "glm4_moe":
        notes.append(
            "the GLM-4.5-MoE export has not been converted with llama.cpp here (vLLM and transformers are tested)"
        )
    elif bool(config.norm_topk_prob) != LLAMA_CPP_NORM_TOPK[to]:
        notes.append(
            f"llama.cpp's {to.replace('_', '')} graph {'always' if LLAMA_CPP_NORM_TOPK[to] else 'never'} "
            f"renormalises the top-k weights, but this model has norm_topk_prob={config.norm_topk_prob}: its GGUF "
            "computes something else (transformers and vLLM follow norm_topk_prob)"
        )
    if tokenizer is not None and getattr(tokenizer, "bos_token", None) == "<s>" and len(tokenizer) == 259:
        notes.append(
            "the tokenizer is QwenMoE-GB's byte tokenizer, which llama.cpp's convert_hf_to_gguf.py does not "
            "recognise (it knows published tokenizers only): a GGUF needs a model trained with one (--tokenizer)"
        )
    return notes


def _source_model(source) -> tuple[QwenMoeGBForCausalLM, Path | None]:
    if isinstance(source, QwenMoeGBForCausalLM):
        return source, None
    if hasattr(source, "merge_and_unload"):  # a PEFT model: export the merged weights
        return source.merge_and_unload(), None
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model={str(source)!r} is not a QwenMoE-GB model or checkpoint folder (no config.json)")
    return QwenMoeGBForCausalLM.from_pretrained(folder), folder


def _tokenizer(source_dir: Path | None, tokenizer):
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    name = tokenizer or (str(source_dir) if source_dir else None)
    if name is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        if tokenizer is not None:
            raise
        logger.warning("no tokenizer in %s (%s): the export has none; pass tokenizer=", source_dir, error)
        return None


def export_qwen_moe(source, out: str | Path, to: str = "auto", tokenizer=None, source_name: str | None = None) -> Path:
    """Write `source` (a `QwenMoeGBForCausalLM`, a PEFT model of one, or a checkpoint folder) to `out` as a stock
    Qwen3-MoE / Qwen2-MoE checkpoint: weights with per-expert names, config.json without `auto_map`, no code, the
    tokenizer (from the folder, or `tokenizer`: an object or a path / Hub name), the generation config and a card
    (training settings, data, evaluation, how to serve). Returns `out`."""
    from .hub import write_model_card

    model, source_dir = _source_model(source)
    stock = to_qwen_moe(model, to)
    target = stock.config.model_type
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if source_dir is not None and (source_dir / "generation_config.json").is_file():
        stock.generation_config = GenerationConfig.from_pretrained(source_dir)
    stock.save_pretrained(out)
    tok = _tokenizer(source_dir, tokenizer)
    if tok is not None:
        tok.save_pretrained(out)
    notes = llama_cpp_notes(model.config, target, tok)
    for note in notes:
        logger.warning("export to %s: %s", target, note)
    recorded = {}
    for name in ("eval.json", "data_info.json", "specialization.json"):
        if source_dir is not None and (source_dir / name).is_file():
            recorded[name] = json.loads((source_dir / name).read_text())
    if source_dir is not None and (source_dir / "expert_heatmap.png").is_file():
        shutil.copyfile(source_dir / "expert_heatmap.png", out / "expert_heatmap.png")
    data_info = recorded.get("data_info.json") or {}
    describe = ""
    if data_info:
        domains = ", ".join(data_info["domains"])
        describe = f"`{data_info['data']}` tokenized with `{data_info['tokenizer']}`; domains {domains}"
    write_model_card(
        out, model.config, recorded.get("eval.json"), recorded.get("specialization.json"), describe,
        data=data_info.get("data"), **_export_lineage(source_name, source_dir), template="stock_export_card.md",
        tags=[target], architecture_class=stock.config.architectures[0], model_type=target,
        llama_cpp="llama.cpp: " + "; ".join(notes) + "." if notes else "",
    )  # fmt: skip
    return out


def _export_lineage(source_name: str | None, source_dir: Path | None) -> dict:
    """Where an export sits in the Hub's model tree: under the QwenMoE-GB repo it was exported from (same weights,
    another format: no relation applies, the Hub infers one), else under the source run's own base model."""
    from huggingface_hub import ModelCard

    from .hub import hub_model_id

    if base := hub_model_id(source_name or (source_dir and str(source_dir))):
        return {"base_model": base}
    if source_dir is not None and (source_dir / "README.md").is_file():
        data = ModelCard.load(source_dir / "README.md").data
        if data.base_model:
            return {"base_model": data.base_model, "base_model_relation": data.get("base_model_relation")}
    return {"source": source_name or (source_dir and str(source_dir))}


__all__ = [
    "EXPORT_TARGETS",
    "dense_moe_config",
    "from_dense",
    "export_qwen_moe",
    "from_qwen_moe",
    "llama_cpp_notes",
    "qwen_moe_config",
    "stock_architecture",
    "stock_config",
    "to_qwen_moe",
    "unrepresentable",
]
