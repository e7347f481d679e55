"""transformers' native parallel engine (`from_pretrained(distributed_config=DistributedConfig(...))`) on 2 gloo
processes: the balancer counts over exactly the data-parallel ranks, a step equals one process on the same data, and a
model trained and saved under FSDP2 + EP is a normal Hub folder that reloads (also as remote code) with its logits."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM, balance_loss
from modeling_qwenmoe_gb.hub import push_folder, write_model_card
from modeling_qwenmoe_gb.quantile import QuantileState

from .dist_common import batch_for, run_ranks, save_start, torchrun
from .engine_worker import FOUR_PROCESS_STEPS, STEPS
from .hub_server import HubServer
from .test_hub_round_trip import pull

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    save_start(out)
    worker = str(ROOT / "tests" / "engine_worker.py")
    run_ranks([*torchrun(2), worker, str(out)], timeout=900)
    run_ranks([*torchrun(4), worker, str(out), "four"], timeout=900)
    return out


def reference_step(out: Path, scope: str, accumulation: int, ranks: int, groups=None, **config) -> dict:
    """One process: the data of `ranks` ranks × `accumulation` micro-steps, each rank's loss with the counts of every
    rank's micro-steps so far (global scope), averaged over ranks and micro-steps (`loss`: that average)."""
    model = QwenMoeGBForCausalLM.from_pretrained(
        out / "ckpt", balance_scope=scope, device_balance_groups=groups, **config
    )
    model.train()
    running, buffers, total = torch.zeros(2, 8, dtype=torch.long), [], 0.0
    quantile = QuantileState(model.config) if model.config.aux_free_method == "quantile" else None
    for micro in range(accumulation):
        batches = [batch_for(step=micro, rank=r) for r in range(ranks)]
        with torch.no_grad():
            running += sum(model(input_ids=ids).router_stats.counts.sum(1) for ids in batches).round().long()
        buffers.append(running.clone())
        for ids in batches:
            outputs = model(input_ids=ids, labels=ids, add_balance_loss=False)
            if quantile is not None:
                quantile.observe(outputs.router_stats)
            balance, _ = balance_loss(model.config, outputs.router_stats, running if scope == "global" else None)
            objective = (outputs.loss + balance) / (accumulation * ranks)
            objective.backward()
            total += float(objective.detach())
    rate = model.config.aux_free_bias_update_rate
    bias = rate * torch.sign(running.double().mean(-1, keepdim=True) - running.double())
    grads = {n: p.grad for n, p in model.named_parameters()}
    result = {"buffers": buffers, "grads": grads, "biases": bias.float(), "loss": total}
    if quantile is not None:  # QB replaces the bias: the value after the step (one process, the same statistics)
        quantile.update([router.expert_bias for router in model.model.moe_routers()])
        result["biases"] = result["biases_after"] = torch.stack([r.expert_bias for r in model.model.moe_routers()])
    return result


@pytest.mark.parametrize("name", [*STEPS, *FOUR_PROCESS_STEPS])
def test_engine_step_equals_one_process(workdir, name):
    """Counts buffer per micro-step (exact; a TP group counts its shared batch once), every gradient, and the aux-free
    bias (identical on every rank) equal one process on the same data (2 processes; 4 for HSDP 2 × 2 with EP)."""
    _, scope, accumulation, distinct, groups, *extra = {**STEPS, **FOUR_PROCESS_STEPS}[name]
    config = {k: v for k, v in (extra[0] if extra else {}).items() if k != "moe_recompute"}  # reference: no recompute
    world = 4 if name in FOUR_PROCESS_STEPS else 2
    ep_blocks = [[0, 1, 2, 3], [4, 5, 6, 7]]  # what EP rank 0 and 1 hold: the one-process reference's explicit groups
    reference_groups = ep_blocks if groups == "ep" else groups
    ranks = world if distinct else 1
    expected = reference_step(workdir, scope, accumulation, ranks=ranks, groups=reference_groups, **config)
    seen = [torch.load(workdir / f"{name}_rank{rank}.pt") for rank in range(world)]
    for rank_seen in seen:
        for got, want in zip(rank_seen["buffers"], expected["buffers"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert set(rank_seen["grads"]) == {n for n, g in expected["grads"].items() if g is not None}
        for param, grad in rank_seen["grads"].items():
            torch.testing.assert_close(grad, expected["grads"][param], rtol=1e-4, atol=1e-6, msg=param)
        # QB: a quantile of margins of a forward that matches one process to float rounding (a sharded matmul)
        tolerance = 1e-6 if "qb" in name else 1e-9
        torch.testing.assert_close(rank_seen["biases"], expected["biases"], rtol=0, atol=tolerance)
        if "qb" in name:
            assert rank_seen["biases"].abs().amax() > 1e-4  # the bias moved
    for rank_seen in seen[1:]:
        torch.testing.assert_close(rank_seen["biases"], seen[0]["biases"], rtol=0, atol=0)
    if groups == "ep":
        assert all(rank_seen["groups"] == ep_blocks for rank_seen in seen)  # read from the loaded model's sharding


def test_device_maxvio_from_the_all_to_all_equals_the_one_from_the_counts(workdir):
    """Under FSDP2 + EP with the counting all-to-all: every (token, expert) pair the router chose was delivered once
    (delivered counts == global counts, exactly), and MaxVio over the EP ranks measured from the deliveries equals the
    one from the counts, per layer; both equal a float64 recomputation."""
    for rank in range(2):
        seen = torch.load(workdir / f"fsdp2_ep2_device_ep_rank{rank}.pt")
        torch.testing.assert_close(seen["delivered"], seen["step_counts"], rtol=0, atol=0)
        loads = seen["step_counts"].double().view(2, 2, 4).sum(-1)  # (L, EP ranks)
        expected = (loads.amax(-1) - loads.mean(-1)) / loads.mean(-1)
        for layer in range(2):
            measured = seen["metrics"][f"balance/maxvio_device_delivered/layer_{layer}"]
            assert measured == pytest.approx(seen["metrics"][f"balance/maxvio_device/layer_{layer}"], abs=1e-12)
            assert measured == pytest.approx(float(expected[layer]), abs=1e-12)
        assert seen["metrics"]["balance/maxvio_device"] > 0


def test_device_limited_routing_bounds_the_ranks_each_token_reaches_under_ep(workdir):
    """n_group = ep_size = 2, topk_group = 1: every token's experts lie on one EP rank (so its pairs go to at most one
    rank); without the limit some tokens reach both. The all-to-all delivered exactly the chosen pairs."""
    for rank in range(2):
        limited = torch.load(workdir / f"fsdp2_ep2_device_limited_rank{rank}.pt")
        free = torch.load(workdir / f"fsdp2_ep2_device_ep_rank{rank}.pt")
        torch.testing.assert_close(limited["delivered"], limited["step_counts"], rtol=0, atol=0)
        for routed, bound in ((limited["routed"], 1), (free["routed"], 2)):
            owner = torch.cat(routed) // 4  # (B, S, L, K): the EP rank holding each chosen expert
            reached = (owner == 0).any(-1).long() + (owner == 1).any(-1).long()  # (B, S, L) ranks per token
            assert reached.max() == bound
        limited_off = (torch.cat(limited["routed"]) // 4 != rank).any(-1).float().mean()
        free_off = (torch.cat(free["routed"]) // 4 != rank).any(-1).float().mean()
        assert limited_off < free_off  # fewer tokens leave the rank at all
    for name in ("fsdp2_ep2_device_limited", "fsdp2_ep2_device_ep"):  # the logged shares equal the routing's
        seen = [torch.load(workdir / f"{name}_rank{rank}.pt") for rank in range(2)]
        owners = [torch.cat(s["routed"]) // 4 for s in seen]  # per rank (B, S, L, K)
        for layer in range(2):
            tokens = sum(int((o[:, :, layer] != r).any(-1).sum()) for r, o in enumerate(owners)) / (
                2 * owners[0][..., 0, 0].numel()
            )
            rows = sum(int((o[:, :, layer] != r).sum()) for r, o in enumerate(owners)) / (
                2 * owners[0][:, :, layer].numel()
            )
            metrics = seen[0]["metrics"]
            assert metrics[f"balance/tokens_off_rank/layer_{layer}"] == pytest.approx(tokens, abs=1e-12)
            assert metrics[f"balance/sent_off_rank/layer_{layer}"] == pytest.approx(rows, abs=1e-12)


def test_global_and_micro_steps_differ(workdir):
    """The references above can tell the scopes apart (the global test is not passing by accident)."""
    glob = reference_step(workdir, "global", 1, 2)["grads"]["model.layers.0.mlp.gate.weight"]
    micro = reference_step(workdir, "micro", 1, 2)["grads"]["model.layers.0.mlp.gate.weight"]
    assert (glob - micro).abs().max() > 1e-4


def test_saved_under_fsdp2_ep2_is_a_normal_hub_folder(workdir, tmp_path, monkeypatch):
    """`save_model` under FSDP2 + EP: the layout of a one-process save (our code files and auto_map, no torch
    files); the folder reloads with the training logits, and pushed to the loopback Hub, pulls with
    `trust_remote_code` in a fresh process without the package and gives them too."""
    saved = workdir / "engine_saved"
    one_process = tmp_path / "one_process"
    QwenMoeGBForCausalLM.from_pretrained(workdir / "ckpt").save_pretrained(one_process)
    python_files = {p.name for p in saved.glob("*.py")}
    assert python_files == {p.name for p in one_process.glob("*.py")} == {
        "configuration_qwenmoe_gb.py", "modeling_qwenmoe_gb.py"
    }  # fmt: skip
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == json.loads((one_process / "config.json").read_text())["auto_map"]
    assert config["architectures"] == ["QwenMoeGBForCausalLM"]
    trained = torch.load(workdir / "engine_saved_rank0.pt")
    ids = torch.load(workdir / "ids.pt")
    model = QwenMoeGBForCausalLM.from_pretrained(saved).eval()
    reloaded = dict(model.named_parameters())
    assert reloaded.keys() == trained["params"].keys()
    for name, param in trained["params"].items():  # the weights as trained, bit for bit
        torch.testing.assert_close(reloaded[name].detach(), param, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model(ids).logits, trained["logits"], rtol=1e-5, atol=1e-5)  # EP vs one-process kernels
    torch.testing.assert_close(torch.stack([r.expert_bias for r in model.model.moe_routers()]), trained["biases"])
    assert trained["biases"].abs().sum() > 0  # the aux-free bias moved in training and was saved
    torch.save(ids, tmp_path / "ids.pt")
    with HubServer() as hub:  # push to the loopback Hub, pull in a fresh process without the package
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this server is loopback
        shutil.copytree(saved, tmp_path / "card")
        write_model_card(tmp_path / "card", model.config, repo_id="someone/engine-trained")
        push_folder(tmp_path / "card", "someone/engine-trained", api=HfApi(endpoint=hub.endpoint, token="hf_test"))
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   HF_HUB_DISABLE_XET="1")  # fmt: skip
        pulled = pull("someone/engine-trained", tmp_path, env, "pulled")
    torch.testing.assert_close(pulled, trained["logits"], rtol=1e-5, atol=1e-5)


def test_resume_under_fsdp2_ep2_is_bit_identical(workdir):
    """Checkpoint-2 of a 4-step AdamW run (model and optimizer as DCP shards, scheduler, RNG, balance state) resumed by
    a fresh model: the weights, aux-free biases and every logged value of steps 3-4 equal the uninterrupted run."""
    checkpoint = workdir / "resume_full" / "checkpoint-2"
    assert (checkpoint / "dcp_model").is_dir() and (checkpoint / "dcp_optimizer").is_dir()
    assert {p.name for p in checkpoint.glob("balance_state_rank*.pt")} == {
        "balance_state_rank0.pt",
        "balance_state_rank1.pt",
    }
    for rank in range(2):
        full = torch.load(workdir / f"resume_full_rank{rank}.pt")
        resumed = torch.load(workdir / f"resume_same_rank{rank}.pt")
        for name, param in full["params"].items():
            torch.testing.assert_close(resumed["params"][name], param, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(resumed["biases"], full["biases"], rtol=0, atol=0)
        assert full["biases"].abs().sum() > 0
        assert [e["step"] for e in resumed["logs"]] == [1, 2, 3, 4]  # 1-2 from the checkpoint's trainer state
        assert resumed["logs"] == full["logs"]
        assert "balance/global_lbl" in resumed["logs"][0] and "ce_loss" in resumed["logs"][0]


def test_resume_on_another_layout(workdir):
    """The same checkpoint resumed under FSDP2 without EP (DCP reshards the experts and their Adam moments): the same
    run up to the reduction order."""
    for rank in range(2):
        full = torch.load(workdir / f"resume_full_rank{rank}.pt")
        other = torch.load(workdir / f"resume_fsdp_only_rank{rank}.pt")
        for name, param in full["params"].items():
            torch.testing.assert_close(other["params"][name], param, rtol=1e-4, atol=1e-5, msg=name)
        assert [e["step"] for e in other["logs"]] == [1, 2, 3, 4]
        for a, b in zip(other["logs"][2:], full["logs"][2:]):
            assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["balance/global_lbl"] - b["balance/global_lbl"]) < 1e-4


def test_cli_pretrain_on_the_engine_and_resume(workdir):
    """`qwenmoe-gb pretrain --fsdp_size 2 --ep_size 2` under torchrun: trains, saves a normal folder, evaluates it;
    resumed from its checkpoint-2, the same command ends with the same weights, bit for bit."""
    from safetensors.torch import load_file

    run, resumed = workdir / "cli_engine", workdir / "cli_engine_resumed"
    for folder in (run, resumed):
        assert {"model.safetensors", "eval.json", "specialization.json", "README.md"} <= {
            p.name for p in folder.iterdir()
        }
        assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith(
            "modeling_qwenmoe_gb."
        )
    weights, again = load_file(run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights.keys() == again.keys()
    for key, value in weights.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    assert json.loads((run / "eval.json").read_text()) == json.loads((resumed / "eval.json").read_text())
    logs = [e for e in json.loads((run / "log_history.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 2  # --device_balance_groups ep: device MaxVio from the counts and from the all-to-all
    for entry in logs:
        assert entry["balance/maxvio_device_delivered"] == pytest.approx(entry["balance/maxvio_device"], abs=1e-12)
