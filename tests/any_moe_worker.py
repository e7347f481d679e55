"""Worker for the 2-process gloo tests of transformers' own MoE models with the balancer:
`torchrun --nproc_per_node 2 tests/any_moe_worker.py OUT_DIR`.

Each scenario writes what the rank saw to OUT_DIR/<scenario>_rank<r>.pt; the parent (tests/test_any_moe_distributed.py)
computes the single-process references on the same data and compares.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_qwenmoe_gb.any_moe import find_moe_layers  # noqa: E402
from modeling_qwenmoe_gb.balance import GlobalBalancer  # noqa: E402
from tests.stock_models import available, tiny_model  # noqa: E402

ACCUMULATION = 2
# (family, DistributedConfig sizes) of the runs under transformers' own parallel engine
EP = {"fsdp_size": 2, "ep_size": 2}
ENGINE = tuple((family, EP) for family in ("qwen3_moe", "deepseek_v3", "olmoe", "mixtral", "gpt_oss", "glm4_moe"))


def family_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 9) ids and mask of micro-step `step` on `rank` (row 0 left-padded by step + rank): distinct everywhere."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(1, 96, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, : 1 + step + rank] = 0
    return ids, mask


def seed_forward(step: int, rank: int) -> None:
    """The same RNG state for a forward here and in the parent's reference (phimoe's router samples in training)."""
    torch.manual_seed(1000 + 100 * step + rank)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def ddp_steps(out: Path, rank: int, family: str, aux_free: bool) -> None:
    """DDP, global scope, 2 accumulation micro-steps of distinct padded batches: the step buffer and the balance loss
    of each micro-step, the DDP-averaged gradients and the aux-free biases after the step."""
    model = tiny_model(family).train()
    model.load_state_dict(torch.load(out / f"{family}_init.pt"))
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    balancer = GlobalBalancer(ddp, router_aux_loss_coef=0.5, aux_free=aux_free, aux_free_bias_update_rate=0.01)
    buffers, balances = [], []
    for micro in range(ACCUMULATION):
        ids, mask = family_batch(micro, rank)
        context = ddp.no_sync() if micro < ACCUMULATION - 1 else torch.enable_grad()
        with context:
            seed_forward(micro, rank)
            outputs = ddp(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
            balance, _ = balancer(balancer.router_stats(outputs))
            ((outputs.loss + balance) / ACCUMULATION).backward()
        buffers.append(balancer.step_counts.clone())
        balances.append(balance.detach())
    balancer.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    biases = [b.clone() for b in balancer.moe_model.biases()]
    torch.save({"buffers": buffers, "balances": balances, "grads": grads, "biases": biases},
               out / f"ddp_{family}_rank{rank}.pt")  # fmt: skip


def trainer_split(out: Path, family: str, aux_free: bool) -> None:
    """`QwenMoeGBTrainer` on a stock model, 2 ranks × batch 1 × 2 accumulation steps, SGD(lr=1), one repeated
    sequence: the parent runs 1 × 1 × 4 and 1 × 4 × 1."""
    from tests.test_any_moe_distributed import stock_trainer_run

    stock_trainer_run(out / f"split_{family}", family, batch=1, accumulation=2, aux_free=aux_free)


def engine_step(out: Path, rank: int, family: str, sizes: dict) -> None:
    """transformers' engine (`from_pretrained(distributed_config=...)`, FSDP2 + EP) on the stock model: the same
    global step as `ddp_steps`, the balancer finding the data-parallel group itself."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed.configuration_utils import DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(
        out / f"{family}_ckpt", distributed_config=DistributedConfig(**sizes), dtype=torch.float32
    ).train()
    balancer = GlobalBalancer(model, router_aux_loss_coef=0.5)
    buffers = []
    for micro in range(ACCUMULATION):
        ids, mask = family_batch(micro, rank)
        seed_forward(micro, rank)
        outputs = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        balance, _ = balancer(balancer.router_stats(outputs))
        ((outputs.loss + balance) / ACCUMULATION).backward()
        buffers.append(balancer.step_counts.clone())
    local = next(find_moe_layers(model)[0].experts.parameters())  # (E, ·, ·) fused experts
    sharded = hasattr(local, "to_local") and local.to_local().shape[0] < local.shape[0]
    grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"buffers": buffers, "grads": grads, "sharded": sharded}, out / f"engine_{family}_rank{rank}.pt")


def main() -> None:
    from tests.test_any_moe import BIASED, FAMILIES

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    os.environ["ACCELERATE_USE_CPU"] = "1"
    dist.init_process_group("gloo")
    for family in FAMILIES:
        if available(family):
            ddp_steps(out, rank, family, aux_free=family in BIASED)
    trainer_split(out, "qwen3_moe", aux_free=False)
    trainer_split(out, "deepseek_v3", aux_free=True)
    for family, sizes in ENGINE:
        engine_step(out, rank, family, sizes)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
