"""`QwenMoeGBTrainer` under DeepSpeed ZeRO-2, ZeRO-3 (also with the optimizer offloaded to CPU) and accelerate's FSDP2,
each launched with the shipped config (`accelerate launch --config_file configuration/accelerate/<engine>.yaml`) on 2
gloo processes (DeepSpeed's CPU accelerator), against one process on the same data from the same saved weights:
counts buffer per micro-step, every weight's update, the aux-free biases, the logged loss; one all-reduce of the
counts per micro-step; idle experts do not stall ZeRO-3; checkpoints resume bit-identically; `save_model` under
ZeRO-3 / FSDP writes one Hub folder that loads without the package; the CLI runs every config as shipped and a ZeRO-3
run from a preset starts from the weights one process draws."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM

from .accelerate_engine_worker import STEP_CASES
from .dist_common import free_port, run_ranks, save_start
from .test_hub_round_trip import pull
from .test_native_parallel import reference_step

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configuration" / "accelerate"
ENGINES = ("deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp")
RESUMABLE = ("deepspeed_zero2", "deepspeed_zero3", "fsdp")
CASES = [(engine, name) for engine in ENGINES for name in STEP_CASES if engine != ENGINES[2]]
CASES.append((ENGINES[2], "global_accum2_auxfree"))
START_BIAS = torch.linspace(-0.05, 0.05, 8)  # each router's saved aux-free bias (used for selection when aux_free)


def launch(config: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configuration/accelerate/<config>.yaml --num_processes 2 ...` from the
    repository root (the DeepSpeed JSON paths in the yamls are relative to it)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
        "--num_processes", "2", "--main_process_port", str(free_port()), *args,
    ]  # fmt: skip
    return run_ranks(cmd, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    save_start(out, expert_bias=START_BIAS)  # nonzero: the aux-free cases route differently from the first step
    for engine in ENGINES:
        launch(engine, str(ROOT / "tests" / "accelerate_engine_worker.py"), str(out), engine)
    return out


def seen(workdir: Path, engine: str, name: str) -> list[dict]:
    return [torch.load(workdir / f"{engine}_{name}_rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("engine,name", CASES)
def test_engine_step_equals_one_process(workdir, engine, name):
    """One SGD(lr=1) step, no clipping: every weight moved by exactly the one-process gradient (≤ 1e-4 rel / 1e-6),
    counts buffer after each micro-step exact, aux-free biases exact and equal on both ranks, logged loss = the
    one-process objective; the balancer all-reduced its (L, E) counts once per micro-step; the engine really ran
    (DeepSpeed stage / FSDP2 shards: each rank holds half of the experts' weight under ZeRO-3 and FSDP)."""
    scope, accumulation, aux_free, method = STEP_CASES[name]
    expected = reference_step(workdir, scope, accumulation, ranks=2, aux_free=aux_free, aux_free_method=method)
    initial = dict(QwenMoeGBForCausalLM.from_pretrained(workdir / "ckpt").named_parameters())
    ranks = seen(workdir, engine, name)
    for rank in ranks:
        assert len(rank["buffers"]) == accumulation
        for got, want in zip(rank["buffers"], expected["buffers"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert set(rank["params"]) == set(initial)
        for param, value in rank["params"].items():
            grad = expected["grads"][param]
            update = initial[param].detach() - value
            torch.testing.assert_close(update, torch.zeros_like(update) if grad is None else grad, rtol=1e-4,
                                       atol=1e-6, msg=param)  # fmt: skip
        start = START_BIAS.expand(2, -1)
        moved = expected["biases"] if aux_free else torch.zeros_like(start)  # the step's update, or none
        after = expected.get("biases_after", start + moved)  # Quantile Balancing replaces the bias
        tolerance = 1e-6 if method == "quantile" else 1e-9  # QB: a quantile of margins equal to float rounding
        torch.testing.assert_close(rank["biases"], after, rtol=0, atol=tolerance)
        assert rank["count_reductions"] == accumulation
        (log,) = rank["logs"]
        assert log["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        sharded = rank["sharded"]
        if engine.startswith("deepspeed"):
            assert sharded["deepspeed"] and not sharded["fsdp"]
            assert sharded["zero_stage"] == (2 if engine == "deepspeed_zero2" else 3)
        else:
            assert sharded["fsdp"] and not sharded["deepspeed"]
        halves = engine != "deepspeed_zero2"  # ZeRO-2 shards the optimizer and gradients, not the weights
        assert sharded["local_numel"] * (2 if halves else 1) == sharded["full_numel"]
    torch.testing.assert_close(ranks[0]["biases"], ranks[1]["biases"], rtol=0, atol=0)


def test_the_saved_bias_steers_the_aux_free_cases(workdir):
    """The cases above differ by aux-free from their first step (the saved bias is used for selection only when
    aux_free): the counts differ, so each aux-free case checks its own routing."""
    for scope in ("micro", "global"):
        plain = seen(workdir, "deepspeed_zero3", f"{scope}_accum2")[0]["buffers"][-1]
        aux_free = seen(workdir, "deepspeed_zero3", f"{scope}_accum2_auxfree")[0]["buffers"][-1]
        assert not torch.equal(plain, aux_free)


def test_zero3_gathers_experts_that_get_no_tokens_on_a_rank(workdir):
    """The ZeRO-3 steps above finished although, in some micro-step, a rank routed no token to an expert another rank
    used (the experts' weights are gathered for the whole fused module, whatever the routing)."""
    idle = 0
    for name in STEP_CASES:
        ranks = seen(workdir, "deepspeed_zero3", name)
        for mine, other in zip(ranks[0]["local_counts"], ranks[1]["local_counts"]):
            idle += int(((mine == 0) & (other > 0)).sum() + ((other == 0) & (mine > 0)).sum())
    assert idle > 0


@pytest.mark.parametrize("engine", RESUMABLE)
def test_resume_from_a_checkpoint_is_bit_identical(workdir, engine):
    """AdamW, 2 accumulation steps, aux-free, 4 steps; resumed from checkpoint-2 (the engine's own checkpoint and our
    balance state): final weights, biases and the logged losses and balance metrics of steps 3-4 identical."""
    for full, resumed in zip(seen(workdir, engine, "resume_full"), seen(workdir, engine, "resume_from_2")):
        for param, value in full["params"].items():
            torch.testing.assert_close(resumed["params"][param], value, rtol=0, atol=0, msg=param)
        torch.testing.assert_close(resumed["biases"], full["biases"], rtol=0, atol=0)
        assert full["biases"].any()
        assert [e["step"] for e in resumed["logs"]] == [1, 2, 3, 4]  # 1-2 restored from the checkpoint's state
        assert resumed["logs"] == full["logs"]
        assert (workdir / f"{engine}_resume_full" / "checkpoint-2" / "balance_state_rank1.pt").is_file()


@pytest.mark.parametrize("engine", RESUMABLE)
def test_save_model_writes_one_hub_folder_that_loads_without_the_package(workdir, engine, tmp_path):
    """`save_model` after training gathers the full weights: one safetensors folder with our code files and
    `auto_map`, which a process without the package loads (`trust_remote_code`), giving the trained model's logits."""
    folder = workdir / f"{engine}_saved"
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "configuration_qwenmoe_gb.py", "modeling_qwenmoe_gb.py", "model.safetensors"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # no pickle, no engine shards
    assert "AutoModelForCausalLM" in json.loads((folder / "config.json").read_text())["auto_map"]
    trained = seen(workdir, engine, "resume_full")[0]
    reference = QwenMoeGBForCausalLM.from_pretrained(workdir / "ckpt")
    reference.load_state_dict({**reference.state_dict(), **trained["params"]})
    with torch.no_grad():
        for router, bias in zip(reference.model.moe_routers(), trained["biases"]):
            router.expert_bias.copy_(bias)
    torch.save(torch.load(workdir / "ids.pt"), tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    logits = pull(str(folder), tmp_path, env, engine)
    torch.testing.assert_close(logits, reference.eval()(torch.load(workdir / "ids.pt")).logits, rtol=0, atol=0)


CLI_FLAGS = [
    "-m", "modeling_qwenmoe_gb.cli", "pretrain", "--max_steps", "2", "--synthetic_docs", "30", "--seq_len", "64",
    "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--eval_max_sequences", "2",
    "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--learning_rate", "0",
    "--config_overrides", '{"num_hidden_layers": 2}',
]  # fmt: skip


@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_cli_runs_each_config_as_shipped_and_zero3_starts_from_the_seeded_weights(config, tmp_path):
    """`accelerate launch --config_file <config>.yaml -m modeling_qwenmoe_gb.cli pretrain` with no engine flags on a
    machine without GPUs trains on 2 processes, evaluates and saves; with learning rate 0 the saved weights are the
    initial ones, which equal one process's from the same preset and seed (ZeRO-3 included)."""
    out = tmp_path / "run"
    launch(config, *CLI_FLAGS, "--output_dir", str(out))
    assert json.loads((out / "data_info.json").read_text())["world_size"] == 2
    assert (out / "eval.json").is_file()
    single = tmp_path / "single"
    subprocess.run([sys.executable, *CLI_FLAGS, "--output_dir", str(single)], check=True, cwd=ROOT, timeout=300,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True)  # fmt: skip
    launched, alone = (QwenMoeGBForCausalLM.from_pretrained(p).state_dict() for p in (out, single))
    assert set(launched) == set(alone)
    for key, value in alone.items():
        torch.testing.assert_close(launched[key], value, rtol=0, atol=0, msg=key)
