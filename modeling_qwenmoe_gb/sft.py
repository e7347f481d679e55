"""Supervised fine-tuning with TRL and PEFT, with global-batch balance.

Features
- `QwenMoeGBSFTTrainer`: TRL's `SFTTrainer` with the `GlobalBalanceMixin` (balance loss at the configured scope, the
  scale rule, aux-free updates, balance metrics); TRL's own aux-loss path is bypassed so nothing is counted twice.
- `lora_config(...)`: a PEFT LoRA config on attention and the fused experts (`target_parameters`), with the router
  trainable (`modules_to_save`) or frozen.

Needs `pip install trl peft` (the `sft` extra).
"""

from __future__ import annotations

from trl import SFTTrainer

from .trainer import GlobalBalanceMixin

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


class QwenMoeGBSFTTrainer(GlobalBalanceMixin, SFTTrainer):
    """`trl.SFTTrainer` for QwenMoE-GB models with global-batch balance."""


def lora_config(rank: int = 8, alpha: int = 16, train_router: bool = True, experts: bool = True):
    """LoRA on the attention projections and (optionally) the fused expert weights; the router fully trainable
    (`train_router=True`, saved with the adapter) or frozen."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=ATTENTION_MODULES,
        target_parameters=EXPERT_PARAMETERS if experts else None,
        modules_to_save=["gate"] if train_router else None,
        task_type="CAUSAL_LM",
    )
