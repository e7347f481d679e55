"""`QwenMoeGBTrainer`: transformers' Trainer with global-batch load balancing.

Features
- `compute_loss` runs the model with `add_balance_loss=False`, adds the `GlobalBalancer` loss (global scope: counts
  all-reduced over data-parallel ranks and buffered over the step's accumulation micro-steps) with the same gradient
  scale as the micro-batch loss, whatever the world size or the number of accumulation steps.
- `BalanceCallback.on_pre_optimizer_step` updates the aux-free biases and resets the count buffer once per step.
- Balance metrics in the Trainer logs (TensorBoard / W&B via `report_to`, `state.log_history`) and an expert-load
  heatmap image in TensorBoard; the console line shows the means over layers, not each layer.
- `train_batch_sampler`: a batch sampler (e.g. `data.DomainBatchSampler`, domain-pure micro-batches) used for the
  training DataLoader; accelerate deals its batches round-robin to the ranks.
- Resuming (`resume_from_checkpoint`) and `load_best_model_at_end` restore the fused expert weights, which the stock
  Trainer's raw `load_state_dict` on the per-expert checkpoint files leaves untouched (transformers#48805).

Scale rule, in the Trainer's two modes:
- `num_items_in_batch` given (the model accepts loss kwargs): CE is a sum over the step's tokens divided by the
  global token count, the Trainer neither divides by the accumulation steps nor lets DDP's mean stand (it multiplies
  by the world size). The balance loss, a per-micro-batch mean, is divided by the accumulation steps here and left to
  DDP's mean over ranks.
- otherwise: CE and balance loss are both per-micro-batch means; the Trainer divides by the accumulation steps.
(transformers' own MoE aux loss is multiplied by the world size and not divided by the accumulation steps.)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .balance import GlobalBalancer
from .configuration_qwenmoe_gb import BALANCE_SCOPES

# Collator outputs of fine-tuning libraries (TRL) that are masks for their own losses, not model inputs.
EXTRA_COLLATOR_KEYS = ("completion_mask", "assistant_masks")


class BalanceCallback(TrainerCallback):
    """Updates the aux-free biases and resets the step buffer after all micro-steps, before `optimizer.step()`."""

    def __init__(self, balancer: GlobalBalancer):
        self.balancer = balancer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.balancer.step()


def console_logs(logs: dict) -> dict:
    """The logs without per-layer entries (`balance/<metric>/layer_<i>`): the console shows the means, while
    `state.log_history` (log_history.json) and TensorBoard / W&B keep every layer."""
    return {k: v for k, v in logs.items() if "/layer_" not in k}


class ConsoleProgressCallback(ProgressCallback):
    """transformers' progress bar, printing `console_logs(logs)`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


class ConsolePrinterCallback(PrinterCallback):
    """transformers' printer (`disable_tqdm=True`), printing `console_logs(logs)`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


class SwitchScopeCallback(TrainerCallback):
    """Switches `balance_scope` at a given optimizer step (paper Table 3: micro → global mid-training)."""

    def __init__(self, model, step: int, scope: str | None):
        if scope not in BALANCE_SCOPES:  # fail before training, not at the switch
            raise ValueError(f"switch_scope_to={scope!r} is unknown: allowed {list(BALANCE_SCOPES)}")
        self.config, self.step, self.scope = model.config, step, scope

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.config.balance_scope = self.scope
            self.config.validate_balance()


class GlobalBalanceMixin:
    """Global-batch balancing for any `transformers.Trainer` subclass (put it first: `class T(GlobalBalanceMixin,
    SFTTrainer)`): the balancer, its callback, the loss with the scale rule, metrics, fused-expert restore.

    Extra args:
        balance_sync_group_size: all-reduce expert counts only within groups of this many ranks (default: all).
        train_batch_sampler: batch sampler of the training DataLoader (default: the Trainer's own sampler).
        bias_update: when aux-free biases move, `"global"` (per optimizer step) or `"micro"` (per micro-batch).
    """

    def __init__(
        self,
        *args: Any,
        balance_sync_group_size: int | None = None,
        train_batch_sampler: Sampler | None = None,
        bias_update: str = "global",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if getattr(self.model.config, "output_router_logits", False):  # e.g. set by TRL; we never need the logits
            self.model.config.output_router_logits = False
        self.balancer = GlobalBalancer(self.model, sync_group_size=balance_sync_group_size, bias_update=bias_update)
        self.add_callback(BalanceCallback(self.balancer))
        consoles = {ProgressCallback: ConsoleProgressCallback, PrinterCallback: ConsolePrinterCallback}
        for callback in list(self.callback_handler.callbacks):
            if type(callback) in consoles:  # the stock classes only: a user's own printer stays
                self.callback_handler.remove_callback(callback)
                self.add_callback(consoles[type(callback)])
        self.train_batch_sampler = train_batch_sampler
        self._ce_sum, self._ce_steps = 0.0, 0  # the sum becomes a tensor on the loss's device at the first micro-step

    def get_train_dataloader(self) -> DataLoader:
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )
        return self.accelerator.prepare(loader)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The stock save, with the training arguments as JSON instead of a pickled `training_args.bin`, so a saved
        model folder holds no pickle (weights are safetensors; optimizer / RNG states stay in checkpoint-* only)."""
        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # only the main process writes
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        pickled = os.path.join(output_dir, "training_args.bin")
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())

    def _restore_weights(self, checkpoint: str) -> bool:
        """Load a saved checkpoint into `self.model` through `from_pretrained` (which converts the per-expert Hub
        layout back to fused experts). Returns False where the stock path must run (FSDP, DeepSpeed, PEFT)."""
        has_weights = any(
            os.path.isfile(os.path.join(checkpoint, f)) for f in ("model.safetensors", "model.safetensors.index.json")
        )
        if not has_weights or self.is_fsdp_enabled or self.is_deepspeed_enabled or hasattr(self.model, "peft_config"):
            return False
        saved = type(self.model).from_pretrained(checkpoint, dtype=self.model.dtype)
        self.model.load_state_dict(saved.state_dict())
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is not None and model is not self.model or not self._restore_weights(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._restore_weights(self.state.best_model_checkpoint):
            super()._load_best_model()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        kwargs = {"num_items_in_batch": num_items_in_batch} if scaled_for_ga else {}
        inputs = {k: v for k, v in inputs.items() if k not in EXTRA_COLLATOR_KEYS}
        outputs = model(**inputs, add_balance_loss=False, **kwargs)
        loss = outputs.loss
        if scaled_for_ga and self.args.average_tokens_across_devices:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if model.training and torch.is_grad_enabled():
            steps = self.current_gradient_accumulation_steps
            ce = (loss.detach() if scaled_for_ga else loss.detach() / steps).double()
            self._ce_sum = self._ce_sum + ce  # stays on the device: no host sync per micro-step
            self._ce_steps += 1 / steps
            balance, _ = self.balancer(outputs.router_stats)
            if scaled_for_ga:
                balance = balance / steps
            loss = loss + balance.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add CE alone and the balance metrics of the steps since the last one
            if self._ce_steps:
                ce = self._ce_sum.to(self.args.device) / round(self._ce_steps)
                logs["ce_loss"] = float(self.accelerator.reduce(ce, reduction="mean"))
                self._ce_sum, self._ce_steps = 0.0, 0
            logs.update(self.balancer.pop_metrics())
            self._log_expert_load_image()
        super().log(logs, start_time)

    def _log_expert_load_image(self) -> None:
        load = self.balancer.last_step_load
        if load is None or not self.is_world_process_zero():
            return
        for callback in self.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
            if writer is not None:
                image = (load / load.max().clamp_min(1e-12)).float()  # (L, E) in [0, 1]
                writer.add_image("balance/expert_load", image, self.state.global_step, dataformats="HW")


class QwenMoeGBTrainer(GlobalBalanceMixin, Trainer):
    """`transformers.Trainer` for QwenMoE-GB models (see `GlobalBalanceMixin` for the extra args)."""


__all__ = [
    "BalanceCallback",
    "ConsolePrinterCallback",
    "ConsoleProgressCallback",
    "GlobalBalanceMixin",
    "QwenMoeGBTrainer",
    "SwitchScopeCallback",
    "console_logs",
]
