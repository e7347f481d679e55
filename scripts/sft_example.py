"""Supervised fine-tuning example: TRL SFTTrainer + global-batch balance, optionally with PEFT LoRA.

    qwenmoe-gb pretrain --output_dir runs/pretrain                   # or any QwenMoE-GB / transformers MoE checkpoint
    python scripts/sft_example.py --model runs/pretrain --output_dir runs/sft [--lora] [--freeze_router]
    python scripts/sft_example.py --model Qwen/Qwen1.5-MoE-A2.7B --data my_sft.jsonl --bf16 ...
    python scripts/sft_example.py --model runs/pretrain --lora --export runs/sft-stock   # + merge, stock Qwen-MoE

`--data` is a jsonl file with `prompt` / `completion` fields (default: arithmetic questions built from the embedded
synthetic corpus). `--export DIR` writes the fine-tuned model (LoRA merged) as a stock Qwen3-MoE / Qwen2-MoE
checkpoint that vLLM, llama.cpp and transformers load without this package (`modeling_qwenmoe_gb.convert`). Every
other flag is a `trl.SFTConfig` flag.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import SFTConfig

from modeling_qwenmoe_gb.checkpoints import resolve_resume
from modeling_qwenmoe_gb.convert import EXPORT_TARGETS, export_qwen_moe, from_qwen_moe
from modeling_qwenmoe_gb.data import ByteTokenizer, synthetic_corpus
from modeling_qwenmoe_gb.sft import QwenMoeGBSFTTrainer, lora_config

QWEN_TYPES = ("qwenmoe_gb", "qwen2_moe", "qwen3_moe")


@dataclass
class ExampleArguments:
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in an output_dir with a run"})
    model: str = field(default="runs/pretrain", metadata={"help": "QwenMoE-GB or any transformers MoE (path or name)"})
    data: str | None = field(default=None, metadata={"help": "jsonl with prompt/completion (default: arithmetic)"})
    balance_scope: str = field(default="global", metadata={"help": "micro | global | sequence"})
    lora: bool = field(default=False, metadata={"help": "LoRA on attention and experts instead of full fine-tuning"})
    freeze_router: bool = field(default=False, metadata={"help": "with --lora: keep the router frozen"})
    export: str | None = field(default=None, metadata={"help": "also write a stock Qwen-MoE checkpoint here"})
    export_to: str = field(default="auto", metadata={"help": "stock architecture", "choices": list(EXPORT_TARGETS)})


def arithmetic_pairs() -> Dataset:
    lines = [line for doc in synthetic_corpus(60, 0)["arithmetic"]["train"] for line in doc.splitlines()]
    return Dataset.from_list([{"prompt": f"{q.strip()} =", "completion": f" {a.strip()}"}
                              for q, a in (line.split("=") for line in lines)])  # fmt: skip


def main() -> None:
    defaults = ["--output_dir", "runs/sft", "--max_steps", "50", "--per_device_train_batch_size", "8",
                "--learning_rate", "1e-3", "--logging_steps", "10", "--report_to", "none", "--max_length", "64",
                "--save_strategy", "no"]  # fmt: skip
    if not torch.cuda.is_available():
        defaults += ["--use_cpu", "true", "--bf16", "false"]
    example, sft_args = HfArgumentParser((ExampleArguments, SFTConfig)).parse_args_into_dataclasses(
        args=defaults + sys.argv[1:]
    )
    model_type = AutoConfig.from_pretrained(example.model).model_type
    balance = {}
    if model_type in QWEN_TYPES:  # QwenMoE-GB, or a Qwen2/3-MoE converted to it (what --export writes back)
        model = from_qwen_moe(example.model, balance_scope=example.balance_scope)
    elif example.export:
        raise ValueError(f"export={example.export!r} is for QwenMoE-GB / Qwen-MoE models; a {model_type} stays stock")
    else:  # any other transformers MoE, fine-tuned as it is; the trainer adds the balance loss
        model = AutoModelForCausalLM.from_pretrained(example.model)
        balance = {"balance_scope": example.balance_scope}
    tokenizer_files = Path(example.model, "tokenizer.json").is_file() or not Path(example.model).exists()
    tokenizer = AutoTokenizer.from_pretrained(example.model) if tokenizer_files else ByteTokenizer().to_hf()
    if example.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(train_router=not example.freeze_router))
        model.print_trainable_parameters()
    data = load_dataset("json", data_files=example.data, split="train") if example.data else arithmetic_pairs()
    trainer = QwenMoeGBSFTTrainer(model=model, args=sft_args, train_dataset=data, processing_class=tokenizer, **balance)
    trainer.train(
        resume_from_checkpoint=resolve_resume(
            sft_args.output_dir, sft_args.resume_from_checkpoint, example.overwrite_output_dir
        )
    )  # auto: the newest complete one
    trainer.save_model()
    if example.export:
        trained = model.merge_and_unload() if example.lora else model  # LoRA folded into the weights
        out = export_qwen_moe(trained, example.export, example.export_to, tokenizer, source_name=example.model)
        print(f"exported the fine-tuned model to {out}: vllm serve {out}")


if __name__ == "__main__":
    main()
