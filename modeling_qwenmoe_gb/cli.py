"""`qwenmoe-gb`: pretrain, evaluate, analyze, compare, benchmark and push QwenMoE-GB models.

    qwenmoe-gb prepare-data --data SRC --tokenizer T --output_dir OUT [--num_proc N]  # tokenize once → token files
    qwenmoe-gb pretrain [TrainingArguments flags] [model flags] [data flags]   # train → evaluate → analyze → card
    qwenmoe-gb evaluate --model DIR [data flags] [--lm_eval_tasks T1,T2]      # perplexity (+ lm-eval benchmarks)
    qwenmoe-gb analyze  --model DIR [data flags]                               # expert specialization + plots
    qwenmoe-gb compare  [compare flags]                                        # micro vs global arms (reproduction)
    qwenmoe-gb bench    [benchmark flags]                                      # = scripts/benchmark.py
    qwenmoe-gb bench-data [--parts prepare,memory,loader,resume]               # the data path (BENCHMARKS.md)
    qwenmoe-gb export   --model DIR --out DIR [--to auto|qwen3_moe|qwen2_moe|glm4_moe|qwenmoe_gb]   # stock MoE
    qwenmoe-gb prune    --model DIR --data D --keep_fraction 0.5 --output_dir OUT  # drop experts (REAP, frequency)
    qwenmoe-gb prune-study --runs runs/qb-study --arms micro,global            # pruned PPL per arm (RESULTS.md)
    qwenmoe-gb push     --model DIR --repo_id USER/NAME                        # upload either form to the Hub

`pretrain` with no flags trains the `demo` preset with global-batch balance on the embedded synthetic corpus (4
domains) on CPU in a few minutes. It takes every `transformers.TrainingArguments` flag and runs unchanged under
`accelerate launch` / `torchrun`.
"""

import argparse
import importlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from . import analysis
from .compare import compare
from .convert import EXPORT_TARGETS, export_qwen_moe
from .hub import complete_auto_map, push_folder
from .modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from .pretraining import (
    DataArguments,
    ModelArguments,
    evaluate_and_analyze,
    load_trained,
    pretrain,
    pretrain_parser,
    use_recorded_data,
)


@dataclass
class ModelPathArguments:
    model: str = field(default="runs/pretrain", metadata={"help": "trained checkpoint folder (any MoE it trains)"})
    out: str | None = field(default=None, metadata={"help": "output folder (default: the model folder)"})


@dataclass
class LmEvalArguments:
    lm_eval_tasks: str | None = field(
        default=None, metadata={"help": "comma-separated lm-evaluation-harness tasks to run too (the lm-eval extra)"}
    )
    lm_eval_include_path: str | None = field(default=None, metadata={"help": "folder of local lm-eval task YAMLs"})
    lm_eval_num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (task default)"})
    lm_eval_limit: float | None = field(default=None, metadata={"help": "documents per task (or a fraction)"})
    lm_eval_batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})
    lm_eval_device: str | None = field(default=None, metadata={"help": "cpu (default), cuda, cuda:0, ..."})


@dataclass
class PushArguments:
    model: str = field(default="runs/pretrain", metadata={"help": "checkpoint folder to upload"})
    repo_id: str = field(default="", metadata={"help": "Hub repository, e.g. user/qwenmoe-gb-tiny"})
    private: bool = field(default=False, metadata={"help": "create a private repository"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)"})


@dataclass
class ExportArguments:
    model: str = field(default="runs/pretrain", metadata={"help": "QwenMoE-GB checkpoint folder"})
    out: str = field(default="", metadata={"help": "output folder"})
    to: str = field(
        default="auto",
        metadata={
            "help": "qwen3_moe / qwen2_moe / glm4_moe: a stock checkpoint (no code, no trust_remote_code); auto: "
            "the one that represents the model exactly; qwenmoe_gb: re-save in this project's Hub format with the "
            "current code and a complete auto_map (repairs checkpoints saved by earlier versions)",
            "choices": [*EXPORT_TARGETS, "qwenmoe_gb"],
        },
    )
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer to ship (default: the model folder's)"})


# ----------------------------------------------------------------------------------------- parsers


def _dataclass_parser(*names: str) -> Callable[[], HfArgumentParser]:
    """A parser factory over dataclasses named `module:Class` (imported when the parser is built)."""

    def build() -> HfArgumentParser:
        classes = []
        for name in names:
            module, cls = name.split(":")
            classes.append(getattr(importlib.import_module(module, __package__), cls))
        return HfArgumentParser(tuple(classes))

    return build


def _bench_parser() -> argparse.ArgumentParser:
    from .benchmark import build_parser

    return build_parser()


# Each command's flags: what it parses, what `docs/reference/cli.md` lists and what the docs' commands are checked
# against. `compare` hands the flags it does not know to `pretrain`.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "prepare-data": _dataclass_parser(".data.prepare:PrepareArguments"),
    "pretrain": pretrain_parser,
    "evaluate": _dataclass_parser(".cli:ModelPathArguments", ".pretraining:DataArguments", ".cli:LmEvalArguments"),
    "analyze": _dataclass_parser(".cli:ModelPathArguments", ".pretraining:DataArguments"),
    "compare": _dataclass_parser(".compare:CompareArguments"),
    "bench": _bench_parser,
    "bench-data": _dataclass_parser(".data_benchmark:BenchDataArguments"),
    "export": _dataclass_parser(".cli:ExportArguments"),
    "prune": _dataclass_parser(".cli:ModelPathArguments", ".pretraining:DataArguments", ".prune:PruneArguments"),
    "prune-study": _dataclass_parser(".prune_study:PruneStudyArguments"),
    "push": _dataclass_parser(".cli:PushArguments"),
}


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of `qwenmoe-gb COMMAND`."""
    if command not in PARSERS:
        raise ValueError(f"command={command!r} is unknown: allowed {list(PARSERS)}")
    return PARSERS[command]()


# ----------------------------------------------------------------------------------------- commands


def _load_for_eval(command: str, argv: list[str]):
    path_args, data_args, *rest = command_parser(command).parse_args_into_dataclasses(args=argv)
    use_recorded_data(path_args.model, data_args, argv)  # same data, tokenizer and seq_len as the training run
    model = load_trained(path_args.model)  # QwenMoE-GB, or the transformers MoE it was trained as
    test = data_args.open().domains("test", data_args.seq_len)
    return model, test, Path(path_args.out or path_args.model), data_args, *rest


def evaluate_cmd(argv: list[str]) -> dict:
    model, test, out_dir, data_args, lm_args = _load_for_eval("evaluate", argv)
    routed = analysis.route_domains(model, test, data_args.eval_batch_size, data_args.eval_max_sequences)
    report = analysis.perplexity_report(routed)
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis.write_json(report, out_dir / "eval.json")
    print(analysis.format_ppl_table(report))
    if lm_args.lm_eval_tasks:  # lm-evaluation-harness on the saved folder; its metrics go into the card too
        from .hub import add_eval_results
        from .lm_harness import card_results, run_lm_eval

        tasks = [t for t in lm_args.lm_eval_tasks.split(",") if t]
        folder = Path(model.name_or_path)  # the folder the model was loaded from
        limit = lm_args.lm_eval_limit
        limit = int(limit) if limit is not None and limit >= 1 else limit
        lm_report = run_lm_eval(folder, tasks, lm_args.lm_eval_include_path, lm_args.lm_eval_num_fewshot, limit,
                                lm_args.lm_eval_batch_size, lm_args.lm_eval_device)  # fmt: skip
        add_eval_results(folder, card_results(lm_report))
        print(json.dumps(lm_report["results"], indent=2))
        report["lm_eval"] = lm_report["results"]
    return report


def analyze_cmd(argv: list[str]) -> dict:
    model, test, out_dir, data_args = _load_for_eval("analyze", argv)
    result = evaluate_and_analyze(model, test, out_dir, data_args)
    spec = result["specialization"]
    print(f"specialization KL {spec['specialization_kl']:.4f}; max expert frequency per domain:")
    for domain, value in spec["max_expert_frequency"].items():
        print(f"  {domain}: {value:.3f}")
    return result


def push_cmd(argv: list[str]) -> str:
    (args,) = command_parser("push").parse_args_into_dataclasses(args=argv)
    if not args.repo_id:
        raise ValueError("repo_id='' is not allowed: give --repo_id USER/NAME")
    url = push_folder(args.model, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.model} to {url}")
    return url


def export_cmd(argv: list[str]) -> Path:
    (args,) = command_parser("export").parse_args_into_dataclasses(args=argv)
    if not args.out:
        raise ValueError("out='' is not allowed: give --out DIR (a new folder)")
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError(f"out={args.out!r} is the model folder: give a new folder")
    if args.to != "qwenmoe_gb":
        out = export_qwen_moe(args.model, args.out, args.to, tokenizer=args.tokenizer)
        print(f"exported {args.model} to {out} ({json.loads((out / 'config.json').read_text())['model_type']})")
        return out
    shutil.copytree(args.model, args.out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    QwenMoeGBForCausalLM.from_pretrained(args.model).save_pretrained(args.out)  # current code files + auto_map
    complete_auto_map(args.out)
    print(f"re-saved {args.model} to {args.out} (QwenMoE-GB Hub format)")
    return Path(args.out)


def compare_cmd(argv: list[str]) -> dict:
    return compare(argv)


def bench_cmd(argv: list[str]):
    from .benchmark import main as benchmark

    return benchmark(argv)


def prepare_data_cmd(argv: list[str]) -> Path:
    from .data.prepare import prepare_cmd

    return prepare_cmd(argv)


def prune_cmd(argv: list[str]) -> dict:
    from .prune import prune

    return prune(argv)


def prune_study_cmd(argv: list[str]) -> dict:
    from .prune_study import prune_study

    return prune_study(argv)


def bench_data_cmd(argv: list[str]) -> dict:
    from .data_benchmark import main as bench_data

    return bench_data(argv)


COMMANDS = {
    "prepare-data": prepare_data_cmd,
    "pretrain": pretrain,
    "evaluate": evaluate_cmd,
    "analyze": analyze_cmd,
    "compare": compare_cmd,
    "bench": bench_cmd,
    "bench-data": bench_data_cmd,
    "export": export_cmd,
    "prune": prune_cmd,
    "prune-study": prune_study_cmd,
    "push": push_cmd,
}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"unknown command {argv[0]!r}: allowed {list(COMMANDS)}")
        return None
    COMMANDS[argv[0]](argv[1:])
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # launched by accelerate / torchrun
        torch.distributed.destroy_process_group()  # now, not in the interpreter's teardown
    return None


if __name__ == "__main__":
    main()


__all__ = ["PARSERS", "DataArguments", "ModelArguments", "command_parser", "main", "pretrain"]
