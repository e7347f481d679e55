"""Reinforcement learning example: TRL's GRPO (or GSPO) + global-batch balance + routing replay.

    qwenmoe-gb pretrain --output_dir runs/pretrain                   # or any QwenMoE-GB / Qwen MoE checkpoint
    python scripts/grpo_example.py --model runs/pretrain --output_dir runs/grpo --routing_replay rollout
    python scripts/grpo_example.py --model runs/pretrain --routing_replay old_policy --num_iterations 4 \\
        --importance_sampling_level sequence                         # GSPO's sequence-level ratio, R2 replay

The task is the embedded corpus's arithmetic: prompts `a + b =`, reward `modeling_qwenmoe_gb.rl.sum_reward` (1 for
the sum, partial credit for a near integer). `--router_dtype float32` computes the router linear in fp32 (with
`--dtype bfloat16`). Every other flag is a `trl.GRPOConfig` flag; the routing metrics (`routing/mismatch_rollout`,
`rollout/abs_log_ratio_mean`, ...) and the balance metrics are in the logs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, HfArgumentParser
from trl import GRPOConfig

from modeling_qwenmoe_gb.checkpoints import resolve_resume
from modeling_qwenmoe_gb.convert import from_qwen_moe
from modeling_qwenmoe_gb.rl import ROUTING_REPLAY_MODES, QwenMoeGBGRPOTrainer, addition_prompts, sum_reward


@dataclass
class ExampleArguments:
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in an output_dir with a run"})
    model: str = field(default="runs/pretrain", metadata={"help": "QwenMoE-GB or Qwen MoE checkpoint (path or name)"})
    routing_replay: str = field(default="rollout", metadata={"choices": list(ROUTING_REPLAY_MODES)})
    router_dtype: str = field(default="auto", metadata={"help": "auto | float32 (the router linear in fp32)"})
    dtype: str = field(default="float32", metadata={"help": "the model's weights: float32 | bfloat16"})
    balance_scope: str = field(default="global", metadata={"help": "micro | global | sequence"})
    num_prompts: int = field(default=4096, metadata={"help": "prompts in the training set"})


def main(argv: list[str]) -> dict:
    defaults = ["--output_dir", "runs/grpo", "--per_device_train_batch_size", "16", "--num_generations", "8",
                "--max_completion_length", "8", "--max_steps", "50", "--learning_rate", "1e-4", "--beta", "0.0",
                "--num_iterations", "2", "--logging_steps", "5", "--report_to", "none", "--save_strategy", "no",
                "--bf16", "false"]  # fmt: skip
    example, config = HfArgumentParser((ExampleArguments, GRPOConfig)).parse_args_into_dataclasses(defaults + argv)
    model = from_qwen_moe(example.model, dtype=getattr(torch, example.dtype), router_dtype=example.router_dtype,
                          balance_scope=example.balance_scope)  # fmt: skip
    trainer = QwenMoeGBGRPOTrainer(model=model, reward_funcs=sum_reward, args=config,
                                   train_dataset=addition_prompts(example.num_prompts, config.seed),
                                   processing_class=AutoTokenizer.from_pretrained(example.model),
                                   routing_replay=example.routing_replay)  # fmt: skip
    trainer.train(
        resume_from_checkpoint=resolve_resume(
            config.output_dir, config.resume_from_checkpoint, example.overwrite_output_dir
        )
    )  # auto: the newest complete one
    trainer.save_model(config.output_dir)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    print(f"reward: first log {logs[0]['reward']:.3f}, last log {logs[-1]['reward']:.3f}")
    return {"logs": trainer.state.log_history}


if __name__ == "__main__":
    main(sys.argv[1:])
