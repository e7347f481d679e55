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
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from .configuration_qwenmoe_gb import QwenMoeGBConfig
from .modeling_qwenmoe_gb import QwenMoeGBForCausalLM, QwenMoeGBSparseMoeBlock

SUPPORTED = ("qwen2_moe", "qwen3_moe", "qwenmoe_gb")
TRANSFORMERS_UNITS = ("qwen2_moe", "qwen3_moe")  # model types whose router_aux_loss_coef is in transformers' units
STOCK = {"qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM), "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM)}
EXPORT_TARGETS = ("auto", *STOCK)
# The training settings an export keeps in its config.json (key `qwenmoe_gb`, ignored by transformers and the
# engines), so that `from_qwen_moe` gives back the model as it was trained.
TRAINING_FIELDS = (
    "balance_scope", "balance_group_size", "micro_balance_coef", "device_balance_groups", "device_balance_coef",
    "router_z_loss_coef", "aux_free", "aux_free_bias_update_rate", "router_aux_loss_coef", "loss_implementation",
    "loss_chunk_size",
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
    model = QwenMoeGBForCausalLM.from_pretrained(source, config=qwen_moe_config(source, **balance), **kwargs)
    recorded = getattr(AutoConfig.from_pretrained(source), "qwenmoe_gb", None) or {}
    _drop_stand_ins(model, recorded.get("stand_ins", []))
    return model


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


# ----------------------------------------------------------------------------------------- out


def _nonzero_bias(model: QwenMoeGBForCausalLM) -> list[str]:
    return [
        f"layer {i} max |expert_bias| = {router.expert_bias.abs().max().item():.4g}"
        for i, router in zip(model.config.moe_layer_indices(), model.model.moe_routers())
        if bool(router.expert_bias.ne(0).any())
    ]


def unrepresentable(model: QwenMoeGBForCausalLM, to: str) -> list[str]:
    """The settings of `model` that the stock architecture `to` cannot compute exactly (empty: exportable)."""
    config = model.config
    reasons = []
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
    """The stock model type to export to: `to`, or for `"auto"` the one that represents the model exactly (Qwen3-MoE
    with QK-norm, else Qwen2-MoE). Raises `ValueError` naming every setting it cannot represent."""
    if to not in EXPORT_TARGETS:
        raise ValueError(f"to={to!r} is unknown: allowed {list(EXPORT_TARGETS)}")
    target = ("qwen3_moe" if model.config.use_qk_norm else "qwen2_moe") if to == "auto" else to
    if reasons := unrepresentable(model, target):
        raise ValueError(
            f"cannot export to {target} (to={to!r}) without changing what the model computes: "
            + "; ".join(reasons)
            + f". {SERVE_OWN_CODE}"
        )
    return target


def stock_config(config: QwenMoeGBConfig, to: str) -> Qwen2MoeConfig | Qwen3MoeConfig:
    """The stock config of architecture `to` (checked by `stock_architecture`) with our architecture fields,
    `router_aux_loss_coef` back in transformers' units (÷ K), and our training settings under `qwenmoe_gb`."""
    config_class = STOCK[to][0]
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


def _stock_state_dict(model: QwenMoeGBForCausalLM, to: str) -> dict[str, torch.Tensor]:
    """Our weights under the stock model's (in-memory, fused-experts) names: the aux-free bias dropped (checked
    zero), and for Qwen2-MoE zero q/k/v biases and a zero width-1 shared expert where the model has none."""
    config = model.config
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
    ours = dict(model.named_buffers())
    for name, buffer in list(stock.named_buffers()):  # non-persistent buffers (rotary frequencies): ours
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(stock.get_submodule(owner), attr, ours[name])
    stock.config._experts_implementation = model.config._experts_implementation
    stock.tie_weights()
    stock.generation_config = model.generation_config
    return stock.train(model.training)


def llama_cpp_notes(config: QwenMoeGBConfig, to: str, tokenizer=None) -> list[str]:
    """Where llama.cpp (GGUF) would compute or tokenize differently from transformers for this export."""
    notes = []
    if bool(config.norm_topk_prob) != LLAMA_CPP_NORM_TOPK[to]:
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
    "export_qwen_moe",
    "from_qwen_moe",
    "llama_cpp_notes",
    "qwen_moe_config",
    "stock_architecture",
    "stock_config",
    "to_qwen_moe",
    "unrepresentable",
]
