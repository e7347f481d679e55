"""`QwenMoeGBTrainer`: transformers' Trainer with global-batch load balancing.

Features
- For QwenMoE-GB models and for any transformers MoE whose router and experts the balancer reads (`any_moe`:
  Qwen2/3-MoE, OLMoE, Mixtral, GPT-OSS, DeepSeek-V3, GLM-4.5, ...), trained as they are; the balance options are
  trainer arguments with the config's names (`balance_scope=`, `router_aux_loss_coef=`, `aux_free=`, ...).
- `compute_loss` runs the model with `add_balance_loss=False`, adds the `GlobalBalancer` loss (global scope: counts
  all-reduced over data-parallel ranks and buffered over the step's accumulation micro-steps) with the same gradient
  scale as the micro-batch loss, whatever the world size or the number of accumulation steps.
- `BalanceCallback.on_pre_optimizer_step` updates the aux-free biases and resets the count buffer once per step.
- Balance metrics in the Trainer logs (TensorBoard / W&B via `report_to`, `state.log_history`) and an expert-load
  heatmap image in TensorBoard; the console line shows the means over layers, not each layer.
- `train_batch_sampler`: a batch sampler (e.g. `data.DomainBatchSampler`, domain-pure micro-batches) used for the
  training DataLoader; accelerate deals its batches round-robin to the ranks. A seekable one resumes at its recorded
  position in O(1) (`data_state.json` in each checkpoint; a resume on changed data is refused, `allow_data_change`).
- Resuming (`resume_from_checkpoint`) and `load_best_model_at_end` restore the fused expert weights, which the stock
  Trainer's raw `load_state_dict` on the per-expert checkpoint files leaves untouched (transformers#48805), and the
  balancer's metric sums and the CE sums (`balance_state_rank<r>.pt`), so a resumed run logs what an uninterrupted one
  does.
- Models sharded at load time by transformers' engine (`from_pretrained(distributed_config=...)`: FSDP2, HSDP, TP,
  EP), which the stock Trainer checkpoints only without optimizer state: checkpoints hold the model and the optimizer
  as `torch.distributed.checkpoint` shards (`dcp_model/`, `dcp_optimizer/`; each rank writes its own, transformers'
  `save_pretrained(distributed_checkpoint=True)` / `save_optimizer_distributed`), the scheduler, the RNG states and
  the balance state, and `resume_from_checkpoint` continues from them, also on another layout where DCP can reshard.

Scale rule, in the Trainer's two modes:
- `num_items_in_batch` given (the model accepts loss kwargs): CE is a sum over the step's tokens divided by the
  global token count, the Trainer neither divides by the accumulation steps nor lets DDP's mean stand (it multiplies
  by the world size). The balance loss, a per-micro-batch mean, is divided by the accumulation steps here and left to
  DDP's mean over ranks.
- otherwise: CE and balance loss are both per-micro-batch means; the Trainer divides by the accumulation steps.
(transformers' own MoE aux loss is multiplied by the world size and not divided by the accumulation steps.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .any_moe import BALANCE_OPTIONS
from .balance import GlobalBalancer
from .configuration_qwenmoe_gb import BALANCE_SCOPES
from .data.formats import write_json_atomic
from .data.sampler import DATA_STATE_FILE, check_data_state

# Collator outputs of fine-tuning libraries (TRL) that are masks for their own losses, not model inputs.
EXTRA_COLLATOR_KEYS = ("completion_mask", "assistant_masks")
DCP_MODEL_DIR = "dcp_model"  # model shards of a checkpoint of a model sharded at load time
DCP_OPTIMIZER_DIR = "dcp_optimizer"  # optimizer shards of the same
SCHEDULER_FILE = "scheduler.pt"  # transformers' name
BALANCE_STATE_FILE = "balance_state_rank{rank}.pt"


def _scheduler_for_groups(state: dict, num_groups: int) -> dict:
    """A saved LR-scheduler state for `num_groups` parameter groups. The optimizer's groups can change with the layout
    (transformers groups parameters per device mesh); the Trainer's schedule is the same for every group, so a state
    whose groups all agree is repeated for the new count."""
    per_group = [k for k in ("base_lrs", "_last_lr", "lr_lambdas") if isinstance(state.get(k), list)]
    if not per_group or len(state[per_group[0]]) == num_groups:
        return state
    if any(any(v != state[k][0] for v in state[k]) for k in per_group):
        raise ValueError(
            f"the checkpoint's LR scheduler has {len(state[per_group[0]])} parameter groups with different schedules "
            f"and the optimizer now has {num_groups}: allowed a layout with the same groups, or equal schedules"
        )
    return {**state, **{k: [state[k][0]] * num_groups for k in per_group}}


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


class _EpochAfterSeek(TrainerCallback):
    """After a resume that seeked the batch stream (the Trainer then counts the resumed epoch's micro-steps from 0),
    sets `state.epoch` to what the uninterrupted run has at the same step: optimizer steps × accumulation / the
    loader's length."""

    def __init__(self, trainer: DomainBatchesMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._seek is not None and self.trainer._loader_length:
            state.epoch = state.global_step * args.gradient_accumulation_steps / self.trainer._loader_length


class DomainBatchesMixin:
    """A `transformers.Trainer` whose training DataLoader takes its batches from `train_batch_sampler` (e.g.
    `data.DomainBatchSampler`: domain-pure micro-batches mixed by recipe weights); accelerate deals them round-robin
    to the ranks. Without one, the Trainer's own sampler.

    A sampler that can start anywhere (a `start` attribute and a `batch(j)` method, as `DomainBatchSampler`) is not
    replayed on resume: every checkpoint records the stream's position and `data_identity` (`data_state.json`), and a
    resume starts the sampler there — O(1) in the step, two resumes in a row included — after checking that the data
    is the same (`allow_data_change=True` continues at the same position on other data).
    """

    def __init__(
        self,
        *args: Any,
        train_batch_sampler: Sampler | None = None,
        data_identity: dict | None = None,
        allow_data_change: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.train_batch_sampler = train_batch_sampler
        self.data_identity, self.allow_data_change = data_identity or {}, allow_data_change
        self._seek: tuple[int | None, int] | None = None  # (first micro-batch, the step it follows) after a resume
        self._loader_length = self._micro_batches_per_step = 0
        if self._seekable:
            self.args.ignore_data_skip = True  # the position is restored by seeking, not by replaying batches
            self.add_callback(_EpochAfterSeek(self))

    @property
    def _seekable(self) -> bool:
        return hasattr(self.train_batch_sampler, "start") and hasattr(self.train_batch_sampler, "batch")

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
        prepared = self.accelerator.prepare(loader)
        shards = getattr(prepared.batch_sampler, "num_processes", 1)  # accelerate's round-robin over the ranks
        self._loader_length = len(prepared)
        self._micro_batches_per_step = self.args.gradient_accumulation_steps * shards
        if self._seek is not None and self._seek[0] is None:  # a checkpoint without data_state.json: its step's place
            self._seek = (self._seek[1] * self._micro_batches_per_step, self._seek[1])
            self.train_batch_sampler.start = self._seek[0]
        return prepared

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if self._seekable:
            if resume_from_checkpoint is True:  # as the Trainer reads it: the last checkpoint of output_dir
                from transformers.trainer_utils import get_last_checkpoint

                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            self._seek = None
            self.train_batch_sampler.start = 0
            if resume_from_checkpoint:
                self._seek = self._stream_position(resume_from_checkpoint)
                self.train_batch_sampler.start = self._seek[0] or 0
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _stream_position(self, checkpoint: str) -> tuple[int | None, int]:
        """(the first micro-batch to train on, the step it follows) after `checkpoint`: its `data_state.json` (checked
        against `data_identity`); for a checkpoint without one, (None, step): where the uninterrupted stream is at
        that step, set once the loader's shape is known (`get_train_dataloader`)."""
        saved = read_data_state(checkpoint)
        if saved is None:
            with open(os.path.join(checkpoint, "trainer_state.json")) as f:
                return None, json.load(f)["global_step"]
        check_data_state(saved, self.data_identity, self.allow_data_change, where=checkpoint)
        return saved["consumed_micro_batches"], saved["global_step"]

    def _save_rng_state(self, output_dir: str) -> None:
        """The RNG states (the Trainer's) and, with a seekable sampler, the stream's position (`data_state.json`,
        written before `trainer_state.json`, which completes a checkpoint)."""
        super()._save_rng_state(output_dir)
        if not self._seekable or not self.args.should_save:
            return
        start, start_step = self._seek or (0, 0)
        consumed = start + (self.state.global_step - start_step) * self._micro_batches_per_step
        state = {"consumed_micro_batches": consumed, "global_step": self.state.global_step, **self.data_identity}
        write_json_atomic(Path(output_dir) / DATA_STATE_FILE, state)


def read_data_state(checkpoint: str | os.PathLike) -> dict | None:
    """A checkpoint's `data_state.json` (the batch stream's position and identity), or None."""
    path = os.path.join(checkpoint, DATA_STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class GlobalBalanceMixin(DomainBatchesMixin):
    """Global-batch balancing for any `transformers.Trainer` subclass (put it first: `class T(GlobalBalanceMixin,
    SFTTrainer)`): the balancer, its callback, the loss with the scale rule, metrics, fused-expert restore. The model
    is a QwenMoE-GB model or any transformers MoE whose router and experts the balancer reads (`any_moe`), trained as
    it is (its own aux loss off: the balancer adds the balance loss).

    Extra args:
        balance_scope, router_aux_loss_coef, balance_group_size, micro_balance_coef, device_balance_groups,
            device_balance_coef, router_z_loss_coef, aux_free, aux_free_bias_update_rate (and router_scoring_func):
            the balance options, named as `QwenMoeGBConfig`'s fields (see `GlobalBalancer`); unset ones keep the
            QwenMoE-GB model's config, or the defaults for another model.
        balance_sync_group_size: all-reduce expert counts only within groups of this many ranks (default: all).
        train_batch_sampler: batch sampler of the training DataLoader (default: the Trainer's own sampler).
        data_identity, allow_data_change: what a checkpoint records of the data, and whether a resume may change it
            (`DomainBatchesMixin`).
        bias_update: when aux-free biases move, `"global"` (per optimizer step) or `"micro"` (per micro-batch).
    """

    def __init__(
        self,
        *args: Any,
        balance_sync_group_size: int | None = None,
        bias_update: str = "global",
        **kwargs: Any,
    ):
        balance_options = {k: kwargs.pop(k) for k in BALANCE_OPTIONS if k in kwargs}
        model = kwargs.get("model", args[0] if args else None)
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        sharded = bool(getattr(model, "is_distributed_loading_by_transformers", False))
        full_checkpoints = (
            sharded and train_args is not None and train_args.save_strategy != "no" and not train_args.save_only_model
        )
        if full_checkpoints:  # the stock Trainer refuses optimizer state for such models; ours writes it with DCP
            train_args.save_only_model = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if full_checkpoints:
                train_args.save_only_model = False
        if getattr(self.model.config, "output_router_logits", False):  # e.g. set by TRL; we never need the logits
            self.model.config.output_router_logits = False
        self.balancer = GlobalBalancer(
            self.model,
            sync_group_size=balance_sync_group_size,
            bias_update=bias_update,
            compile=self.args.torch_compile,
            **balance_options,
        )
        self.add_callback(BalanceCallback(self.balancer))
        consoles = {ProgressCallback: ConsoleProgressCallback, PrinterCallback: ConsolePrinterCallback}
        for callback in list(self.callback_handler.callbacks):
            if type(callback) in consoles:  # the stock classes only: a user's own printer stays
                self.callback_handler.remove_callback(callback)
                self.add_callback(consoles[type(callback)])
        self._ce_sum, self._ce_steps = 0.0, 0  # the sum becomes a tensor on the loss's device at the first micro-step

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
        if self.is_distributed_loading_by_transformers:  # the Trainer's flag: sharded at load
            from transformers.distributed.checkpoint import _load_model_checkpoint_distributed, is_sharded_checkpoint

            shards = os.path.join(resume_from_checkpoint, DCP_MODEL_DIR)
            if not is_sharded_checkpoint(shards):
                raise ValueError(
                    f"resume_from_checkpoint={resume_from_checkpoint!r} holds no sharded model state "
                    f"({DCP_MODEL_DIR}/): allowed checkpoints written by QwenMoeGBTrainer for a model loaded with "
                    "distributed_config"
                )
            _load_model_checkpoint_distributed(self.model, shards)
            return
        if model is not None and model is not self.model or not self._restore_weights(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_distributed_loading_by_transformers:  # the Trainer's flag: sharded at load
            from transformers.distributed.checkpoint import save_optimizer_distributed

            self.model.save_pretrained(os.path.join(output_dir, DCP_MODEL_DIR), distributed_checkpoint=True)
            save_optimizer_distributed(self.model, self.optimizer, os.path.join(output_dir, DCP_OPTIMIZER_DIR))
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))
        else:
            super()._save_optimizer_and_scheduler(output_dir)
        state = {"balancer": self.balancer.state_dict(), "ce_sum": self._ce_sum, "ce_steps": self._ce_steps}
        os.makedirs(output_dir, exist_ok=True)  # every rank writes its own file, maybe before rank 0 made the folder
        torch.save(state, os.path.join(output_dir, BALANCE_STATE_FILE.format(rank=self.args.process_index)))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self.is_distributed_loading_by_transformers:  # the Trainer's flag: sharded at load
            from transformers.distributed.checkpoint import load_optimizer_distributed

            load_optimizer_distributed(self.model, self.optimizer, os.path.join(checkpoint, DCP_OPTIMIZER_DIR))
            scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_FILE), weights_only=True)
            self.lr_scheduler.load_state_dict(_scheduler_for_groups(scheduler, len(self.optimizer.param_groups)))
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, BALANCE_STATE_FILE.format(rank=self.args.process_index))
        if os.path.isfile(path):  # absent: a checkpoint of an older version, or of a run with fewer ranks
            state = torch.load(path, weights_only=False)
            self.balancer.load_state_dict(state["balancer"])
            self._ce_sum, self._ce_steps = state["ce_sum"], state["ce_steps"]

    def _load_best_model(self):
        if not self._restore_weights(self.state.best_model_checkpoint):
            super()._load_best_model()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        kwargs = {"num_items_in_batch": num_items_in_batch} if scaled_for_ga else {}
        inputs = {k: v for k, v in inputs.items() if k not in EXTRA_COLLATOR_KEYS}
        if self.balancer.moe_model.native:  # ours adds its micro-scope losses unless told not to
            kwargs["add_balance_loss"] = False
        outputs = model(**inputs, **kwargs)
        loss = outputs.loss
        if scaled_for_ga and self.args.average_tokens_across_devices:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if model.training and torch.is_grad_enabled():
            steps = self.current_gradient_accumulation_steps
            ce = (loss.detach() if scaled_for_ga else loss.detach() / steps).double()
            self._ce_sum = self._ce_sum + ce  # stays on the device: no host sync per micro-step
            self._ce_steps += 1 / steps
            balance, _ = self.balancer(self.balancer.router_stats(outputs))
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


class DomainBatchTrainer(DomainBatchesMixin, Trainer):
    """`transformers.Trainer` on the same domain-pure batches, for models without routers (dense baselines)."""


__all__ = [
    "BalanceCallback",
    "DomainBatchTrainer",
    "DomainBatchesMixin",
    "ConsolePrinterCallback",
    "ConsoleProgressCallback",
    "GlobalBalanceMixin",
    "QwenMoeGBTrainer",
    "SwitchScopeCallback",
    "console_logs",
    "read_data_state",
]
