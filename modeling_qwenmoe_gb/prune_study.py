"""`qwenmoe-gb prune-study`: does global-batch balance lose less when experts are pruned for one domain?

For every trained run of a `compare` folder (`<runs>/<arm>/seed<k>`: the arms trained on the same tokens per seed),
one calibration pass per domain (training split) gives every score (`prune.calibrate`); then for each fraction of
experts kept and each score, the model is pruned
- (a) per domain, with that domain's calibration data, and evaluated on that domain's held-out split (a
  domain-specific deployment), and
- (b) with the mixed calibration data of all domains, evaluated on every domain.
The measure is the held-out perplexity increase over the unpruned model, per domain; the report gives it averaged
over domains, mean ± std over seeds, per arm, fraction and score (`prune_study.md`, `prune_study.json`,
`prune_study.png`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .prune import (
    calibrate,
    calibration_sequences,
    choose_experts,
    keep_count,
    pool,
    prune_sites,
    pruned_model,
    routing_groups,
    scores_of,
)

MODES = ("domain", "mixed")  # (a) per-domain calibration, evaluated on the domain; (b) mixed, evaluated on all


@dataclass
class PruneStudyArguments:
    runs: str = field(default="runs/qb-study", metadata={"help": "a compare output folder: <runs>/<arm>/seed<k>"})
    arms: str = field(default="micro,global,auxfree-global", metadata={"help": "arms to prune"})
    seeds: str = field(default="0,1,2", metadata={"help": "seeds to prune"})
    fractions: str = field(default="0.75,0.5,0.25", metadata={"help": "shares of experts kept"})
    scores: str = field(default="reap,frequency,gate_sum", metadata={"help": "expert scores"})
    calibration_sequences: int = field(default=64, metadata={"help": "training sequences per domain"})
    eval_max_sequences: int = field(default=64, metadata={"help": "held-out sequences per domain"})
    eval_batch_size: int = field(default=16, metadata={"help": "batch size of calibration and evaluation"})
    out: str = field(default="runs/prune-study", metadata={"help": "output folder"})


def _domain_ppl(model, test, domain: str, args: PruneStudyArguments) -> float:
    from . import analysis
    from .data import TokenDomains

    one = TokenDomains({domain: test.streams[domain]}, test.seq_len)
    routed = analysis.route_domains(model, one, args.eval_batch_size, args.eval_max_sequences)
    return analysis.perplexity_report(routed)["domains"][domain]["ppl"]


def study_run(run: Path, args: PruneStudyArguments) -> dict:
    """One trained run: its unpruned held-out PPL per domain and, per fraction, score, mode and domain, the pruned
    model's."""
    from .pretraining import DataArguments, load_trained, use_recorded_data

    data_args = DataArguments()
    use_recorded_data(str(run), data_args, [])
    opened = data_args.open(progress=False)
    train, test = opened.domains("train", data_args.seq_len), opened.domains("test", data_args.seq_len)
    domains = [d for d, n in zip(test.domains, test.sizes) if n > 0]
    model = load_trained(run).eval()
    num_experts = prune_sites(model)[0].num_experts
    stats = calibrate(model, calibration_sequences(train, domains, args.calibration_sequences), args.eval_batch_size)
    base = {d: _domain_ppl(model, test, d, args) for d in domains}
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        keep = keep_count(num_experts, None, fraction)
        for score in args.scores.split(","):
            for calibration in [*domains, "mixed"]:
                pooled = pool(stats, domains if calibration == "mixed" else [calibration])
                kept = choose_experts(scores_of(pooled, score), keep, routing_groups(model.config))
                pruned = pruned_model(model, kept)
                for domain in domains if calibration == "mixed" else [calibration]:
                    ppl = _domain_ppl(pruned, test, domain, args)
                    rows.append({"fraction": fraction, "keep": keep, "score": score, "domain": domain, "ppl": ppl,
                                 "mode": "mixed" if calibration == "mixed" else "domain"})  # fmt: skip
    return {"base": base, "num_experts": num_experts, "rows": rows}


def summarize(results: dict[str, dict[int, dict]]) -> dict:
    """{arm: {"base": [avg PPL per seed], (mode, fraction, score): [mean over domains of PPL / base − 1, per seed]}}"""
    summary = {}
    for arm, seeds in results.items():
        entry = {"base": [statistics.fmean(r["base"].values()) for r in seeds.values()], "cells": {}}
        keys = sorted({(row["mode"], row["fraction"], row["score"]) for r in seeds.values() for row in r["rows"]})
        for key in keys:
            mode, fraction, score = key
            per_seed = []
            for r in seeds.values():
                hits = [row for row in r["rows"] if (row["mode"], row["fraction"], row["score"]) == key]
                per_seed.append(statistics.fmean(row["ppl"] / r["base"][row["domain"]] - 1 for row in hits))
            entry["cells"][f"{mode}|{fraction}|{score}"] = per_seed
        summary[arm] = entry
    return summary


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"+{100 * mean:.1f}% ± {100 * std:.1f}" if mean >= 0 else f"{100 * mean:.1f}% ± {100 * std:.1f}"


def report_markdown(summary: dict, args: PruneStudyArguments, command: str) -> str:
    scores = args.scores.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    header = ["arm", "kept", "unpruned avg PPL"] + [f"{m} · {s}" for m in MODES for s in scores]
    lines = [f"Command: `{command}`", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, entry in summary.items():
        for fraction in fractions:
            cells = [_cell(entry["cells"][f"{m}|{fraction}|{s}"]) for m in MODES for s in scores]
            base = f"{statistics.fmean(entry['base']):.3f}"
            lines.append(f"| {arm} | {fraction:.0%} | {base} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: held-out PPL increase over the unpruned model, averaged over domains, mean ± std over seeds. "
              "`domain`: pruned with one domain's calibration data, evaluated on that domain; `mixed`: pruned with "
              "all domains' data, evaluated on every domain."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, args: PruneStudyArguments, path: Path, score: str = "reap") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [float(f) for f in args.fractions.split(",")]
    fig, axes = plt.subplots(1, len(MODES), figsize=(10, 3.8), sharey=True)
    for ax, mode in zip(axes, MODES):
        for arm, entry in summary.items():
            values = [entry["cells"][f"{mode}|{f}|{score}"] for f in fractions]
            means = [100 * statistics.fmean(v) for v in values]
            stds = [100 * (statistics.stdev(v) if len(v) > 1 else 0.0) for v in values]
            ax.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=arm)
        ax.set_xlabel("fraction of experts kept")
        ax.set_title(f"{'per-domain' if mode == 'domain' else 'mixed'} calibration ({score})")
        ax.invert_xaxis()
        ax.set_yscale("symlog", linthresh=1)
    axes[0].set_ylabel("held-out PPL increase (%)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prune_study(argv: list[str]) -> dict:
    from .cli import command_parser

    (args,) = command_parser("prune-study").parse_args_into_dataclasses(args=argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in args.arms.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = Path(args.runs) / arm / f"seed{seed}"
            if not (run / "config.json").is_file():
                raise ValueError(f"runs={args.runs!r}: no trained run at {run} (arm {arm!r}, seed {seed})")
            cached = out / f"{arm}_seed{seed}.json"
            if cached.is_file():  # a rerun keeps the runs already studied
                results.setdefault(arm, {})[seed] = json.loads(cached.read_text())
                continue
            torch.manual_seed(0)
            results.setdefault(arm, {})[seed] = study_run(run, args)
            cached.write_text(json.dumps(results[arm][seed]))
            print(f"{arm} seed {seed}: studied")
    summary = summarize(results)
    command = "qwenmoe-gb prune-study " + " ".join(argv)
    (out / "prune_study.json").write_text(json.dumps(summary, indent=1))
    (out / "prune_study.md").write_text(report_markdown(summary, args, command))
    plot(summary, args, out / "prune_study.png")
    print((out / "prune_study.md").read_text())
    return summary


__all__ = ["PruneStudyArguments", "prune_study", "study_run", "summarize"]
