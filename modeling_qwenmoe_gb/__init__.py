"""QwenMoE-GB: Mixture-of-Experts language models for transformers with global-batch load balancing.

Importing the package registers `qwenmoe_gb` with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, and marks the
classes for Hub custom code, so `save_pretrained` writes `auto_map` and the two Hub files.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_qwenmoe_gb import QwenMoeGBConfig
from .modeling_qwenmoe_gb import (
    QwenMoeGBForCausalLM,
    QwenMoeGBGenerateOutput,
    QwenMoeGBModel,
    QwenMoeGBPreTrainedModel,
    RouterStats,
    RoutingRecorder,
    balance_loss,
    device_balance_loss,
    group_sequences,
    router_statistics,
    router_z_loss,
    switch_balance_loss,
)
from .presets import PRESETS, load_preset

__version__ = "0.1.0"

AutoConfig.register("qwenmoe_gb", QwenMoeGBConfig, exist_ok=True)
AutoModel.register(QwenMoeGBConfig, QwenMoeGBModel, exist_ok=True)
AutoModelForCausalLM.register(QwenMoeGBConfig, QwenMoeGBForCausalLM, exist_ok=True)
QwenMoeGBConfig.register_for_auto_class("AutoConfig")
QwenMoeGBModel.register_for_auto_class("AutoModel")
QwenMoeGBForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PRESETS",
    "QwenMoeGBConfig",
    "QwenMoeGBForCausalLM",
    "QwenMoeGBGenerateOutput",
    "QwenMoeGBModel",
    "QwenMoeGBPreTrainedModel",
    "RouterStats",
    "RoutingRecorder",
    "balance_loss",
    "device_balance_loss",
    "group_sequences",
    "load_preset",
    "router_statistics",
    "router_z_loss",
    "switch_balance_loss",
]
