"""transformers' own MoE models with the balancer on 2 CPU processes (torchrun, gloo), against single-process
references computed here on the same data: global counts, loss and gradients for every family the balancer reads
(DDP, 2 accumulation micro-steps), the aux-free bias (identical on both ranks), the Trainer's loss scale (2 × 1 × 2
equals 1 × 1 × 4 and 1 × 4 × 1), and transformers' FSDP2 + EP engine."""

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from modeling_qwenmoe_gb import balance_loss
from modeling_qwenmoe_gb.any_moe import StockMoE
from modeling_qwenmoe_gb.trainer import QwenMoeGBTrainer

from .any_moe_worker import ACCUMULATION, ENGINE, family_batch, seed_forward
from .dist_common import run_ranks, torchrun
from .stock_models import available, tiny_model
from .test_any_moe import BIASED, FAMILIES, family_params

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("any_moe")
    for family in FAMILIES:
        if available(family):
            torch.save(tiny_model(family).state_dict(), out / f"{family}_init.pt")
    for family, _ in ENGINE:
        tiny_model(family).save_pretrained(out / f"{family}_ckpt")
    run_ranks([*torchrun(), str(ROOT / "tests" / "any_moe_worker.py"), str(out)], timeout=900)
    return out


def reference_step(model: torch.nn.Module, ranks: int = 2, aux_free: bool = False) -> dict:
    """One process, the data of `ranks` ranks × the accumulation micro-steps: each rank's loss with the counts of every
    rank's micro-steps so far (the global scope, with `balance_loss` itself), averaged over ranks and micro-steps."""
    stock = StockMoE(model.train(), router_aux_loss_coef=0.5, aux_free=aux_free, aux_free_bias_update_rate=0.01)
    running, buffers, balances = 0, [], []
    for micro in range(ACCUMULATION):
        batches = [family_batch(micro, r) for r in range(ranks)]
        stats = []
        for rank, (ids, mask) in enumerate(batches):
            seed_forward(micro, rank)
            outputs = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
            stats.append((outputs.loss, stock.router_stats()))
        running = running + sum(s.counts.sum(1) for _, s in stats).round().long()
        buffers.append(running.clone())
        step_balances = []
        for loss, s in stats:
            balance, _ = balance_loss(stock.config, s, running)
            ((loss + balance) / (ACCUMULATION * ranks)).backward()
            step_balances.append(balance.detach())
        balances.append(step_balances)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    rate = stock.config.aux_free_bias_update_rate
    delta = rate * torch.sign(running.double().mean(-1, keepdim=True) - running.double())  # (L, E)
    stock.remove()
    return {"buffers": buffers, "balances": balances, "grads": grads, "bias_delta": delta}


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_global_scope_two_ranks_equal_one_process(workdir, family):
    model = tiny_model(family)
    model.load_state_dict(torch.load(workdir / f"{family}_init.pt"))
    before = [b.clone() for b in StockMoE(model).biases()]
    expected = reference_step(model, aux_free=family in BIASED)
    seen = [torch.load(workdir / f"ddp_{family}_rank{r}.pt") for r in range(2)]
    for rank, got in enumerate(seen):
        for micro in range(ACCUMULATION):
            torch.testing.assert_close(got["buffers"][micro], expected["buffers"][micro], rtol=0, atol=0)
            torch.testing.assert_close(got["balances"][micro], expected["balances"][micro][rank], rtol=1e-5, atol=1e-7)
        assert got["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if family in BIASED:
        for b0, delta, got0, got1 in zip(before, expected["bias_delta"], seen[0]["biases"], seen[1]["biases"]):
            torch.testing.assert_close(got0.double(), b0.double() + delta, rtol=0, atol=1e-7)
            assert torch.equal(got0, got1)  # identical on every rank


def stock_trainer_run(out: Path, family: str, batch: int, accumulation: int, aux_free: bool) -> dict:
    """`QwenMoeGBTrainer` on transformers' own model, SGD(lr=1) on one repeated sequence, one step; the parameters."""
    model = tiny_model(family)
    ids = torch.randint(1, 96, (12,), generator=torch.Generator().manual_seed(7)).tolist()
    dataset = Dataset.from_dict({"input_ids": [ids] * 16, "labels": [ids] * 16})
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = QwenMoeGBTrainer(
        model=model, args=args, train_dataset=dataset, router_aux_loss_coef=1.0, aux_free=aux_free,
        aux_free_bias_update_rate=0.01,
    )  # fmt: skip
    trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params.update({f"bias_{i}": b.clone() for i, b in enumerate(trainer.balancer.moe_model.biases())})
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        torch.save(params, out / "params.pt")
    return params


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_trainer_update_does_not_depend_on_the_split_of_the_step(workdir, tmp_path, family):
    """The scale rule on a stock model: 2 ranks × 1 × 2 accumulation = 1 × 1 × 4 = 1 × 4 × 1 (transformers' own aux
    loss fails this, `test_distributed.test_the_split_test_catches_transformers_aux_loss_scaling`)."""
    split = torch.load(workdir / f"split_{family}" / "params.pt")
    aux_free = family == "deepseek_v3"
    for name, batch, accumulation in (("1x1x4", 4, 1), ("1x4x1", 1, 4)):
        params = stock_trainer_run(tmp_path / name, family, batch, accumulation, aux_free)
        for key, value in split.items():
            torch.testing.assert_close(params[key], value, rtol=1e-5, atol=2e-6, msg=f"{name} {key}")


@pytest.mark.parametrize("family", [f for f, _ in ENGINE])
def test_transformers_fsdp2_ep_engine_step_equals_one_process(workdir, family):
    model = tiny_model(family)
    model.load_state_dict(torch.load(workdir / f"{family}_init.pt"))
    expected = reference_step(model)
    for rank in range(2):
        got = torch.load(workdir / f"engine_{family}_rank{rank}.pt")
        assert got["sharded"], "expert parallel did not split the experts"
        for micro in range(ACCUMULATION):
            torch.testing.assert_close(got["buffers"][micro], expected["buffers"][micro], rtol=0, atol=0)
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
