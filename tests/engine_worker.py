"""Worker for the tests of transformers' native parallel engine on 2 gloo processes:
`torchrun --nproc_per_node 2 tests/engine_worker.py OUT_DIR`.

Every scenario loads OUT_DIR/ckpt with `from_pretrained(distributed_config=DistributedConfig(...))` and writes what
the rank saw to OUT_DIR/<scenario>_rank<r>.pt; the parent test computes single-process references and compares.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.distributed.configuration_utils import DistributedConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM  # noqa: E402
from modeling_qwenmoe_gb.balance import GlobalBalancer  # noqa: E402
from modeling_qwenmoe_gb.expert_parallel import COUNTED_ALL_TO_ALL  # noqa: E402
from tests.dist_common import batch_for, full, resume_dataset, router_biases  # noqa: E402

COUNTED = {"ep_implementation": COUNTED_ALL_TO_ALL}
RECOMPUTE = {mode: {"moe_recompute": mode} for mode in ("experts", "moe", "expert_act")}
DEVICE_LIMITED = {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.0}
QB = {"aux_free_method": "quantile"}  # Quantile Balancing (the saved start has aux_free=True)
# name -> (DistributedConfig arguments, balance scope, accumulation steps, do the two ranks hold distinct data,
#          device_balance_groups[, further config fields])
STEPS = {
    "fsdp2_global": ({"fsdp_size": 2}, "global", 1, True, None),
    "fsdp2_ep2_global_accum2": ({"fsdp_size": 2, "ep_size": 2}, "global", 2, True, None),
    "fsdp2_ep2_micro": ({"fsdp_size": 2, "ep_size": 2}, "micro", 1, True, None),
    "dp_replicate2_global": ({"dp_replicate_size": 2}, "global", 1, True, None),
    "tp2_global": ({"tp_size": 2}, "global", 1, False, None),
    "fsdp2_ep2_device_ep": ({"fsdp_size": 2, "ep_size": 2, **COUNTED}, "global", 2, True, "ep"),
    # MoE-aware recompute under FSDP2 + EP (the recomputed experts run their all-to-all again in backward)
    "fsdp2_ep2_recompute_experts": ({"fsdp_size": 2, "ep_size": 2}, "global", 2, True, None, RECOMPUTE["experts"]),
    "fsdp2_ep2_recompute_moe": ({"fsdp_size": 2, "ep_size": 2}, "global", 2, True, None, RECOMPUTE["moe"]),
    "fsdp2_ep2_recompute_expert_act": (
        {"fsdp_size": 2, "ep_size": 2},
        "global",
        2,
        True,
        None,
        RECOMPUTE["expert_act"],
    ),
    # device-limited routing: the 2 expert groups are the 2 EP ranks' experts, each token uses one of them
    "fsdp2_ep2_device_limited": ({"fsdp_size": 2, "ep_size": 2, **COUNTED}, "global", 2, True, "ep", DEVICE_LIMITED),
    # Quantile Balancing: the margin histograms (or micro-batch quantiles) pooled over the data-parallel ranks
    "fsdp2_ep2_qb_global": ({"fsdp_size": 2, "ep_size": 2}, "global", 2, True, None, QB),
    "fsdp2_ep2_qb_micro_mean": ({"fsdp_size": 2, "ep_size": 2}, "global", 2, True, None,
                                {**QB, "quantile_scope": "micro_mean"}),
    "tp2_qb_global": ({"tp_size": 2}, "global", 1, False, None, QB),  # a TP group shares its batch: counted once
}  # fmt: skip
# run with 4 processes (`... engine_worker.py OUT four`): HSDP (2 replicas × FSDP2) with EP over each replica's 2 ranks
FOUR_PROCESS_STEPS = {
    "hsdp2x2_ep2_device_ep": (
        {"dp_replicate_size": 2, "fsdp_size": 2, "ep_size": 2, **COUNTED},
        "global",
        2,
        True,
        "ep",
    ),
}


def load(out: Path, sizes: dict, **config) -> QwenMoeGBForCausalLM:
    return QwenMoeGBForCausalLM.from_pretrained(
        out / "ckpt", distributed_config=DistributedConfig(**sizes), dtype=torch.float32, **config
    )


def engine_step(out: Path, rank: int, name: str) -> None:
    """One optimizer step of a plain loop with the balancer: counts buffer per micro-step, gradients, aux-free bias."""
    sizes, scope, accumulation, distinct, groups, *extra = {**STEPS, **FOUR_PROCESS_STEPS}[name]
    model = load(out, sizes, balance_scope=scope, device_balance_groups=groups, **(extra[0] if extra else {})).train()
    balancer = GlobalBalancer(model)
    buffers, routed = [], []
    for micro in range(accumulation):
        ids = batch_for(step=micro, rank=rank if distinct else 0)  # a TP group shares one batch
        outputs = model(input_ids=ids, labels=ids, add_balance_loss=False, output_routed_experts=True)
        routed.append(outputs.routed_experts)  # (B, S, L, K): what the all-to-all dispatched
        balance, _ = balancer(outputs.router_stats)
        ((outputs.loss + balance) / accumulation).backward()
        buffers.append(balancer.step_counts.clone())
    balancer.step()
    grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
    biases = router_biases(model)
    seen = {"buffers": buffers, "grads": grads, "biases": biases, "groups": balancer.groups, "routed": routed}
    seen.update(step_counts=balancer.last_step_counts, delivered=balancer.last_delivered_counts)
    seen["metrics"] = balancer.pop_metrics()
    torch.save(seen, out / f"{name}_rank{rank}.pt")


def engine_train_and_save(out: Path, rank: int) -> None:
    """`QwenMoeGBTrainer` on FSDP2 + EP: two SGD steps, `save_model`, and the logits the trained model gives."""
    from transformers import TrainingArguments

    from modeling_qwenmoe_gb.trainer import QwenMoeGBTrainer
    from tests.dist_common import repeated_sequence_dataset

    model = load(out, {"fsdp_size": 2, "ep_size": 2})
    args = TrainingArguments(
        output_dir=str(out / "engine_run"), per_device_train_batch_size=2, max_steps=2, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = QwenMoeGBTrainer(model=model, args=args, train_dataset=repeated_sequence_dataset(16))
    trainer.train()
    trainer.save_model(str(out / "engine_saved"))
    model.eval()
    with torch.no_grad():
        logits = full(model(input_ids=torch.load(out / "ids.pt")).logits)
    biases = router_biases(model)
    params = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    torch.save({"logits": logits, "biases": biases, "params": params}, out / f"engine_saved_rank{rank}.pt")


def engine_resume(out: Path, rank: int) -> None:
    """AdamW, 2 accumulation steps, 4 optimizer steps under FSDP2 + EP, checkpoints every 2; then a fresh model resumed
    from checkpoint-2 on the same layout (FSDP2 + EP) and on another (FSDP2 alone)."""
    from transformers import TrainingArguments

    from modeling_qwenmoe_gb.trainer import QwenMoeGBTrainer

    dataset = resume_dataset()

    def run(name: str, sizes: dict, resume: str | None = None) -> None:
        model = load(out, sizes)
        args = TrainingArguments(
            output_dir=str(out / name), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
            learning_rate=1e-2, optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=1, logging_steps=1,
            save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
            dataloader_drop_last=True,
        )  # fmt: skip
        trainer = QwenMoeGBTrainer(model=model, args=args, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=resume)
        params = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
        biases = router_biases(model)
        logs = [e for e in trainer.state.log_history if "loss" in e]
        torch.save({"params": params, "biases": biases, "logs": logs}, out / f"{name}_rank{rank}.pt")

    ep = {"fsdp_size": 2, "ep_size": 2}
    run("resume_full", ep)
    run("resume_same", ep, resume=str(out / "resume_full" / "checkpoint-2"))
    run("resume_fsdp_only", {"fsdp_size": 2}, resume=str(out / "resume_full" / "checkpoint-2"))


def cli_engine(out: Path) -> None:
    """`qwenmoe-gb pretrain --fsdp_size 2 --ep_size 2` from a preset, 4 steps with a checkpoint at 2; then the same
    command resumed from that checkpoint into another folder."""
    from modeling_qwenmoe_gb.pretraining import pretrain

    flags = [
        "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2", "--synthetic_docs", "40", "--seq_len", "64",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--eval_max_sequences", "4",
        "--use_cpu", "true", "--disable_tqdm", "true", "--aux_free", "true", "--fsdp_size", "2", "--ep_size", "2",
        "--device_balance_groups", "ep",
        "--config_overrides", '{"num_hidden_layers": 2}',
    ]  # fmt: skip
    pretrain([*flags, "--output_dir", str(out / "cli_engine")])
    resume = ["--resume_from_checkpoint", str(out / "cli_engine" / "checkpoint-2")]
    pretrain([*flags, "--output_dir", str(out / "cli_engine_resumed"), *resume])


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    os.environ["ACCELERATE_USE_CPU"] = "1"
    dist.init_process_group("gloo")
    if sys.argv[2:] == ["four"]:
        for name in FOUR_PROCESS_STEPS:
            engine_step(out, rank, name)
        dist.destroy_process_group()
        return
    for name in STEPS:
        engine_step(out, rank, name)
    engine_train_and_save(out, rank)
    engine_resume(out, rank)
    cli_engine(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
