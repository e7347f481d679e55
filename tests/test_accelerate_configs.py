"""The ready-made accelerate configs load, target our classes, and the DDP one runs the CLI on 2 CPU processes."""

import json
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from modeling_qwenmoe_gb.modeling_qwenmoe_gb import QwenMoeGBDecoderLayer

from .dist_common import run_ranks

CONFIGS = Path(__file__).resolve().parent.parent / "configuration" / "accelerate"


@pytest.mark.parametrize(
    "name,kind",
    [("ddp", DistributedType.MULTI_GPU), ("fsdp", DistributedType.FSDP), ("deepspeed_zero2", DistributedType.DEEPSPEED),
     ("deepspeed_zero3", DistributedType.DEEPSPEED), ("deepspeed_zero3_offload", DistributedType.DEEPSPEED)],
)  # fmt: skip
def test_configs_load_with_accelerate(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind
    if kind == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == QwenMoeGBDecoderLayer.__name__
    if kind == DistributedType.DEEPSPEED:
        assert (CONFIGS.parent.parent / config.deepspeed_config["deepspeed_config_file"]).is_file()
    assert config.mixed_precision in (None, "no")  # the precision is the Trainer's flag (--bf16 true), not the file's


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_deepspeed_files_leave_the_trainers_values_to_the_trainer(name):
    """Precision, batch sizes, accumulation and clipping are "auto" (filled from TrainingArguments), so the file runs
    with any of those flags; the stage and offload are the file's."""
    ds = json.loads((CONFIGS / f"{name}.json").read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):  # fmt: skip
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
    zero = ds["zero_optimization"]
    assert zero["stage"] == (2 if name.endswith("2") else 3)
    assert zero.get("offload_optimizer", {}).get("device", "none") == ("cpu" if "offload" in name else "none")
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # save_model writes full weights


@pytest.mark.distributed
def test_accelerate_launch_ddp_config_runs_pretrain_on_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
        "-m", "modeling_qwenmoe_gb.cli", "pretrain", "--output_dir", str(out), "--max_steps", "2",
        "--synthetic_docs", "30", "--seq_len", "64", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--eval_max_sequences", "2", "--logging_steps", "1",
        "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true",
        "--config_overrides", '{"num_hidden_layers": 2}',
    ]  # fmt: skip
    run_ranks(cmd, timeout=300)
    history = json.loads((out / "log_history.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert json.loads((out / "data_info.json").read_text())["world_size"] == 2  # really 2 processes (DDP on gloo)
