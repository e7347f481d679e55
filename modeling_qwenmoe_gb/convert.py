"""Start from existing Qwen MoE checkpoints: Qwen1.5-MoE / Qwen2-MoE / Qwen3-MoE (local folder or Hub name).

`from_qwen_moe(path)` maps the checkpoint's config to a `QwenMoeGBConfig` (Qwen3: QK-norm attention, no shared
expert) and loads the weights into `QwenMoeGBForCausalLM`; the logits are identical before any training, and the
balance options can be set at the same time.

Units: transformers' `load_balancing_loss_func` scores K (`num_experts_per_tok`) at perfect balance, ours scores 1.0.
A Qwen checkpoint's `router_aux_loss_coef` is in transformers' units, so the conversion multiplies it by K: a converted
Qwen3-MoE (K = 8, coefficient 0.001) trains with coefficient 0.008 here, the same balance strength as its recipe. A
`router_aux_loss_coef` passed to the conversion is taken in our units, unchanged.
"""

import logging

from transformers import AutoConfig

from .configuration_qwenmoe_gb import QwenMoeGBConfig
from .modeling_qwenmoe_gb import QwenMoeGBForCausalLM

SUPPORTED = ("qwen2_moe", "qwen3_moe", "qwenmoe_gb")
TRANSFORMERS_UNITS = ("qwen2_moe", "qwen3_moe")  # model types whose router_aux_loss_coef is in transformers' units

logger = logging.getLogger(__name__)


def qwen_moe_config(source, **balance) -> QwenMoeGBConfig:
    """A `QwenMoeGBConfig` with the architecture of a Qwen2-MoE / Qwen3-MoE config (object, path or Hub name); its
    `router_aux_loss_coef` converted to our units (× K) unless `balance` gives one."""
    config = source if not isinstance(source, str) else AutoConfig.from_pretrained(source)
    if config.model_type not in SUPPORTED:
        raise ValueError(f"model_type={config.model_type!r} cannot be converted: allowed {list(SUPPORTED)}")
    fields = config.to_dict()
    for alias, stored in getattr(config, "attribute_map", {}).items():  # e.g. Qwen3: num_experts -> num_local_experts
        fields[alias] = getattr(config, alias)
        fields.pop(stored, None)
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        fields.pop(key, None)
    if config.model_type == "qwen3_moe":
        fields.update(use_qk_norm=True, qkv_bias=False, shared_expert_intermediate_size=0)
    if config.model_type in TRANSFORMERS_UNITS and "router_aux_loss_coef" not in balance:
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
    return QwenMoeGBForCausalLM.from_pretrained(source, config=qwen_moe_config(source, **balance), **kwargs)
