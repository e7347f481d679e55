"""Runs that survive crashes: a real `qwenmoe-gb pretrain` killed with SIGKILL (mid-run, and inside a checkpoint
save), then the same command again, ends with the weights, aux-free biases, balance state and losses of an
uninterrupted run — one process, 2-process DDP and transformers' FSDP2 + EP; which checkpoint is complete, and what
`--resume_from_checkpoint auto|none|PATH` does with an output folder that holds an earlier run."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_qwenmoe_gb.checkpoints import checkpoint_problem, resolve_resume

from .dist_common import torchrun

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "--max_steps", "8", "--save_steps", "2", "--logging_steps", "2", "--warmup_steps", "0", "--synthetic_docs", "40",
    "--seq_len", "64", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
    "--eval_max_sequences", "2", "--disable_tqdm", "true", "--use_cpu", "true", "--aux_free", "true",
    "--aux_free_bias_update_rate", "0.01", "--config_overrides", '{"num_hidden_layers": 2}',
]  # fmt: skip
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def launch(out: Path, *extra: str, crash: tuple[str, int] | None = None, procs: int = 1) -> subprocess.CompletedProcess:
    """`qwenmoe-gb pretrain RUN --output_dir out extra` in a new process (under torchrun for procs > 1); with `crash`,
    through `tests/crash_launcher.py`, which SIGKILLs it at that point."""
    argv = ["pretrain", *RUN, "--output_dir", str(out), *extra]
    entry = [str(ROOT / "tests" / "crash_launcher.py"), crash[0], str(crash[1]), "--"] if crash else None
    if procs == 1:
        cmd = [sys.executable, *(entry or ["-m", "modeling_qwenmoe_gb.cli"]), *argv]
    else:
        cmd = [*torchrun(procs), *(entry or ["-m", "modeling_qwenmoe_gb.cli"]), *argv]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights (aux-free biases included), balance state and logged losses."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=0, msg=name)
    assert any("expert_bias" in n and wa[n].abs().sum() > 0 for n in wa)  # the aux-free state moved and is equal
    for state in sorted((a / "checkpoint-8").glob("balance_state_rank*.pt")):
        sa, sb = (torch.load(p, weights_only=False) for p in (state, b / "checkpoint-8" / state.name))
        assert sa["balancer"]["steps"] == sb["balancer"]["steps"] and sa["ce_sum"] == sb["ce_sum"]
        for key, value in sa["balancer"]["sums"].items():
            torch.testing.assert_close(sb["balancer"]["sums"][key], value, rtol=0, atol=0)
    losses = [[h["loss"] for h in json.loads((r / "log_history.json").read_text())["log_history"] if "loss" in h]
              for r in (a, b)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("crash") / "whole"
    done = launch(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode,step,resumed_from", [("step", 5, "checkpoint-4"), ("save", 6, "checkpoint-4")])
def test_the_same_command_after_a_sigkill_resumes_and_equals_the_uninterrupted_run(
    uninterrupted, tmp_path, mode, step, resumed_from
):
    out = tmp_path / "run"
    killed = launch(out, crash=(mode, step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert {p.name for p in out.glob("checkpoint-*")} >= {"checkpoint-2", "checkpoint-4"}
    if mode == "save":  # killed inside the save: the folder exists, the checkpoint is not complete
        assert "trainer_state.json is missing" in checkpoint_problem(out / "checkpoint-6")
    again = launch(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {out / resumed_from}" in again.stderr
    if mode == "save":
        assert f"skipping checkpoint {out / 'checkpoint-6'}: trainer_state.json is missing" in again.stderr
    assert_same_run(uninterrupted, out)


def test_quantile_balancing_killed_and_rerun_equals_the_uninterrupted_run(tmp_path):
    """QB with an EMA (the new bias depends on the saved one): bit-identical weights, biases, state and losses."""
    qb = ["--aux_free_method", "quantile", "--quantile_ema", "0.5", "--router_aux_loss_coef", "0"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    done = launch(whole, *qb)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((whole / "config.json").read_text())["aux_free_method"] == "quantile"
    killed = launch(run, *qb, crash=("step", 5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = launch(run, *qb)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run / 'checkpoint-4'}" in again.stderr
    assert_same_run(whole, run)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [[], ["--fsdp_size", "2", "--ep_size", "2"]], ids=["ddp", "fsdp2_ep2"])
def test_two_processes_killed_and_rerun_equal_the_uninterrupted_run(tmp_path, layout):
    whole, run = tmp_path / "whole", tmp_path / "run"
    done = launch(whole, *layout, procs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = launch(run, *layout, crash=("step", 5), procs=2)
    assert killed.returncode != 0 and not (run / "model.safetensors").exists()
    again = launch(run, *layout, procs=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run / 'checkpoint-4'}" in again.stderr
    if layout:
        assert (run / "checkpoint-8" / "dcp_model").is_dir()  # sharded checkpoints were resumed
    assert_same_run(whole, run)


# ----------------------------------------------------------------------------------------- which checkpoint


def test_incomplete_checkpoints_are_named_with_the_file(uninterrupted, tmp_path):
    assert checkpoint_problem(uninterrupted / "checkpoint-8") is None
    cases = {
        "model.safetensors": "model.safetensors is cut short",
        "optimizer.pt": "optimizer.pt is cut short (not a complete torch.save archive)",
        "rng_state.pth": "rng_state.pth is cut short",
    }
    for name, message in cases.items():
        folder = tmp_path / name
        shutil.copytree(uninterrupted / "checkpoint-8", folder)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])  # what a crash in the middle of the write leaves
        assert message in checkpoint_problem(folder)
    shutil.copytree(uninterrupted / "checkpoint-8", tmp_path / "no_state")
    (tmp_path / "no_state" / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" in checkpoint_problem(tmp_path / "no_state")
    with pytest.raises(ValueError, match=rf"resume_from_checkpoint='{tmp_path / 'model.safetensors'}' cannot be "
                                         r"resumed from: model.safetensors is cut short"):  # fmt: skip
        resolve_resume(tmp_path, str(tmp_path / "model.safetensors"))


def test_auto_none_and_a_finished_run(uninterrupted, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    data = (run / "checkpoint-8" / "model.safetensors").read_bytes()
    (run / "checkpoint-8" / "model.safetensors").write_bytes(data[:100])
    with caplog.at_level("WARNING"):
        assert resolve_resume(run, "auto") == str(run / "checkpoint-6")  # the newest complete one
    assert "skipping checkpoint" in caplog.text and "checkpoint-8: model.safetensors is cut short" in caplog.text
    with pytest.raises(ValueError, match=r"holds the checkpoints \['checkpoint-8', 'checkpoint-6'\] of an earlier run"):
        resolve_resume(run, "none")
    assert resolve_resume(run, "none", overwrite=True) is None
    for folder in run.glob("checkpoint-*"):
        shutil.rmtree(folder)
    with pytest.raises(ValueError, match="holds a finished run .*and no complete checkpoint to resume"):
        resolve_resume(run, None)  # unset = auto
    assert resolve_resume(run, "auto", overwrite=True) is None
    assert resolve_resume(tmp_path / "fresh", None) is None


def test_a_rerun_with_none_never_rotates_an_earlier_runs_checkpoints_away(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    from modeling_qwenmoe_gb.cli import pretrain

    with pytest.raises(ValueError, match="resume_from_checkpoint='none' into output_dir"):
        pretrain([*RUN, "--output_dir", str(run), "--resume_from_checkpoint", "none"])
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-6", "checkpoint-8"}
