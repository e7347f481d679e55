"""Worker for the 2-process gloo tests: `torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR`.

Each scenario writes what the rank saw to OUT_DIR/<scenario>_rank<r>.pt; the parent test computes the single-process
references and compares.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM  # noqa: E402
from modeling_qwenmoe_gb.balance import GlobalBalancer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.dist_common import ROUTING, batch_for, make_config, router_biases, trainer_run  # noqa: E402


def ddp_global_vs_concat(out: Path, rank: int, scope: str) -> None:
    """2 ranks × micro-batch 2, no accumulation: loss, counts and DDP-averaged gradients (float64)."""
    model = QwenMoeGBForCausalLM(make_config(balance_scope=scope)).double().train()
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    model.load_state_dict(torch.load(out / "init.pt"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    balancer = GlobalBalancer(ddp)
    ids = batch_for(step=0, rank=rank)
    outputs = ddp(input_ids=ids, labels=ids, add_balance_loss=False)
    balance, parts = balancer(outputs.router_stats)
    loss = outputs.loss + balance
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(
        {"loss": loss.detach(), "balance": balance.detach(), "counts": balancer.step_counts.clone(), "grads": grads},
        out / f"ddp_{scope}_rank{rank}.pt",
    )


def micro_steps(model, balancer: GlobalBalancer, rank: int, steps: int) -> tuple[list, list]:
    """`steps` accumulation micro-steps on this rank's data: the step buffer after each, and each (balance, parts)."""
    buffers, balances = [], []
    for micro in range(steps):
        ids = batch_for(step=micro, rank=rank)
        outputs = model(input_ids=ids, labels=ids, add_balance_loss=False)
        balance, parts = balancer(outputs.router_stats)
        (outputs.loss + balance / steps).backward()
        buffers.append(balancer.step_counts.clone())
        balances.append((balance, parts))
    return buffers, balances


def accumulation_buffer(out: Path, rank: int) -> None:
    """2 ranks × 4 accumulation micro-steps: the step buffer after each micro-step, then after the optimizer step."""
    model = QwenMoeGBForCausalLM(make_config(aux_free=True)).train()
    model.load_state_dict(torch.load(out / "init_f32.pt"))
    balancer = GlobalBalancer(model)
    buffers, balances = micro_steps(model, balancer, rank, 4)
    losses = [parts["lbl"].detach() for _, parts in balances]
    balancer.step()
    biases = router_biases(model)
    with torch.no_grad():  # eval must not touch the buffer
        model.eval()
        model(input_ids=batch_for(step=0, rank=rank), labels=batch_for(step=0, rank=rank))
        balancer(model(input_ids=batch_for(step=0, rank=rank)).router_stats)
    torch.save(
        {"buffers": buffers, "lbl": losses, "after_step": balancer.step_counts.clone(), "biases": biases},
        out / f"accum_rank{rank}.pt",
    )


def routing_options(out: Path, rank: int) -> None:
    """2 ranks × 2 accumulation micro-steps with every routing option on (float64): the buffer after each micro-step,
    each micro-step's balance loss, the aux-free biases after the step; and with capacity off, the counts of one
    micro-step (compared with one process on the concatenation)."""
    for name, fields in (("routing", ROUTING), ("routing_dropless", {**ROUTING, "expert_capacity_factor": None})):
        model = QwenMoeGBForCausalLM(make_config(**fields)).double().train()
        model.set_experts_implementation("eager")
        model.load_state_dict(torch.load(out / "init_routing.pt"))
        balancer = GlobalBalancer(model)
        buffers, balances = micro_steps(model, balancer, rank, 2)
        losses = [balance.detach() for balance, _ in balances]
        balancer.step()
        biases = router_biases(model)
        torch.save({"buffers": buffers, "balance": losses, "biases": biases}, out / f"{name}_rank{rank}.pt")


def subgroup_counts(out: Path, rank: int) -> None:
    """sync_group_size=1: each rank is its own group, so the buffer holds only the local counts."""
    model = QwenMoeGBForCausalLM(make_config()).train()
    model.load_state_dict(torch.load(out / "init_f32.pt"), strict=False)
    balancer = GlobalBalancer(model, sync_group_size=1)
    ids = batch_for(step=0, rank=rank)
    balancer(model(input_ids=ids, labels=ids, add_balance_loss=False).router_stats)
    torch.save(balancer.step_counts.clone(), out / f"subgroup_rank{rank}.pt")


def cli_pretrain(out: Path) -> None:
    """`qwenmoe-gb pretrain` unchanged under torchrun (2 processes on gloo)."""
    from modeling_qwenmoe_gb.cli import pretrain

    pretrain([
        "--output_dir", str(out / "cli_ddp"), "--max_steps", "4", "--synthetic_docs", "40", "--seq_len", "64",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--eval_max_sequences", "4",
        "--logging_steps", "2", "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true",
        "--config_overrides", '{"num_hidden_layers": 2}',
    ])  # fmt: skip


def uneven_last_batch(out: Path, rank: int) -> None:
    """Rank 0 holds 2 sequences, rank 1 only 1 (an uneven last batch): the counts still sum over both."""
    model = QwenMoeGBForCausalLM(make_config()).train()
    model.load_state_dict(torch.load(out / "init_f32.pt"), strict=False)
    balancer = GlobalBalancer(model)
    ids = batch_for(step=9, rank=rank)[: 2 - rank]
    balance, parts = balancer(model(input_ids=ids, labels=ids, add_balance_loss=False).router_stats)
    torch.save({"counts": balancer.step_counts.clone(), "lbl": parts["lbl"].detach()}, out / f"uneven_rank{rank}.pt")


def fsdp2_global(out: Path, rank: int) -> None:
    """Raw FSDP2 (`fully_shard` per decoder layer + root) on CPU/gloo with the balancer, global scope."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = QwenMoeGBForCausalLM(make_config()).train()
    model.load_state_dict(torch.load(out / "init_f32.pt"), strict=False)
    model.set_experts_implementation("eager")
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    router = model.model.layers[0].mlp.gate.weight
    sharded = isinstance(router, DTensor) and router.to_local().shape[0] == router.shape[0] // 2
    balancer = GlobalBalancer(model)
    ids = batch_for(step=0, rank=rank)
    outputs = model(input_ids=ids, labels=ids, add_balance_loss=False)
    balance, _ = balancer(outputs.router_stats)
    (outputs.loss + balance).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if "mlp.gate.weight" in n}
    torch.save(
        {"sharded": sharded, "counts": balancer.step_counts.clone(), "balance": balance.detach(), "grads": grads},
        out / f"fsdp2_rank{rank}.pt",
    )


def native_parallel_forward(out: Path, rank: int) -> None:
    """transformers' own parallel engine (`from_pretrained(distributed_config=...)`): tensor parallel, tensor + expert
    parallel and FSDP2 + expert parallel, with tied and untied embeddings: logits and loss of one forward."""
    from transformers.distributed.configuration_utils import DistributedConfig

    layouts = {
        "tp2": {"tp_size": 2},
        "tp2_ep2": {"tp_size": 2, "ep_size": 2},
        "fsdp2_ep2": {"fsdp_size": 2, "ep_size": 2},
    }
    ids = torch.load(out / "parallel_ids.pt")
    results = {}
    for tied in ("tied", "untied"):
        for name, sizes in layouts.items():
            model = QwenMoeGBForCausalLM.from_pretrained(
                out / f"parallel_{tied}", distributed_config=DistributedConfig(**sizes), dtype=torch.float32
            ).eval()
            with torch.no_grad():
                outputs = model(input_ids=ids, labels=ids)
            logits = outputs.logits.full_tensor() if hasattr(outputs.logits, "full_tensor") else outputs.logits
            results[f"{tied}_{name}"] = {"logits": logits, "loss": outputs.loss}
    torch.save(results, out / f"parallel_rank{rank}.pt")


def raising_rank(rank: int) -> None:
    """Rank 1 fails before its first collective; rank 0 is left waiting in the balancer's all-reduce."""
    model = QwenMoeGBForCausalLM(make_config()).train()
    balancer = GlobalBalancer(model)
    if rank == 1:
        raise ValueError("rank 1 failed: bad shard")
    ids = batch_for(step=0, rank=rank)
    balancer(model(input_ids=ids, labels=ids, add_balance_loss=False).router_stats)


def aborting_once(out: Path, rank: int) -> None:
    """Rank 0 dies of SIGABRT (a crash, not an error) on the first launch in `out`; every later launch finishes."""
    marker = out / "aborted_once"
    dist.barrier()
    if rank == 0 and not marker.exists():
        marker.touch()
        os.abort()
    dist.barrier()
    (out / f"finished_rank{rank}").touch()


def grpo_replay(out: Path, rank: int) -> None:
    """TRL GRPO with rollout replay and global balance on 2 ranks, 2 steps: each rank saves the micro-batches its
    loss saw (masks, replayed routing), the balancer's step counts before each optimizer step, the aux-free biases
    and its logs."""
    from modeling_qwenmoe_gb.rl import ROLLOUT_KEY
    from tests.test_rl import StepCounts, run_grpo

    counts = StepCounts()
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0, eos_token_id=1, aux_free=True))
    trainer, logs = run_grpo(out / "grpo", "rollout", steps=2, callbacks=[counts], model=model)
    keys = ("prompt_mask", "completion_mask", ROLLOUT_KEY)
    seen = [{k: batch[k].cpu() for k in keys} for batch in trainer.seen]
    biases = [router.expert_bias.clone() for router in model.model.moe_routers()]
    torch.save({"seen": seen, "counts": counts.counts, "biases": biases, "logs": logs}, out / f"grpo_rank{rank}.pt")


def qb_start(out: Path) -> None:
    """The saved start of the Quantile Balancing test, per scope: `tiny_config` with QB, a nonzero bias."""
    for scope in ("global", "micro_mean"):
        torch.manual_seed(0)
        config = tiny_config(aux_free=True, aux_free_method="quantile", quantile_scope=scope, initializer_range=0.2)
        model = QwenMoeGBForCausalLM(config)
        for router in model.model.moe_routers():
            router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 8))
        model.save_pretrained(out / f"qb_start_{scope}")


def qb_batches(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 10) ids and attention mask of a QB micro-step; rank 1's second sequence ends in 4 pad tokens."""
    ids = torch.randint(1, 99, (2, 10), generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank))
    mask = torch.ones(2, 10, dtype=torch.long)
    if rank == 1:
        mask[1, 6:] = 0
        ids[1, 6:] = 0
    return ids, mask


def quantile_balancing(out: Path, rank: int) -> None:
    """2 ranks × 2 accumulation micro-steps × 2 optimizer steps of QB (no weight update): the biases after each."""
    for scope in ("global", "micro_mean"):
        model = QwenMoeGBForCausalLM.from_pretrained(out / f"qb_start_{scope}").train()
        balancer = GlobalBalancer(model)
        seen = []
        for step in range(2):
            for micro in range(2):
                ids, mask = qb_batches(step, micro, rank)
                balancer(model(input_ids=ids, attention_mask=mask).router_stats)
            balancer.step()
            seen.append(router_biases(model))
        torch.save(seen, out / f"qb_{scope}_rank{rank}.pt")


def megatron_qb(out: Path, rank: int) -> None:
    """Megatron-Core's QB code (from its wheel) and our micro_mean on the same random scores: 2 micro-batches per rank,
    3 steps, EMA 0.25, a nonzero start; each step's (our bias, Megatron's β)."""
    from types import SimpleNamespace

    from modeling_qwenmoe_gb.quantile import QuantileState
    from tests.test_quantile import load_megatron_qb, settings, stats_of

    megatron = load_megatron_qb(os.environ["QWENMOE_GB_MEGATRON_QB_WHEEL"])
    experts, top_k, ema = 8, 2, 0.25
    router = torch.nn.Module()  # what `_update_router_qb_beta` reads of Megatron's TopKRouter
    start = torch.linspace(-0.1, 0.1, experts)
    router.register_buffer("qb_beta", -start.clone())
    router.register_buffer("qb_beta_accum", torch.zeros(experts))
    router.register_buffer("qb_beta_count", torch.zeros((), dtype=torch.long))
    bias, state = start.clone(), QuantileState(settings(experts, top_k, scope="micro_mean", ema=ema))
    seen = []
    for step in range(3):
        for micro in range(2):
            gen = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
            scores = torch.sigmoid(torch.randn(32, experts, generator=gen) + torch.linspace(-1, 1, experts))
            _, beta_local = megatron["qb_dual_update"](scores, top_k, router.qb_beta, update_beta=True)
            router.qb_beta_accum.add_(beta_local)  # TopKRouter.quantile_balancing, in training
            router.qb_beta_count.add_(1)
            state.observe(stats_of(scores, bias, top_k, 1000))
        megatron["_update_router_qb_beta"]([router], SimpleNamespace(moe_router_quantile_balancing_ema=ema))
        router.qb_beta_accum.zero_()  # what Megatron's finalize step does after the update
        router.qb_beta_count.zero_()
        state.update([bias])
        seen.append((bias.clone(), router.qb_beta.clone()))
    torch.save(seen, out / f"megatron_qb_rank{rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    os.environ["ACCELERATE_USE_CPU"] = "1"
    dist.init_process_group("gloo")
    if sys.argv[2:] == ["raise"]:
        raising_rank(rank)
        return
    if sys.argv[2:] == ["abort_once"]:
        aborting_once(out, rank)
        dist.destroy_process_group()
        return
    if sys.argv[2:] == ["megatron_qb"]:
        megatron_qb(out, rank)
        dist.destroy_process_group()
        return
    if sys.argv[2:] == ["quantile"]:
        quantile_balancing(out, rank)
        dist.destroy_process_group()
        return
    if sys.argv[2:] == ["grpo"]:
        grpo_replay(out, rank)
        dist.destroy_process_group()
        return
    for scope in ("global", "micro"):
        ddp_global_vs_concat(out, rank, scope)
    accumulation_buffer(out, rank)
    for scope in ("micro", "global"):
        trainer_run(out / f"trainer_{scope}_2x1x2", scope, batch=2, accumulation=1)
    trainer_run(out / "trainer_logged", "global", batch=2, accumulation=2, steps=3, save=True, aux_free=True)
    subgroup_counts(out, rank)
    routing_options(out, rank)
    uneven_last_batch(out, rank)
    fsdp2_global(out, rank)
    native_parallel_forward(out, rank)
    cli_pretrain(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
