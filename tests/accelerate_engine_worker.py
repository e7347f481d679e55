"""Worker for the tests of `QwenMoeGBTrainer` under DeepSpeed ZeRO-2 / ZeRO-3 and accelerate's FSDP2 on 2 gloo
processes, launched as users launch: `accelerate launch --config_file configuration/accelerate/<engine>.yaml
--num_processes 2 tests/accelerate_engine_worker.py OUT_DIR ENGINE` (ENGINE: deepspeed_zero2, deepspeed_zero3,
deepspeed_zero3_offload, fsdp): the engine comes from the shipped config through accelerate's environment, and the
Trainer's flags are what `qwenmoe-gb pretrain` sets on a machine without GPUs (`cpu_launch_flags`).

Every case loads OUT_DIR/ckpt (so every engine starts from the same weights) and writes what the rank saw to
OUT_DIR/<engine>_<case>_rank<r>.pt; the parent test computes the one-process references and compares.

accelerate runs FSDP as DDP on CPU (its state only picks FSDP for accelerator devices); `cpu_fsdp()` lets its FSDP2
path (`fully_shard` per decoder layer, full-state-dict saving) run on gloo here, as it runs on GPUs.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM  # noqa: E402
from modeling_qwenmoe_gb.pretraining import cpu_launch_flags  # noqa: E402
from modeling_qwenmoe_gb.trainer import QwenMoeGBTrainer  # noqa: E402
from tests.dist_common import MICRO, batch_for, full, resume_dataset, router_biases  # noqa: E402

WORLD = 2
# case -> (balance scope, accumulation steps, aux-free, aux-free method)
STEP_CASES = {
    f"{scope}_accum{accumulation}{'_auxfree' if aux_free else ''}": (scope, accumulation, aux_free, "sign")
    for scope in ("micro", "global")
    for accumulation in (1, 2)
    for aux_free in (False, True)
}
STEP_CASES["global_accum2_qb"] = ("global", 2, True, "quantile")  # Quantile Balancing
COUNT_SHAPE = (2, 8)  # (L, E) of the test model: the balancer's all-reduced counts


def cpu_fsdp() -> None:
    """accelerate keeps a CPU run as MULTI_CPU (DDP) even with an FSDP plugin; take its FSDP branch instead."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def fsdp_init(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:
            self.fsdp_plugin = fsdp_plugin
        if getattr(self, "fsdp_plugin", None) is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # also when a later AcceleratorState() re-derives it

    AcceleratorState.__init__ = fsdp_init


class AllReduceLog:
    """Counts this process's `torch.distributed.all_reduce` calls on an (L, E) int64 tensor: the balancer's counts,
    told apart from the engines' own reductions by that signature."""

    def __init__(self):
        self.count_reductions = 0
        original = dist.all_reduce

        def logged(tensor, *args, **kwargs):
            self.count_reductions += tensor.dtype == torch.int64 and tuple(tensor.shape) == COUNT_SHAPE
            return original(tensor, *args, **kwargs)

        dist.all_reduce = logged


class RecordingTrainer(QwenMoeGBTrainer):
    """Records, per training micro-step, this rank's own counts (before the all-reduce) and the step buffer after."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_counts, self.buffers = [], []
        router_stats = self.balancer.router_stats

        def recorded(outputs):
            stats = router_stats(outputs)
            if self.model.training:
                self.local_counts.append(stats.counts.detach().sum(1).round().long())  # (L, E)
            return stats

        self.balancer.router_stats = recorded

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.buffers.append(self.balancer.step_counts.clone())
        return loss


def step_dataset(accumulation: int):
    """Rows in the order accelerate deals batches (batch k to rank k % 2): micro-step m of rank r is
    `batch_for(step=m, rank=r)`, as the one-process reference reads them."""
    from datasets import Dataset

    ids = [row for m in range(accumulation) for r in range(WORLD) for row in batch_for(step=m, rank=r).tolist()]
    batches = [list(range(i, i + MICRO)) for i in range(0, len(ids), MICRO)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids}), batches


def full_params(model, engine: str) -> dict[str, torch.Tensor]:
    """Every parameter, whole, on every rank."""
    params = dict(model.named_parameters())
    if engine.startswith("deepspeed_zero3"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: full(p).detach().clone() for n, p in params.items()}


def reset_accelerate() -> None:
    """A fresh accelerate state for the next Trainer (its engine plugin is built per run); the process group stays."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations import unset_hf_deepspeed_config

    AcceleratorState._reset_state()
    GradientState._reset_state()
    unset_hf_deepspeed_config()


def arguments(out: Path, engine: str, name: str, **overrides):
    from transformers import TrainingArguments

    fields = dict(
        output_dir=str(out / f"{engine}_{name}"), per_device_train_batch_size=MICRO, max_steps=1, learning_rate=1.0,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True, dataloader_drop_last=True,
    )  # fmt: skip
    fields.update(overrides)
    flags = cpu_launch_flags([])  # what `pretrain` adds on this machine: --ddp_backend gloo or --use_cpu true
    fields.update({"ddp_backend": "gloo"} if "--ddp_backend" in flags else {"use_cpu": "--use_cpu" in flags})
    return TrainingArguments(**fields)


def engine_step(out: Path, rank: int, engine: str, name: str, log: AllReduceLog) -> None:
    """One SGD(lr=1) step with the engine: with no clipping or decay the update is the gradient."""
    scope, accumulation, aux_free, method = STEP_CASES[name]
    args = arguments(out, engine, name, gradient_accumulation_steps=accumulation)  # before the model: ZeRO-3 init
    model = QwenMoeGBForCausalLM.from_pretrained(
        out / "ckpt", balance_scope=scope, aux_free=aux_free, aux_free_method=method
    )
    dataset, batches = step_dataset(accumulation)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, train_batch_sampler=batches)
    before = log.count_reductions
    trainer.train()
    seen = {
        "params": full_params(model, engine),
        "biases": router_biases(model),
        "buffers": trainer.buffers,
        "local_counts": trainer.local_counts,
        "count_reductions": log.count_reductions - before,
        "logs": [e for e in trainer.state.log_history if "loss" in e],
        "sharded": sharding(trainer, model, engine),
    }
    torch.save(seen, out / f"{engine}_{name}_rank{rank}.pt")
    reset_accelerate()


def sharding(trainer, model, engine: str) -> dict:
    """What the engine really did: the Trainer's flags and, per engine, the sign of sharding it leaves."""
    weight = model.model.layers[0].mlp.experts.gate_up_proj
    info = {"deepspeed": trainer.is_deepspeed_enabled, "fsdp": trainer.is_fsdp_enabled}
    if engine.startswith("deepspeed"):
        info["zero_stage"] = trainer.model_wrapped.zero_optimization_stage()
        info["local_numel"] = weight.ds_tensor.numel() if hasattr(weight, "ds_tensor") else weight.numel()
    else:
        info["local_numel"] = weight.to_local().numel() if hasattr(weight, "to_local") else weight.numel()
    info["full_numel"] = getattr(weight, "ds_numel", None) or weight.numel()
    return info


def resume_run(out: Path, rank: int, engine: str) -> None:
    """AdamW, 2 accumulation steps, aux-free, 4 optimizer steps with checkpoints every 2; then a fresh Trainer resumed
    from checkpoint-2. Both record their final weights, biases and logs."""
    dataset = resume_dataset()
    for name, resume in (("resume_full", None), ("resume_from_2", "resume_full/checkpoint-2")):
        args = arguments(
            out, engine, name, gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, optim="adamw_torch",
            lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=1.0, save_strategy="steps", save_steps=2,
        )  # fmt: skip
        model = QwenMoeGBForCausalLM.from_pretrained(out / "ckpt", balance_scope="global", aux_free=True)
        trainer = QwenMoeGBTrainer(model=model, args=args, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=str(out / f"{engine}_{resume}") if resume else None)
        logs = [e for e in trainer.state.log_history if "loss" in e]
        seen = {"params": full_params(model, engine), "biases": router_biases(model), "logs": logs}
        if name == "resume_full":
            trainer.save_model(str(out / f"{engine}_saved"))
            seen["saved_params"] = seen["params"]
        torch.save(seen, out / f"{engine}_{name}_rank{rank}.pt")
        reset_accelerate()


def main() -> None:
    out, engine = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    if engine == "fsdp":
        cpu_fsdp()
    log = AllReduceLog()
    cases = list(STEP_CASES) if engine != "deepspeed_zero3_offload" else ["global_accum2_auxfree"]
    for name in cases:
        engine_step(out, rank, engine, name, log)
    if engine != "deepspeed_zero3_offload":
        resume_run(out, rank, engine)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
