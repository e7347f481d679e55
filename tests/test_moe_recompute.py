"""MoE-aware selective recompute (`config.moe_recompute`): every mode gives the gradients (router included), the
counts and the step buffer of the step without recompute, for every scope and experts implementation, with
whole-layer checkpointing, routing replay, PEFT LoRA on the experts and compile; and what is kept for backward drops,
mode by mode."""

import pytest
import torch

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.balance import GlobalBalancer

from .conftest import tiny_config

MODES = ("expert_act", "experts", "moe")


def make(mode: str, impl: str = "eager", **config) -> QwenMoeGBForCausalLM:
    torch.manual_seed(0)
    fields = dict(aux_free=True, router_z_loss_coef=1e-3, device_balance_groups=2, micro_balance_coef=0.01)
    model = QwenMoeGBForCausalLM(tiny_config(moe_recompute=mode, **{**fields, **config})).train()
    model.set_experts_implementation(impl)
    return model


def step(model: QwenMoeGBForCausalLM, **forward) -> dict:
    """Two accumulation micro-steps with the balancer (padding in the first), then its step: gradients, the step
    buffer after each micro-step, the biases after the step."""
    balancer = GlobalBalancer(model)
    buffers = []
    for micro in range(2):
        ids = torch.randint(1, 99, (3, 16), generator=torch.Generator().manual_seed(micro))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0 if micro == 0 else 1
        out = model(input_ids=ids, attention_mask=mask, labels=ids, add_balance_loss=False, **forward)
        balance, _ = balancer(out.router_stats)
        ((out.loss + balance) / 2).backward()
        buffers.append(balancer.step_counts.clone())
    balancer.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    biases = torch.stack([b.clone() for b in balancer.moe_model.biases()])
    return {"grads": grads, "buffers": buffers, "biases": biases}


def assert_same_step(got: dict, expected: dict) -> None:
    assert got["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-6, atol=1e-6, msg=name)
    for a, b in zip(got["buffers"], expected["buffers"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # counted once: no second count, no second all-reduce
    torch.testing.assert_close(got["biases"], expected["biases"], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("scope", ["micro", "global", "sequence"])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_step_without_recompute(mode, scope, impl):
    expected = step(make("none", impl, balance_scope=scope))
    assert_same_step(step(make(mode, impl, balance_scope=scope)), expected)


@pytest.mark.parametrize("mode", MODES)
def test_with_whole_layer_checkpointing_and_routing_replay(mode):
    def run(model):
        model.gradient_checkpointing_enable()
        routing = torch.randint(0, 8, (3, 16, 2, 2)).sort(-1).values  # K distinct experts per token (almost always)
        routing[..., 1] = torch.where(routing[..., 0] == routing[..., 1], (routing[..., 1] + 1) % 8, routing[..., 1])
        return step(model, routed_experts=routing)

    assert_same_step(run(make(mode)), run(make("none")))


@pytest.mark.parametrize("mode", ["experts", "moe"])
def test_with_peft_lora_on_the_fused_experts(mode):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from modeling_qwenmoe_gb.sft import lora_config

    def run(model):
        torch.manual_seed(1)
        lora = get_peft_model(model, lora_config(rank=4, train_router=True))
        for name, param in lora.named_parameters():  # LoRA B starts at 0: move it so the experts' adapters count
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        return step(lora)

    assert_same_step(run(make(mode)), run(make("none")))


def kept_for_backward_mib(model: QwenMoeGBForCausalLM, ids: torch.Tensor) -> tuple[float, float]:
    """(activations alive when backward starts, from torch's MemTracker: what autograd saves plus what selective
    checkpointing caches; bytes the saved-tensor hooks see, unique storages, parameters left out)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    hooked: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            hooked[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
        snapshot = tracker.get_tracker_snapshot()
    out.loss.backward()
    activations = sum(v for device in snapshot.values() for k, v in device.items() if "ACT" in str(k))
    return activations / 2**20, sum(hooked.values()) / 2**20


def test_what_is_kept_for_backward_drops_mode_by_mode():
    ids = torch.randint(1, 99, (8, 128), generator=torch.Generator().manual_seed(0))
    kept = {}
    for mode in ("none", *MODES):
        model = make(mode, "grouped_mm", hidden_size=64, moe_intermediate_size=128)
        kept[mode] = kept_for_backward_mib(model, ids)
    live = [kept[m][0] for m in ("none", *MODES)]
    assert live == sorted(live, reverse=True) and len(set(live)) == 4, kept  # each mode keeps less than the last
    assert kept["experts"][1] < kept["none"][1] and kept["moe"][1] < kept["experts"][1]  # the hooks see it too
    assert kept["moe"][0] < 0.5 * kept["none"][0], kept


def test_compiled_model_with_recompute_equals_eager():
    eager = make("experts", "grouped_mm")
    compiled = make("experts", "grouped_mm")
    compiled.forward = torch.compile(compiled.forward, fullgraph=True)
    ids = torch.randint(1, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (eager, compiled):
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"moe_recompute='all' is unknown: allowed \['none', 'expert_act'"):
        tiny_config(moe_recompute="all")
