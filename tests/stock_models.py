"""Tiny configs of the MoE models transformers ships, built from their own config classes (no downloads), for the
tests of `modeling_qwenmoe_gb.any_moe`: every family whose router and experts the balancer reads."""

from __future__ import annotations

import importlib

import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 96
EXPERTS, TOP_K = 8, 2
# The same small shape for every family; a field is set only where the family's config has it.
SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=EXPERTS, n_routed_experts=EXPERTS,
    num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=128, kv_lora_rank=16,
    q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=0, n_group=2,
    topk_group=1, shared_expert_intermediate_size=32, n_shared_experts=1, decoder_sparse_step=1, mlp_only_layers=[],
    expert_intermediate_size=32, moe_topk=TOP_K, num_shared_experts=1, pad_token_id=0, initializer_range=0.2,
)  # fmt: skip
# Fields a family needs beyond SHAPE for its tiny model to have routed layers.
FAMILY_FIELDS = {
    "beam": {"mlp_layer_types": ["sparse", "sparse"]},  # the default makes the first layers dense
    "deepseek_v4": {"mlp_layer_types": ["moe", "moe"]},  # the default's first layers route by token hash
}
# Families the tests cover by name (the ones the issue names first); `covered_families()` adds every other one that
# builds from SHAPE and whose router and experts the balancer reads.
NAMED = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "gpt_oss", "deepseek_v3", "glm4_moe")


def causal_lm_class(model_type: str):
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def tiny_config(model_type: str, **overrides):
    """The family's own config class at the tiny shape (the text config of a composite one), built with the fields as
    arguments, so that derived fields follow."""
    default = CONFIG_MAPPING[model_type]()
    if not hasattr(default, "vocab_size") and hasattr(default, "text_config"):
        default = default.text_config
    fields = {**SHAPE, **FAMILY_FIELDS.get(model_type, {})}
    if hasattr(default, "qk_rope_head_dim"):  # multi-head latent attention: rotary on part of a head, no GQA
        fields.update(head_dim=fields["qk_rope_head_dim"], num_key_value_heads=fields["num_attention_heads"])
    fields.update(overrides)
    kwargs = {k: v for k, v in fields.items() if hasattr(default, k)}
    layer_types = getattr(default, "layer_types", None)
    settable = "layer_types" in getattr(type(default), "__dataclass_fields__", {})
    if settable and isinstance(layer_types, list) and "layer_types" not in overrides:
        kwargs["layer_types"] = layer_types[: kwargs.get("num_hidden_layers", len(layer_types))]
    return type(default)(**kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = causal_lm_class(model_type)(config)
    return model.float()


def available(model_type: str) -> bool:
    return model_type in CONFIG_MAPPING and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
