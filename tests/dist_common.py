"""Shared pieces of the distributed tests: one config, deterministic data, a Trainer run, and the launch of the
worker processes (`torchrun` / `accelerate launch`) with their own error on failure."""

import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments

from modeling_qwenmoe_gb import QwenMoeGBConfig, QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.trainer import QwenMoeGBTrainer
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
# torch.distributed.elastic's line for the first rank that failed; what the ranks printed comes before it
RANK_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: \d+")

SEQ = 12
MICRO = 2
# every routing option on: sigmoid scores, aux-free, group-limited routing, routed scaling, capacity dropping
ROUTING = dict(
    router_scoring_func="sigmoid", aux_free=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    expert_capacity_factor=1.0, moe_token_drop_policy="probs", device_balance_groups=2, balance_scope="global",
)  # fmt: skip


def make_config(**overrides) -> QwenMoeGBConfig:
    """`tiny_config` with a smaller vocabulary, a strong LBL and a wider init (routing far from uniform)."""
    fields = dict(
        vocab_size=61,
        shared_expert_intermediate_size=16,
        max_position_embeddings=64,
        router_aux_loss_coef=0.5,
        aux_free_bias_update_rate=0.01,
        initializer_range=0.2,
        pad_token_id=None,
    )
    fields.update(overrides)
    return tiny_config(**fields)


def save_start(out: Path, expert_bias: torch.Tensor | None = None) -> None:
    """The saved weights every engine and its one-process reference start from (`out/ckpt`: `make_config(aux_free=
    True)` at seed 0, each router's aux-free bias set to `expert_bias` if given) and the ids for logits checks."""
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(make_config(aux_free=True))
    if expert_bias is not None:
        with torch.no_grad():
            for router in model.model.moe_routers():
                router.expert_bias.copy_(expert_bias)
    model.save_pretrained(out / "ckpt")
    torch.save(torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5)), out / "ids.pt")


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter or output, whole; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def router_biases(model) -> torch.Tensor:
    """(L, E) copy of every router's aux-free bias."""
    return torch.stack([r.expert_bias.clone() for r in model.model.moe_routers()])


def resume_dataset() -> Dataset:
    """64 random 12-token rows: the data of the resume tests."""
    ids = torch.randint(0, 61, (64, 12), generator=torch.Generator().manual_seed(11)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def batch_for(step: int, rank: int) -> torch.Tensor:
    """(MICRO, SEQ) token ids of micro-step `step` on `rank`: different on every rank and step."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 61, (MICRO, SEQ), generator=gen)


def repeated_sequence_dataset(n: int) -> Dataset:
    ids = torch.randint(0, 61, (SEQ,), generator=torch.Generator().manual_seed(7)).tolist()
    return Dataset.from_dict({"input_ids": [ids] * n, "labels": [ids] * n})


def trainer_run(
    out: Path,
    scope: str,
    batch: int,
    accumulation: int,
    steps: int = 1,
    save: bool = False,
    aux_free: bool = False,
) -> QwenMoeGBForCausalLM:
    """SGD(lr=1) on one repeated sequence, no clipping: the update shows the loss scale directly."""
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(make_config(balance_scope=scope, aux_free=aux_free))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=steps,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    trainer = QwenMoeGBTrainer(model=model, args=args, train_dataset=repeated_sequence_dataset(64))
    trainer.train()
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out / "params.pt")
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node N --master_port <free>`: prefix a worker script and args."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port())]  # fmt: skip


def ranks_error(result: subprocess.CompletedProcess) -> str:
    """What the ranks printed before the launcher's failure summary (their traceback, or the stack Python's fault
    handler wrote for a fatal signal), then the launcher's line naming the rank and exit code."""
    found = RANK_FAILED.search(result.stderr)
    if found is None:
        return result.stdout[-3000:] + result.stderr[-6000:]
    line_end = result.stderr.find("\n", found.end())
    return result.stdout[-2000:] + result.stderr[: found.start()][-7000:] + result.stderr[found.start() : line_end]


def run_ranks(cmd: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Run a multi-process launch `cmd` (`torchrun(...)` or `accelerate launch`) from the repository root, offline,
    with the repository importable, Python's fault handler on and `env` added; assert it succeeded, failing with the
    ranks' own error (`ranks_error`). A launch whose first failed rank was killed by a signal rather than ending with
    an error (a crash of the process itself, the same command having passed before) runs once more; the first try's
    error stays as a warning in pytest's summary. A second failure, or any rank that raised, fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1", **env)
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    failed = RANK_FAILED.search(result.stderr)
    if result.returncode != 0 and failed is not None and int(failed.group(1)) < 0:
        signal = -int(failed.group(1))
        warnings.warn(f"a rank was killed by signal {signal}; launched again:\n{ranks_error(result)}", stacklevel=2)
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, ranks_error(result)
    return result
