"""The balancer in one process: plain accelerate loop, metrics, eval and checkpointing guards, TensorBoard image."""

import pytest
import torch
from accelerate import Accelerator
from transformers import TrainingArguments

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.balance import GlobalBalancer, max_violation, per_layer_lbl
from modeling_qwenmoe_gb.trainer import QwenMoeGBTrainer

from .dist_common import batch_for, make_config, repeated_sequence_dataset


def test_plain_accelerate_loop_with_step_hook():
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = QwenMoeGBForCausalLM(make_config(aux_free=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    balancer = GlobalBalancer(model)
    balancer.register_step_hook(optimizer.optimizer)
    seen_counts = []
    for micro in range(4):
        with accelerator.accumulate(model):
            ids = batch_for(step=micro, rank=0)
            out = model(input_ids=ids, labels=ids, add_balance_loss=False)
            loss = out.loss + balancer(out.router_stats)[0]
            seen_counts.append(out.router_stats.counts.sum(1).long())
            accelerator.backward(loss)
            if micro == 0:
                torch.testing.assert_close(balancer.step_counts, seen_counts[0])
            optimizer.step()
            optimizer.zero_grad()
    assert balancer.step_counts.sum() == 0  # reset by the hook at each of the 2 optimizer steps
    bias = model.model.layers[0].mlp.gate.expert_bias
    assert bias.abs().max() <= 2 * model.config.aux_free_bias_update_rate + 1e-9
    assert bias.abs().sum() > 0
    metrics = balancer.pop_metrics()
    assert metrics["balance/bias_spread"] > 0 and "balance/maxvio_global/layer_0" in metrics


def test_max_violation_and_per_layer_lbl_by_hand():
    counts = torch.tensor([[4.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(max_violation(counts), torch.tensor([1.0, 0.0], dtype=torch.float64))
    model = QwenMoeGBForCausalLM(make_config()).eval()
    stats = model(input_ids=batch_for(0, 0)).router_stats
    lbl = per_layer_lbl(stats.counts.sum(1), stats)
    f = stats.counts.sum(1) / stats.counts.sum((1, 2))[:, None]
    p = stats.prob_sums.sum(1) / stats.num_tokens.sum(1)[:, None]
    torch.testing.assert_close(lbl, 8 * (f * p).sum(-1))


def test_gradient_checkpointing_counts_once_and_eval_counts_nothing():
    model = QwenMoeGBForCausalLM(make_config()).train()
    model.gradient_checkpointing_enable()
    balancer = GlobalBalancer(model)
    ids = batch_for(0, 0)
    out = model(input_ids=ids, labels=ids, add_balance_loss=False)
    (out.loss + balancer(out.router_stats)[0]).backward()
    torch.testing.assert_close(balancer.step_counts, out.router_stats.counts.sum(1).long())
    before = balancer.step_counts.clone()
    model.eval()
    with torch.no_grad():
        balancer(model(input_ids=ids).router_stats)
    torch.testing.assert_close(balancer.step_counts, before)


def test_trainer_eval_loss_is_ce_and_tensorboard_gets_the_heatmap(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = QwenMoeGBForCausalLM(make_config())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    data = repeated_sequence_dataset(8)
    trainer = QwenMoeGBTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    assert trainer.balancer.step_counts.sum() == 0
    model.eval()
    ids = torch.tensor(data["input_ids"][:2])
    with torch.no_grad():
        ce = model(input_ids=ids, labels=ids).loss
    assert metrics["eval_loss"] == pytest.approx(ce.item(), rel=1e-5)
    (event_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents*")}
    events = EventAccumulator(str(event_dir), size_guidance={"images": 0})
    events.Reload()
    assert "balance/expert_load" in events.Tags()["images"]
    assert "train/balance/global_lbl" in events.Tags()["scalars"]


def _reference_metrics(micro_steps: list, group_size: int, top_k: int) -> dict[str, torch.Tensor]:
    """float64 per-layer metrics of one optimizer step, one micro-step at a time: micro LBL and MaxVio over groups of
    `group_size` sequences, global LBL with the counts of micro-steps 1..m, z-loss averaged over layers."""
    sums = {"micro_lbl": 0, "global_lbl": 0, "maxvio_micro": 0, "z_loss": 0}
    running = 0
    for stats in micro_steps:
        c, p, n = stats.counts.double(), stats.prob_sums.detach().double(), stats.num_tokens.double()  # (L, B, ·)
        running = running + c.sum(1)  # (L, E)
        micro_lbl, maxvio = [], []
        for start in range(0, c.shape[1], group_size):
            gc, gp = c[:, start : start + group_size].sum(1), p[:, start : start + group_size].sum(1)
            gn = n[:, start : start + group_size].sum(1)  # (L,)
            f, pp = gc / gc.sum(-1, keepdim=True), gp / gn[:, None]
            micro_lbl.append(c.shape[-1] * (f * pp).sum(-1))
            maxvio.append((gc.amax(-1) - gc.mean(-1)) / gc.mean(-1))
        sums["micro_lbl"] = sums["micro_lbl"] + torch.stack(micro_lbl).mean(0)
        sums["maxvio_micro"] = sums["maxvio_micro"] + torch.stack(maxvio).mean(0)
        f = running / running.sum(-1, keepdim=True)
        pp = p.sum(1) / n.sum(1)[:, None]
        sums["global_lbl"] = sums["global_lbl"] + c.shape[-1] * (f * pp).sum(-1)
        sums["z_loss"] = sums["z_loss"] + (stats.z_sums.double().sum(1) / n.sum(1)).mean()
    return {name: value / len(micro_steps) for name, value in sums.items()}


@pytest.mark.parametrize("max_pending", [1, 64])
def test_metrics_computed_in_one_batch_equal_a_float64_reference_per_micro_step(max_pending):
    model = QwenMoeGBForCausalLM(make_config(balance_scope="global", balance_group_size=2)).train()
    balancer = GlobalBalancer(model, max_pending=max_pending)
    seen = []
    for micro, batch in enumerate([4, 4, 3, 4]):  # a short micro-batch: two shapes are batched separately
        ids = torch.randint(0, 61, (batch, 12), generator=torch.Generator().manual_seed(micro))
        out = model(input_ids=ids, labels=ids, add_balance_loss=False)
        (out.loss + balancer(out.router_stats)[0]).backward()
        seen.append(out.router_stats)
    expected = _reference_metrics(seen, group_size=2, top_k=2)
    global_counts = balancer.step_counts.double().clone()
    balancer.step()
    metrics = balancer.pop_metrics()
    for name, value in expected.items():
        per_layer = value.reshape(-1)
        assert metrics[f"balance/{name}"] == pytest.approx(float(per_layer.mean()), rel=1e-5), name
        for i, v in enumerate(per_layer if len(per_layer) > 1 else []):
            assert metrics[f"balance/{name}/layer_{i}"] == pytest.approx(float(v), rel=1e-5), (name, i)
    maxvio_global = (global_counts.amax(-1) - global_counts.mean(-1)) / global_counts.mean(-1)
    assert metrics["balance/maxvio_global"] == pytest.approx(float(maxvio_global.mean()), rel=1e-6)
    load = balancer.last_step_load
    torch.testing.assert_close(load, global_counts / global_counts.sum(-1, keepdim=True))
    assert balancer.pop_metrics() == {} and balancer.step_counts.sum() == 0


def test_no_host_sync_in_the_training_step():
    # `.item()`, `float(t)`, `if t:` and `t.tolist()` all reach the kernels as `_local_scalar_dense` / `is_nonzero`:
    # on a GPU each is a host sync. The router, the balance loss, the counts and the aux-free step make none.
    from modeling_qwenmoe_gb.benchmark import _OpCounter

    model = QwenMoeGBForCausalLM(make_config(balance_scope="global", aux_free=True, router_z_loss_coef=0.01)).train()
    model.set_experts_implementation("grouped_mm")
    balancer = GlobalBalancer(model)
    recorder = _OpCounter()
    # packed batches, no attention mask: with a padding mask transformers' own `create_causal_mask` checks
    # `padding_mask.all()` on the host (for its models as for ours)
    with recorder:
        for micro in range(2):
            ids = batch_for(micro, 0)
            out = model(input_ids=ids, labels=ids, add_balance_loss=False)
            (out.loss + balancer(out.router_stats)[0]).backward()
        balancer.step()
    assert "index_add" in recorder.ops or "scatter_add" in recorder.ops  # the recorder saw the step
    assert not recorder.ops.keys() & {"_local_scalar_dense", "is_nonzero", "item", "nonzero"}
    assert balancer.pop_metrics()["balance/bias_spread"] > 0  # reading the metrics is where the host waits


def test_state_dict_carries_the_metrics_of_an_unfinished_logging_window():
    """A checkpoint taken between two logs: a new balancer loaded with `state_dict()` logs what the old one would."""
    model = QwenMoeGBForCausalLM(make_config(aux_free=True)).train()

    def run(balancer, steps):
        for step in steps:
            for micro in range(2):
                ids = batch_for(step=2 * step + micro, rank=0)
                balancer(model(input_ids=ids, labels=ids, add_balance_loss=False).router_stats)
            balancer.step()

    first = GlobalBalancer(model)
    run(first, [0, 1])
    state = first.state_dict()
    biases = [r.expert_bias.clone() for r in model.model.moe_routers()]
    run(first, [2])
    expected = first.pop_metrics()
    for router, bias in zip(model.model.moe_routers(), biases):  # back to the checkpoint (biases live in the model)
        router.expert_bias.copy_(bias)
    resumed = GlobalBalancer(model)
    resumed.load_state_dict(state)
    run(resumed, [2])
    assert resumed.pop_metrics() == expected
    fresh = GlobalBalancer(model)
    for router, bias in zip(model.model.moe_routers(), biases):
        router.expert_bias.copy_(bias)
    run(fresh, [2])
    assert fresh.pop_metrics() != expected  # without the state, the window would start over


def test_device_maxvio_of_virtual_groups_and_ep_without_expert_parallel():
    """`balance/maxvio_device` over virtual groups (no EP) equals a float64 recomputation from the step's counts;
    `device_balance_groups="ep"` on a model that is not expert-parallel is one group (no device metric)."""
    model = QwenMoeGBForCausalLM(make_config(device_balance_groups=[[0, 5], [1, 2, 3], [4, 6, 7]])).train()
    balancer = GlobalBalancer(model)
    ids = batch_for(step=0, rank=0)
    balancer(model(input_ids=ids, labels=ids, add_balance_loss=False).router_stats)
    counts = balancer.step_counts.double().clone()
    balancer.step()
    metrics = balancer.pop_metrics()
    loads = torch.stack([counts[:, [0, 5]].sum(-1), counts[:, [1, 2, 3]].sum(-1), counts[:, [4, 6, 7]].sum(-1)], -1)
    expected = (loads.amax(-1) - loads.mean(-1)) / loads.mean(-1)
    for layer in range(2):
        assert metrics[f"balance/maxvio_device/layer_{layer}"] == pytest.approx(float(expected[layer]), abs=1e-12)
    assert "balance/maxvio_device_delivered" not in metrics  # no expert parallel: nothing was dispatched
    ep_model = QwenMoeGBForCausalLM(make_config(device_balance_groups="ep"))
    assert ep_model.model.expert_groups() == [list(range(8))]
    assert GlobalBalancer(ep_model).device_groups is None
