"""No silently ignored flag, no raw traceback for bad input: every architecture flag shapes the model it applies to or
is refused naming the flag; bad numbers, a missing tokenizer and unreadable data files are named before anything is
built or written."""

import json
from pathlib import Path

import pytest
import torch

from modeling_qwenmoe_gb.cli import pretrain
from modeling_qwenmoe_gb.pretraining import cpu_launch_flags

from .stock_models import tiny_model
from .test_cli import TINY

ROOT = Path(__file__).resolve().parent.parent
QUICK = [*TINY, "--max_steps", "1", "--save_strategy", "no", "--logging_steps", "1"]


def test_architecture_flags_shape_a_preset(tmp_path):
    pretrain([*QUICK, "--output_dir", str(tmp_path), "--num_experts", "32", "--num_experts_per_tok", "4",
              "--moe_intermediate_size", "24", "--shared_expert_intermediate_size", "0"])  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (32, 4, 24)
    assert config["shared_expert_intermediate_size"] == 0


def test_architecture_flags_shape_a_transformers_config(tmp_path):
    olmoe = str(ROOT / "configuration" / "stock" / "olmoe-byte.json")
    flags = [*QUICK, "--model_config", olmoe]
    pretrain([*flags, "--output_dir", str(tmp_path / "a"), "--num_experts", "8", "--num_experts_per_tok", "4"])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"]) == ("olmoe", 8, 4)
    with pytest.raises(ValueError, match=r"--moe_intermediate_size 24 is not allowed with --model_config \(olmoe\)"):
        pretrain([*flags, "--output_dir", str(tmp_path / "b"), "--moe_intermediate_size", "24"])
    assert not (tmp_path / "b").exists()


def test_architecture_flags_are_refused_for_a_checkpoint(tmp_path):
    tiny_model("olmoe", vocab_size=300, max_position_embeddings=256).save_pretrained(tmp_path / "ckpt")
    for flag in ("--num_experts", "--num_experts_per_tok", "--moe_intermediate_size"):
        with pytest.raises(ValueError, match=f"{flag} 4 is not allowed with --model_name_or_path"):
            pretrain([*QUICK, "--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(tmp_path / "ckpt"),
                      flag, "4"])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_an_impossible_top_k_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="num_experts_per_tok=99 is above num_experts=8"):
        pretrain([*QUICK, "--output_dir", str(tmp_path), "--preset", "tiny", "--num_experts_per_tok", "99"])
    assert not tmp_path.joinpath("config.json").exists()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--seq_len", "-5", "seq_len=-5 is not allowed: an integer >= 2 is required"),
        ("--per_device_train_batch_size", "0", "per_device_train_batch_size=0 is not allowed"),
        ("--gradient_accumulation_steps", "0", "gradient_accumulation_steps=0 is not allowed"),
        ("--max_steps", "0", "max_steps=0 is not allowed: an integer >= 1 is required"),
        ("--learning_rate", "-1", "learning_rate=-1.0 is not allowed: a number >= 0.0 is required"),
        ("--aux_free_bias_update_rate", "-0.1", "aux_free_bias_update_rate=-0.1 is not allowed"),
        ("--eval_batch_size", "0", "eval_batch_size=0 is not allowed"),
        ("--upcycle_reinit_ratio", "2", r"upcycle_reinit_ratio=2.0 is not allowed: a number in \[0, 1\]"),
    ],
)
def test_bad_numbers_are_named_before_anything_is_built(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        pretrain([*QUICK, "--output_dir", str(tmp_path / "run"), flag, value])
    assert not (tmp_path / "run").exists()


def test_a_missing_tokenizer_and_a_bad_data_file_are_named(tmp_path):
    with pytest.raises(ValueError, match="tokenizer='/nonexistent': no such file or folder"):
        pretrain([*QUICK, "--output_dir", str(tmp_path / "run"), "--tokenizer", "/nonexistent"])
    (tmp_path / "data" / "prose").mkdir(parents=True)
    (tmp_path / "data" / "prose" / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "na\xefve"}\n')
    with pytest.raises(ValueError, match=r"prose/train.jsonl: not UTF-8 at line 2"):
        pretrain([*QUICK, "--output_dir", str(tmp_path / "run"), "--data", str(tmp_path / "data")])
    assert not (tmp_path / "run").exists()


def test_moe_recompute_shapes_our_model_and_is_refused_for_a_transformers_moe(tmp_path):
    pretrain([*QUICK, "--output_dir", str(tmp_path / "a"), "--moe_recompute", "experts"])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["moe_recompute"] == "experts"
    with pytest.raises(ValueError, match="moe_recompute='sometimes' is unknown"):
        pretrain([*QUICK, "--output_dir", str(tmp_path / "b"), "--moe_recompute", "sometimes"])
    olmoe = str(ROOT / "configuration" / "stock" / "olmoe-byte.json")
    with pytest.raises(ValueError, match="moe_recompute='moe' applies to QwenMoE-GB models"):
        pretrain([*QUICK, "--output_dir", str(tmp_path / "c"), "--model_config", olmoe, "--moe_recompute", "moe"])


def test_routing_flags_shape_our_model_log_dead_experts_and_are_refused_for_a_transformers_moe(tmp_path):
    routing = [
        "--n_group",
        "4",
        "--topk_group",
        "2",
        "--routed_scaling_factor",
        "2.0",
        "--router_scoring_func",
        "sigmoid",
        "--aux_free",
        "true",
        "--expert_capacity_factor",
        "1.0",
        "--moe_token_drop_policy",
        "position",
    ]
    pretrain([*QUICK, "--output_dir", str(tmp_path / "a"), *routing])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (4, 2, 2.0)
    assert (config["expert_capacity_factor"], config["moe_token_drop_policy"]) == (1.0, "position")
    logs = json.loads((tmp_path / "a" / "log_history.json").read_text())["log_history"]
    assert any("balance/dead_experts" in entry and "balance/dead_experts_window" in entry for entry in logs)
    with pytest.raises(ValueError, match="topk_group=9 is above n_group=4"):
        pretrain([*QUICK, "--output_dir", str(tmp_path / "b"), "--n_group", "4", "--topk_group", "9"])
    olmoe = str(ROOT / "configuration" / "stock" / "olmoe-byte.json")
    with pytest.raises(ValueError, match="expert_capacity_factor=1.0 applies to QwenMoE-GB models"):
        pretrain(
            [*QUICK, "--output_dir", str(tmp_path / "c"), "--model_config", olmoe, "--expert_capacity_factor", "1"]
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the flags a launch on a machine without GPUs needs")
def test_a_launch_without_gpus_gets_the_flags_its_engine_needs_or_the_fix(monkeypatch):
    """Under accelerate / torchrun on CPU: DDP and FSDP get --use_cpu true; DeepSpeed gets --ddp_backend gloo (with
    --use_cpu accelerate would silently run DDP, refused naming the fix, as are bf16 and the --deepspeed flag, which
    transformers cannot run on CPU); a given --use_cpu is kept; one process gets nothing."""
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cpu_launch_flags([]) == ["--use_cpu", "true"]
    assert cpu_launch_flags(["--use_cpu=false"]) == []
    with pytest.raises(ValueError, match=r"deepspeed='ds.json' on a machine without GPUs.*deepspeed_zero2.yaml"):
        cpu_launch_flags(["--deepspeed", "ds.json"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert cpu_launch_flags([]) == ["--use_cpu", "true"]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cpu_launch_flags([]) == ["--ddp_backend", "gloo"]
    assert cpu_launch_flags(["--ddp_backend", "gloo"]) == []
    with pytest.raises(ValueError, match="use_cpu=True under a DeepSpeed config: accelerate would run DDP"):
        cpu_launch_flags(["--use_cpu", "true"])
    with pytest.raises(ValueError, match=r"bf16='true' under DeepSpeed.*Allowed on CPU: fp32"):
        cpu_launch_flags(["--bf16", "true"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cpu_launch_flags([]) == []
