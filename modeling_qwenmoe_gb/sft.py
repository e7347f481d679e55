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
    """`trl.SFTTrainer` for QwenMoE-GB models with global-batch balance. Its model card (written on checkpoints and
    by `push_to_hub`) is the project's (`hub.write_model_card`): a LoRA adapter's names its base model
    (`base_model_relation: adapter`, library peft), a full fine-tune's its starting checkpoint (`finetune`)."""

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> None:
        if not self.is_world_process_zero():
            return
        from .hub import hub_model_id, write_model_card

        adapter = hasattr(self.model, "peft_config")
        peft = self.model.peft_config["default"] if adapter else None
        base = self.model.get_base_model() if adapter else self.model
        start = peft.base_model_name_or_path if adapter else base.config._name_or_path
        base_id = hub_model_id(start)
        modules = (peft.target_modules or []) if adapter else []
        targets = [modules] if isinstance(modules, str) else sorted(modules)  # a regex, or module names
        parameters = (peft.target_parameters or []) if adapter else []
        write_model_card(
            self.args.output_dir, base.config, None, None, f"`{dataset_name}`" if dataset_name else "",
            repo_id=self.args.hub_model_id, data=dataset_name, base_model=base_id,
            base_model_relation=("adapter" if adapter else "finetune") if base_id else None,
            source=None if base_id else start, template="adapter_card.md" if adapter else "qwenmoe_gb_card.md",
            tags=["trl", "sft", *([tags] if isinstance(tags, str) else tags or [])],
            library_name="peft" if adapter else "transformers",
            lora_targets=", ".join(f"`{t}`" for t in [*targets, *parameters]),
            balance_config=self.balancer.config, model=base,
        )  # fmt: skip


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
