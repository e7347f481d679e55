"""Routing replay study: how often do generation and training route a token differently, what does it do to the
importance ratios, and what does replay change? GRPO (TRL) on arithmetic, CPU.

    python scripts/rl_replay_study.py --out runs/rl_replay --seeds 0,1,2 [--model DIR] [--cost]

1. Base model: a `qwenmoe-gb pretrain` run (the demo preset on the embedded corpus, whose arithmetic domain holds
   lines like `426 + 11 = 437`, `--base_steps` steps), then SFT on `a + b = sum` lines (`--sft_steps`); or `--model
   DIR`. Task: the prompt `a + b =`, reward 1 when the completion's first line is the sum, partial credit for a near
   integer (`modeling_qwenmoe_gb.rl.sum_reward`).
2. Mismatch (`mismatch.json`): precision `fp32`, `bf16` (weights bf16 in generation and training) and `bf16-router32`
   (bf16 + `router_dtype="float32"`) × `routing_replay` none / rollout. GRPO with `num_iterations=5` on every
   generated batch, so the passes over a batch come after 0, 1, 2, 3, 4 policy updates. Per pass, averaged over the
   batches: the share of (scored token, MoE layer) pairs routed differently from the rollout
   (`routing/mismatch_rollout`), of scored tokens, |log π_train − log π_rollout| mean and max, the std of the
   ratio π_train / π_rollout, and TRL's clip fraction; each seed of `--seeds` generates its own batches.
3. Runs (`runs.json`, `rl_replay_runs.png`): routing_replay none vs rollout, `--run_precision` (default `autocast`:
   fp32 weights, TRL's `bf16=True` in the training passes, generation in fp32), `num_iterations=2`, one run per seed:
   reward curve, clip fraction, global LBL and MaxVio, mismatch.
4. Cost (`--cost`, `cost.json`): seconds per optimizer step (generation included) and peak RSS of a run with replay
   against one without, alternating fresh processes, `--cost_rounds` rounds, fp32, no routing metrics.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, set_seed
from trl import GRPOConfig, SFTConfig

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.pretraining import pretrain
from modeling_qwenmoe_gb.rl import (
    OLD_KEY,
    ROLLOUT_KEY,
    ROLLOUT_LOGPS_KEY,
    QwenMoeGBGRPOTrainer,
    addition_prompts,
    sum_reward,
)
from modeling_qwenmoe_gb.sft import QwenMoeGBSFTTrainer

PRECISIONS = {  # weights' dtype, router_dtype, bf16 autocast in the training passes (TRL's `bf16=True`)
    "fp32": (torch.float32, "auto", False),
    "bf16": (torch.bfloat16, "auto", False),
    "bf16-router32": (torch.bfloat16, "float32", False),
    "autocast": (torch.float32, "auto", True),
    "autocast-router32": (torch.float32, "float32", True),
}
REPLAY_KEYS = (ROLLOUT_KEY, ROLLOUT_LOGPS_KEY, OLD_KEY)  # what the trainer keeps per generated batch for replay
PASS_METRICS = (
    "routing/mismatch_rollout",
    "routing/mismatch_rollout_tokens",
    "rollout/abs_log_ratio_mean",
    "rollout/abs_log_ratio_max",
    "rollout/ratio_std",
    "clip_ratio/region_mean",
)


def base_model(args) -> Path:
    """The RL starting point: `--model`, or the demo's pretraining followed by SFT on `a + b = sum` lines (the usual
    pretrain → SFT → RL order; the SFT model writes near answers, so the reward has signal)."""
    if args.model:
        return Path(args.model)
    pretrained, tuned = Path(args.out) / "base", Path(args.out) / "sft"
    if not (pretrained / "config.json").is_file():
        pretrain(["--output_dir", str(pretrained), "--max_steps", str(args.base_steps), "--seed", "0",
                  "--report_to", "none", "--disable_tqdm", "true"])  # fmt: skip
    if not (tuned / "config.json").is_file():
        rng = random.Random(1)
        rows = []
        for _ in range(20000):
            a, b = rng.randint(0, 999), rng.randint(0, 99)
            rows.append({"prompt": f"{a} + {b} =", "completion": f" {a + b}\n"})
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        config = SFTConfig(str(tuned), per_device_train_batch_size=32, max_steps=args.sft_steps, learning_rate=2e-3,
                           lr_scheduler_type="cosine", warmup_steps=20, logging_steps=100, report_to=[], use_cpu=True,
                           save_strategy="no", disable_tqdm=True, bf16=False, max_length=32, seed=0)  # fmt: skip
        trainer = QwenMoeGBSFTTrainer(model=QwenMoeGBForCausalLM.from_pretrained(pretrained), args=config,
                                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
        trainer.train()
        trainer.save_model(str(tuned))
        tokenizer.save_pretrained(tuned)
    return tuned


def grpo(model_dir: Path, out: Path, replay: str, precision: str, seed: int, steps: int, iterations: int,
         args, metrics: bool = True) -> QwenMoeGBGRPOTrainer:  # fmt: skip
    dtype, router_dtype, autocast = PRECISIONS[precision]
    set_seed(seed)
    model = QwenMoeGBForCausalLM.from_pretrained(model_dir, dtype=dtype, router_dtype=router_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GRPOConfig(str(out), per_device_train_batch_size=args.batch, num_generations=args.generations,
                        max_completion_length=args.completion_length, max_steps=steps, num_iterations=iterations,
                        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
                        temperature=1.0, logging_steps=1,
                        report_to=[], use_cpu=True, bf16=autocast, save_strategy="no", disable_tqdm=True, seed=seed,
                        data_seed=seed)  # fmt: skip
    trainer = QwenMoeGBGRPOTrainer(model=model, reward_funcs=sum_reward, args=config, processing_class=tokenizer,
                                   train_dataset=addition_prompts(4096, seed), routing_replay=replay,
                                   routing_metrics=metrics)  # fmt: skip
    trainer.train()
    return trainer


def step_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h and "step" in h]


def mismatch(model_dir: Path, args) -> dict:
    """Per precision × replay mode: the pass metrics by number of updates already made on the batch (0..μ-1), the
    mean over `--seeds` and each seed's value (each seed: `--mismatch_batches` generated batches)."""
    iterations, table = 5, {}
    for precision in PRECISIONS:
        for replay in ("none", "rollout"):
            per_seed = []
            for seed in args.seeds:
                out = Path(args.out) / "mismatch" / f"{precision}-{replay}-seed{seed}"
                steps = args.mismatch_batches * iterations
                trainer = grpo(model_dir, out, replay, precision, seed, steps, iterations, args)
                by_pass = {k: {m: [] for m in PASS_METRICS} for k in range(iterations)}
                for h in step_logs(trainer):
                    for m in PASS_METRICS:
                        by_pass[(h["step"] - 1) % iterations][m].append(h.get(m, float("nan")))
                per_seed.append({k: {m: statistics.fmean(v) for m, v in d.items()} for k, d in by_pass.items()})
            arm = table[f"{precision}/{replay}"] = {}
            for k in range(iterations):
                arm[k] = {m: {"mean": statistics.fmean(s[k][m] for s in per_seed), "seeds": [s[k][m] for s in per_seed]}
                          for m in PASS_METRICS}  # fmt: skip
            print(precision, replay, json.dumps({k: {m: v["mean"] for m, v in d.items()} for k, d in arm.items()}),
                  flush=True)  # fmt: skip
    return table


def runs(model_dir: Path, args) -> dict:
    results = {}
    for seed in args.seeds:
        for replay in ("none", "rollout"):
            out = Path(args.out) / "runs" / f"{replay}-seed{seed}"
            trainer = grpo(model_dir, out, replay, args.run_precision, seed, args.steps, 2, args)
            keys = ("reward", "clip_ratio/region_mean", "balance/global_lbl", "balance/maxvio_global",
                    "routing/mismatch_rollout", "rollout/abs_log_ratio_mean")  # fmt: skip
            rows = results[f"{replay}/seed{seed}"] = [{"step": h["step"], **{k: h.get(k) for k in keys}}
                                                       for h in step_logs(trainer)]  # fmt: skip
            print(replay, seed, "mean reward", _mean_of(rows, "reward"), flush=True)
    return results


def _mean_of(rows: list[dict], key: str, last: int | None = None) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values[-last:] if last else values)


def cost_arm(model_dir: str, replay: str, args) -> None:
    """One timed run in this process (called by `cost` in a fresh process): prints s/step and peak RSS."""
    grpo(Path(model_dir), Path(args.out) / "cost" / replay, replay, "fp32", 0, 2, 1, args, metrics=False)  # warm-up
    start = time.perf_counter()
    trainer = grpo(Path(model_dir), Path(args.out) / "cost" / replay, replay, "fp32", 0, args.cost_steps, 1, args,
                   metrics=False)  # fmt: skip
    seconds = (time.perf_counter() - start) / args.cost_steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    kept = sum(v.nbytes for batch in trainer._buffered_inputs for k, v in batch.items() if k in REPLAY_KEYS)
    print(json.dumps({"seconds_per_step": seconds, "peak_rss_mib": rss, "replay_bytes_per_step": kept}))


def cost(model_dir: Path, args) -> dict:
    rows = {"none": [], "rollout": []}
    for _ in range(args.cost_rounds):
        for replay in ("none", "rollout"):
            cmd = [sys.executable, __file__, "--cost_arm", replay, "--model", str(model_dir), "--out", args.out,
                   "--batch", str(args.batch), "--generations", str(args.generations), "--completion_length",
                   str(args.completion_length), "--cost_steps", str(args.cost_steps)]  # fmt: skip
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows[replay].append(json.loads(line))
            print(replay, rows[replay][-1], flush=True)
    med = {r: {k: statistics.median(x[k] for x in v) for k in v[0]} for r, v in rows.items()}
    return {"rounds": rows, "median": med,
            "time_ratio": med["rollout"]["seconds_per_step"] / med["none"]["seconds_per_step"]}  # fmt: skip


def _pm(values: list[float], digits: int = 4) -> str:
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _per_seed(rows: list[list[dict]], key: str, first: int | None = None, last: int | None = None) -> list[float]:
    """Per run: the mean of `key` over its logs (or the first / last ones)."""
    means = []
    for run in rows:
        values = [x[key] for x in run if x.get(key) is not None]
        means.append(statistics.fmean(values[:first] if first else values[-last:] if last else values))
    return means


def report(out: Path, seeds: list[int]) -> str:
    """report.md from mismatch.json, runs.json and cost.json (whichever exist): the tables RESULTS.md quotes. `±` is
    half the range over the seeds."""
    lines = []
    if (out / "mismatch.json").is_file():
        table = json.loads((out / "mismatch.json").read_text())
        header = ("precision", "replay", "updates on the batch", "routing mismatch: (token, layer) pairs", "tokens",
                  "mean abs log ratio", "max abs log ratio", "ratio std")  # fmt: skip
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for arm, by_pass in table.items():
            precision, replay = arm.split("/")
            for k in ("0", "1", "2", "4"):
                v = by_pass[k]
                lines.append(f"| {precision} | {replay} | {k} | {_pm(v['routing/mismatch_rollout']['seeds'])} | "
                             f"{_pm(v['routing/mismatch_rollout_tokens']['seeds'])} | "
                             f"{_pm(v['rollout/abs_log_ratio_mean']['seeds'])} | "
                             f"{_pm(v['rollout/abs_log_ratio_max']['seeds'], 3)} | "
                             f"{_pm(v['rollout/ratio_std']['seeds'])} |")  # fmt: skip
        lines.append("")
    if (out / "runs.json").is_file():
        runs_ = json.loads((out / "runs.json").read_text())
        lines += ["| replay | reward, first 20 logs | reward, last 20 logs | clip fraction | routing mismatch | "
                  "global LBL | MaxVio (global) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for replay in ("none", "rollout"):
            rows = [runs_[f"{replay}/seed{seed}"] for seed in seeds]
            cells = [
                _pm(_per_seed(rows, "reward", first=20), 3),
                _pm(_per_seed(rows, "reward", last=20), 3),
                _pm(_per_seed(rows, "clip_ratio/region_mean")),
                _pm(_per_seed(rows, "routing/mismatch_rollout")),
                _pm(_per_seed(rows, "balance/global_lbl")),
                _pm(_per_seed(rows, "balance/maxvio_global"), 3),
            ]
            lines.append(f"| {replay} | " + " | ".join(cells) + " |")
        lines.append("")
    if (out / "cost.json").is_file():
        cost_ = json.loads((out / "cost.json").read_text())
        med = cost_["median"]
        lines += ["| replay | s / step (median of rounds) | peak RSS MiB | replay tensors kept, bytes / step |",
                  "|---|---|---|---|"]  # fmt: skip
        for replay in ("none", "rollout"):
            m = med[replay]
            kept = m.get("replay_bytes_per_step", float("nan"))
            lines.append(f"| {replay} | {m['seconds_per_step']:.4f} | {m['peak_rss_mib']:.0f} | {kept:.0f} |")
        lines.append(f"\nrollout / none time: {cost_['time_ratio']:.3f}")
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def plot(results: dict, seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for replay, color in (("none", "tab:gray"), ("rollout", "tab:blue")):
        for seed in seeds:
            rows = results[f"{replay}/seed{seed}"]
            for ax, key in zip(axes, ("reward", "clip_ratio/region_mean", "routing/mismatch_rollout")):
                logged = [r for r in rows if r.get(key) is not None]  # the reward: at generation steps only
                ax.plot([r["step"] for r in logged], _smooth([r[key] for r in logged]), color=color, alpha=0.8,
                        label=replay if seed == seeds[0] else None)  # fmt: skip
    for ax, title in zip(axes, ("reward (sum_reward)", "ratio clip fraction", "routing mismatch vs rollout (pairs)")):
        ax.set_title(f"{title}, mean of 8 logs")
        ax.set_xlabel("optimizer step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rl_replay_runs.png", dpi=110)


def _smooth(values: list[float], window: int = 8) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/rl_replay")
    parser.add_argument("--model", default=None, help="a QwenMoE-GB folder with a tokenizer (default: pretrain one)")
    parser.add_argument("--base_steps", type=int, default=600)
    parser.add_argument("--sft_steps", type=int, default=1000)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each run (part 3)")
    parser.add_argument("--mismatch_batches", type=int, default=4, help="generated batches per mismatch arm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion_length", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--run_precision", default="autocast", choices=list(PRECISIONS), help="of the runs (part 3)")
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--cost_rounds", type=int, default=3)
    parser.add_argument("--cost_steps", type=int, default=20)
    parser.add_argument("--cost_arm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="mismatch,runs", help="which of mismatch,runs to run, or report")
    args = parser.parse_args()
    if args.cost_arm:
        return cost_arm(args.model, args.cost_arm, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.parts == "report":
        print(report(out, args.seeds))
        return
    model_dir = base_model(args)
    if "mismatch" in args.parts:
        (out / "mismatch.json").write_text(json.dumps(mismatch(model_dir, args), indent=1))
    if "runs" in args.parts:
        results = runs(model_dir, args)
        (out / "runs.json").write_text(json.dumps(results, indent=1))
        plot(results, args.seeds, out)
    if args.cost:
        (out / "cost.json").write_text(json.dumps(cost(model_dir, args), indent=1))
    print(report(out, args.seeds))


if __name__ == "__main__":
    main()
