"""2 CPU processes (torchrun, gloo) against single-process references computed here, in the parent."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Trainer, TrainingArguments

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM, balance_loss, switch_balance_loss
from modeling_qwenmoe_gb.balance import GlobalBalancer

from .dist_common import ROUTING, batch_for, make_config, repeated_sequence_dataset, run_ranks, torchrun, trainer_run

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(make_config()).double()
    torch.save(model.state_dict(), out / "init.pt")
    torch.save(QwenMoeGBForCausalLM(make_config(aux_free=True)).state_dict(), out / "init_f32.pt")
    routing = QwenMoeGBForCausalLM(make_config(**ROUTING)).double()
    for router in routing.model.moe_routers():
        router.expert_bias.normal_(0, 0.05)  # a trained bias: it moves selections
    torch.save(routing.state_dict(), out / "init_routing.pt")
    save_parallel_checkpoints(out)
    run_ranks(worker(out))
    return out


def worker(out: Path, *extra: str) -> list[str]:
    return [*torchrun(), str(ROOT / "tests" / "distributed_worker.py"), str(out), *extra]


def save_parallel_checkpoints(out: Path) -> None:
    """Tied and untied checkpoints, the input ids, and the one-process logits and loss of each (the references)."""
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.save(ids, out / "parallel_ids.pt")
    references = {}
    for tied in ("tied", "untied"):
        model = QwenMoeGBForCausalLM(make_config(tie_word_embeddings=tied == "tied")).eval()
        model.save_pretrained(out / f"parallel_{tied}")
        with torch.no_grad():
            outputs = model(input_ids=ids, labels=ids)
        references[tied] = {"logits": outputs.logits, "loss": outputs.loss}
    torch.save(references, out / "parallel_reference.pt")


def reference_model(out: Path, scope: str) -> QwenMoeGBForCausalLM:
    model = QwenMoeGBForCausalLM(make_config(balance_scope=scope)).double().train()
    model.set_experts_implementation("eager")
    model.load_state_dict(torch.load(out / "init.pt"))
    return model


def test_global_scope_two_ranks_equal_one_process_on_the_concatenation(workdir):
    model = reference_model(workdir, "global")
    ids = [batch_for(step=0, rank=r) for r in range(2)]
    all_ids = torch.cat(ids)
    out = model(input_ids=all_ids, labels=all_ids, add_balance_loss=False)
    balance, _ = GlobalBalancer(model)(out.router_stats)
    (out.loss + balance).backward()
    counts_all = out.router_stats.counts.sum(1)  # (L, E)
    for rank in range(2):
        seen = torch.load(workdir / f"ddp_global_rank{rank}.pt")
        torch.testing.assert_close(seen["counts"], counts_all.long(), rtol=0, atol=0)
        with torch.no_grad():
            local = model(input_ids=ids[rank], labels=ids[rank], add_balance_loss=False)
            expected, _ = balance_loss(model.config, local.router_stats, global_counts=counts_all)
        torch.testing.assert_close(seen["balance"], expected, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(seen["loss"], local.loss + expected, rtol=1e-6, atol=1e-9)
        for name, param in model.named_parameters():
            torch.testing.assert_close(seen["grads"][name], param.grad, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("name", ["routing", "routing_dropless"])
def test_every_routing_option_keeps_global_counts_exact_across_ranks(workdir, name):
    """Sigmoid + aux-free + group-limited + routed scaling (+ capacity dropping): 2 ranks × 2 micro-steps against one
    process running the same 4 micro-batches — the buffer after each micro-step and the aux-free biases exactly, each
    micro-step's loss to float64 rounding. Capacity is per forward, so the reference runs the same forwards; without
    capacity, one forward of all 4 micro-batches counts the same."""
    fields = ROUTING if name == "routing" else {**ROUTING, "expert_capacity_factor": None}
    model = QwenMoeGBForCausalLM(make_config(**fields)).double().train()
    model.set_experts_implementation("eager")
    model.load_state_dict(torch.load(workdir / "init_routing.pt"))
    stats = {(m, r): model(input_ids=batch_for(m, r)).router_stats for m in range(2) for r in range(2)}
    served = {key: s.counts.sum(1).round().long() for key, s in stats.items()}
    buffers = [served[0, 0] + served[0, 1], served[0, 0] + served[0, 1] + served[1, 0] + served[1, 1]]
    if name == "routing":
        assert buffers[1].sum() < 2 * 4 * 2 * 12 * 2  # some selections were dropped (L=2, K=2, 4 × 2 × 12 tokens)
    else:
        everything = torch.cat([batch_for(m, r) for m in range(2) for r in range(2)])
        concatenated = model(input_ids=everything).router_stats.counts.sum(1).round().long()
        torch.testing.assert_close(concatenated, buffers[1], rtol=0, atol=0)
    rate = model.config.aux_free_bias_update_rate
    start = torch.stack([r.expert_bias.clone() for r in model.model.moe_routers()])
    step = rate * torch.sign(buffers[1].double().mean(-1, keepdim=True) - buffers[1].double())
    expected_bias = start + step.to(start.dtype)  # the fp32 bias moves by the fp32 step, as the balancer does
    for rank in range(2):
        seen = torch.load(workdir / f"{name}_rank{rank}.pt")
        for micro in range(2):
            torch.testing.assert_close(seen["buffers"][micro], buffers[micro], rtol=0, atol=0)
            expected, _ = balance_loss(model.config, stats[micro, rank], global_counts=buffers[micro])
            torch.testing.assert_close(seen["balance"][micro], expected.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(seen["biases"], expected_bias, rtol=0, atol=0)


def test_micro_scope_differs_from_the_global_reference(workdir):
    ids = [batch_for(step=0, rank=r) for r in range(2)]
    glob = reference_model(workdir, "global")
    all_ids = torch.cat(ids)
    out = glob(input_ids=all_ids, labels=all_ids, add_balance_loss=False)
    (out.loss + GlobalBalancer(glob)(out.router_stats)[0]).backward()
    micro = reference_model(workdir, "micro")
    for rank_ids in ids:  # the micro objective: mean over ranks of each rank's own micro-batch loss
        o = micro(input_ids=rank_ids, labels=rank_ids)
        (o.loss / 2).backward()
    seen = torch.load(workdir / "ddp_micro_rank0.pt")
    name = "model.layers.0.mlp.gate.weight"
    torch.testing.assert_close(seen["grads"][name], dict(micro.named_parameters())[name].grad, rtol=1e-6, atol=1e-9)
    gap = (seen["grads"][name] - dict(glob.named_parameters())[name].grad).abs().max()
    assert gap > 1e-4, f"micro and global router gradients agree ({gap}): the test could not tell them apart"


def test_accumulation_buffer_uses_micro_steps_one_to_m_of_both_ranks(workdir):
    model = QwenMoeGBForCausalLM(make_config(aux_free=True)).train()
    model.load_state_dict(torch.load(workdir / "init_f32.pt"))
    running = torch.zeros(2, 8, dtype=torch.long)
    ranks = [torch.load(workdir / f"accum_rank{r}.pt") for r in range(2)]
    with torch.no_grad():
        for micro in range(4):
            for rank in range(2):
                running += model(input_ids=batch_for(step=micro, rank=rank)).router_stats.counts.sum(1).long()
            for rank, seen in enumerate(ranks):
                torch.testing.assert_close(seen["buffers"][micro], running, rtol=0, atol=0)
                stats = model(input_ids=batch_for(step=micro, rank=rank)).router_stats
                expected = switch_balance_loss(running, stats.prob_sums.sum(1), stats.num_tokens.sum(1))
                torch.testing.assert_close(seen["lbl"][micro], expected, rtol=1e-5, atol=1e-7)
    rate = model.config.aux_free_bias_update_rate
    expected_bias = rate * torch.sign(running.double().mean(-1, keepdim=True) - running.double())
    for seen in ranks:
        assert seen["after_step"].sum() == 0  # reset at the optimizer step; the eval forward added nothing
        torch.testing.assert_close(seen["biases"], expected_bias.float(), rtol=0, atol=1e-9)
    torch.testing.assert_close(ranks[0]["biases"], ranks[1]["biases"], rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["micro", "global"])
def test_update_does_not_depend_on_the_split_of_the_step(workdir, tmp_path, scope):
    """One sequence repeated: 1 rank × 1 × 4, 1 rank × 4 accumulation × 1 and 2 ranks × 1 × 2 give one update."""
    split_2x1x2 = torch.load(workdir / f"trainer_{scope}_2x1x2" / "params.pt")
    for name, batch, accumulation in (("1x1x4", 4, 1), ("1x4x1", 1, 4)):
        model = trainer_run(tmp_path / name, scope, batch=batch, accumulation=accumulation)
        params = dict(model.named_parameters())
        for key in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight"):
            torch.testing.assert_close(params[key].detach(), split_2x1x2[key], rtol=1e-5, atol=2e-6, msg=name + key)


def stock_qwen2_moe_update(out: Path, batch: int, accumulation: int) -> torch.Tensor:
    torch.manual_seed(0)
    cfg = make_config().to_dict()
    cfg.pop("model_type", None)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**cfg, "output_router_logits": True, "router_aux_loss_coef": 1.0}))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=repeated_sequence_dataset(16)).train()
    return model.model.layers[0].mlp.gate.weight.detach().clone()


def test_the_split_test_catches_transformers_aux_loss_scaling(tmp_path):
    """The same check fails for transformers' own Qwen2-MoE + Trainer (its aux loss is not divided by GA)."""
    whole = stock_qwen2_moe_update(tmp_path / "a", batch=4, accumulation=1)
    accumulated = stock_qwen2_moe_update(tmp_path / "b", batch=1, accumulation=4)
    assert (whole - accumulated).abs().max() > 1e-3


def test_real_trainer_two_processes_logs_metrics_and_saves_a_checkpoint(workdir):
    run = workdir / "trainer_logged"
    history = json.loads((run / "log_history.json").read_text())
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 3
    for key in (
        "balance/global_lbl",
        "balance/micro_lbl",
        "balance/maxvio_global",
        "balance/maxvio_micro",
        "balance/z_loss",
        "balance/bias_spread",
        "balance/global_lbl/layer_1",
    ):
        assert key in train_logs[-1], key
    assert all(h["balance/micro_lbl"] >= 1.0 - 1e-6 for h in train_logs)  # E·Σ f P >= 1 when f = P-ish
    assert train_logs[-1]["balance/bias_spread"] > 0  # aux-free biases moved
    reloaded = AutoModelForCausalLM.from_pretrained(run / "checkpoint-3")
    final = torch.load(run / "params.pt")
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=0, atol=0, msg=name)
    assert reloaded.model.layers[0].mlp.gate.expert_bias.abs().sum() > 0


def test_sub_groups_of_one_rank_keep_local_counts(workdir):
    model = QwenMoeGBForCausalLM(make_config()).train()
    model.load_state_dict(torch.load(workdir / "init_f32.pt"), strict=False)
    with torch.no_grad():
        for rank in range(2):
            local = model(input_ids=batch_for(step=0, rank=rank)).router_stats.counts.sum(1).long()
            torch.testing.assert_close(torch.load(workdir / f"subgroup_rank{rank}.pt"), local, rtol=0, atol=0)


def test_cli_pretrain_runs_unchanged_under_torchrun(workdir):
    run = workdir / "cli_ddp"
    history = json.loads((run / "log_history.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [2, 4]
    assert "balance/maxvio_global" in history[0]
    assert json.loads((run / "eval.json").read_text())["average_ppl"] > 1.0
    assert (run / "model.safetensors").is_file() and (run / "README.md").is_file()
    assert json.loads((run / "data_info.json").read_text())["world_size"] == 2


def test_uneven_last_batch_counts_every_rank_once(workdir):
    model = QwenMoeGBForCausalLM(make_config()).train()
    model.load_state_dict(torch.load(workdir / "init_f32.pt"), strict=False)
    with torch.no_grad():
        stats = [model(input_ids=batch_for(step=9, rank=r)[: 2 - r]).router_stats for r in range(2)]
    total = sum(s.counts.sum(1) for s in stats).long()  # 3 sequences in all
    for rank in range(2):
        seen = torch.load(workdir / f"uneven_rank{rank}.pt")
        torch.testing.assert_close(seen["counts"], total, rtol=0, atol=0)
        local = stats[rank]
        expected = switch_balance_loss(total, local.prob_sums.sum(1), local.num_tokens.sum(1))
        torch.testing.assert_close(seen["lbl"], expected, rtol=1e-5, atol=1e-7)


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    """The job ends (a hang would hit the timeout) and the failure shows the rank's own error, launched once."""
    torch.save(QwenMoeGBForCausalLM(make_config()).state_dict(), tmp_path / "init_f32.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error is not a crash: no second launch
        with pytest.raises(AssertionError, match="rank 1 failed: bad shard"):
            run_ranks(worker(tmp_path, "raise"), timeout=120)


def test_a_rank_killed_by_a_signal_is_launched_once_more_with_its_stack_kept(tmp_path):
    """Rank 0 aborts on the first launch: `run_ranks` warns with the fault handler's stack of that rank and the
    second launch finishes on both ranks."""
    with pytest.warns(UserWarning, match="killed by signal 6") as caught:
        run_ranks(worker(tmp_path, "abort_once"), timeout=120)
    assert "Fatal Python error: Aborted" in str(caught[0].message)
    assert "in aborting_once" in str(caught[0].message)
    assert [(tmp_path / f"finished_rank{rank}").exists() for rank in range(2)] == [True, True]


def test_fsdp2_sharded_training_matches_one_process(workdir):
    model = QwenMoeGBForCausalLM(make_config()).train()
    model.load_state_dict(torch.load(workdir / "init_f32.pt"), strict=False)
    model.set_experts_implementation("eager")
    ids = [batch_for(step=0, rank=r) for r in range(2)]
    all_ids = torch.cat(ids)
    out = model(input_ids=all_ids, labels=all_ids, add_balance_loss=False)
    (out.loss + GlobalBalancer(model)(out.router_stats)[0]).backward()
    counts = out.router_stats.counts.sum(1).long()
    for rank in range(2):
        seen = torch.load(workdir / f"fsdp2_rank{rank}.pt")
        assert seen["sharded"], "FSDP2 did not shard the router weight"
        torch.testing.assert_close(seen["counts"], counts, rtol=0, atol=0)
        for name, grad in seen["grads"].items():
            torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["tp2", "tp2_ep2", "fsdp2_ep2"])
@pytest.mark.parametrize("tied", ["tied", "untied"])
def test_native_parallel_forward_equals_one_process(workdir, tied, layout):
    """transformers' parallel engine on 2 gloo ranks (TP, TP + EP, FSDP2 + EP; the head's `_tp_plan` makes tied
    embeddings work) gives every rank the logits and loss of the one-process model."""
    reference = torch.load(workdir / "parallel_reference.pt")[tied]
    for rank in range(2):
        got = torch.load(workdir / f"parallel_rank{rank}.pt")[f"{tied}_{layout}"]
        torch.testing.assert_close(got["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-5, atol=1e-5)


def test_grpo_replay_on_two_ranks_counts_the_replayed_experts_of_both(tmp_path):
    """TRL GRPO with rollout replay under DDP (2 processes): every rank's balancer holds, before each optimizer step,
    the counts of both ranks' micro-batches: the sum over ranks of `torch.bincount` of the replayed experts at real
    tokens (plus the top-k of the last positions generation never ran), identical on both ranks; the aux-free biases
    stay identical; no token is routed off its recorded experts."""
    pytest.importorskip("trl")
    from modeling_qwenmoe_gb.rl import ROLLOUT_KEY

    run_ranks(worker(tmp_path, "grpo"))
    ranks = [torch.load(tmp_path / f"grpo_rank{r}.pt", weights_only=False) for r in range(2)]
    assert len(ranks[0]["counts"]) == len(ranks[1]["counts"]) == 2
    for step in range(2):
        expected, free_positions, local = 0, 0, []
        for rank in ranks:
            batch = rank["seen"][step]
            real = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1).bool()
            replayed = batch[ROLLOUT_KEY].long()
            free = real & (replayed[..., 0, 0] < 0)
            layers = [torch.bincount(replayed[:, :, i][real & ~free].flatten(), minlength=8) for i in range(2)]
            local.append(torch.stack(layers))
            expected, free_positions = expected + local[-1], free_positions + int(free.sum())
        assert torch.equal(ranks[0]["counts"][step], ranks[1]["counts"][step])  # all-reduced: the same everywhere
        extra = ranks[0]["counts"][step] - expected
        assert (extra >= 0).all() and (extra.sum(-1) == 2 * free_positions).all()
        assert not torch.equal(local[0], local[1])  # the ranks saw different data: the sum is really global
    for a, b in zip(ranks[0]["biases"], ranks[1]["biases"]):
        assert torch.equal(a, b) and a.abs().sum() > 0
    assert all(h["routing/mismatch_rollout"] == 0.0 for rank in ranks for h in rank["logs"])
