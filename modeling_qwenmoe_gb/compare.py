"""`qwenmoe-gb compare`: micro vs global balance (Qiu et al. 2025) as arms that differ only in how they balance.

Features
- Arms from the same initialisation and the same data order (same seed → same init and same batch stream):
  `micro` (LBL over each domain-pure chunk of `domain_chunk` sequences = one emulated micro-batch; every arm reports
  its micro metrics over these chunks), `bsz<b>` (LBL over
  chunks of b sequences: the balance-BSZ sweep on one device), `global` (whole step, + accumulation buffer),
  `global+micro` (global + `micro_balance_coef` × micro, paper Table 5), `auxfree-micro` / `auxfree-global` (aux-free
  bias moved per micro-batch from local counts / per step from global counts), `micro->global` / `global->micro`
  (scope switched at `switch_step`, paper Table 3), `qb-global` / `qb-micro_mean` (Quantile Balancing, no loss: the
  bias solved each step from the pooled margin histograms / the mean of the micro-batches' quantiles),
  `qb-global+seq` (QB + a sequence-wise LBL of coefficient `arm_sequence_coef`, DeepSeek-V3's complement),
  `global+device` (global + the device-level loss over the
  expert-parallel ranks, `device_balance_groups="ep"`, coefficient `arm_device_balance_coef`), `global+grouped`
  (global + group-limited routing: `arm_n_group` groups, `arm_topk_group` per token; under EP with `arm_n_group =
  ep_size` a token reaches at most `arm_topk_group` ranks), `global+cap<f>` (global + capacity factor f in training,
  e.g. `global+cap1.25`; the report adds the dropped fraction).
- Runs under `torchrun` with transformers' engine flags (`--fsdp_size 2 --ep_size 2`): every rank trains each arm,
  rank 0 writes the report. Under EP the report adds the load over devices: MaxVio over the EP ranks from the global
  counts and from what the all-to-all delivered.
- Several seeds per arm, reported as mean ± standard deviation; the difference from `micro` per seed.
- A rerun of an interrupted compare keeps the finished arms and resumes the interrupted one from its newest complete
  checkpoint (`--overwrite_output_dir true` runs everything again).
- A markdown report (per-domain and average PPL, Δ vs micro, specialization KL, max expert frequency, MaxVio global and
  micro during training) and PNGs: PPL against balance BSZ (Figure 2), micro vs global heatmaps (Figure 1b), LBL and
  CE curves (Figure 3).

Every flag that is not a compare flag goes to `qwenmoe-gb pretrain` (TrainingArguments, model and data flags); raw
data is prepared once, in the shared data cache, for every arm and seed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from .analysis import write_json
from .pretraining import pretrain

COMPARE_DEFAULTS = [
    "--per_device_train_batch_size", "16",
    "--gradient_accumulation_steps", "1",
    "--max_steps", "400",
    "--logging_steps", "20",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
]  # fmt: skip


@dataclass
class CompareArguments:
    arms: str = field(default="micro,bsz8,global", metadata={"help": "comma-separated arms (see module doc)"})
    seeds: str = field(default="0,1", metadata={"help": "comma-separated seeds; each arm runs every seed"})
    out: str = field(default="runs/compare", metadata={"help": "output folder of the runs and the report"})
    domain_chunk: int = field(default=2, metadata={"help": "sequences per domain-pure chunk (the micro batch)"})
    arm_micro_balance_coef: float = field(default=0.01, metadata={"help": "micro coefficient of global+micro"})
    arm_device_balance_coef: float = field(default=0.1, metadata={"help": "device coefficient of global+device"})
    arm_sequence_coef: float = field(default=1e-4, metadata={"help": "sequence-wise LBL coefficient of qb-global+seq"})
    arm_n_group: int = field(default=2, metadata={"help": "expert groups of global+grouped (= ep_size: devices)"})
    arm_topk_group: int = field(default=1, metadata={"help": "groups per token of global+grouped"})
    switch_step: int | None = field(default=None, metadata={"help": "step of the scope switch (default: half)"})
    report_only: bool = field(default=False, metadata={"help": "skip training: rebuild the report from the runs"})


def arm_flags(arm: str, args: CompareArguments, max_steps: int) -> list[str]:
    """pretrain flags of one arm."""
    switch = str(args.switch_step if args.switch_step is not None else max_steps // 2)
    table = {
        "micro": ["--balance_scope", "micro", "--balance_group_size", str(args.domain_chunk)],
        "global": ["--balance_scope", "global", "--balance_group_size", str(args.domain_chunk)],
        "global+micro": ["--balance_scope", "global", "--micro_balance_coef", str(args.arm_micro_balance_coef),
                         "--balance_group_size", str(args.domain_chunk)],
        "global+device": ["--balance_scope", "global", "--balance_group_size", str(args.domain_chunk),
                          "--device_balance_groups", "ep", "--device_balance_coef", str(args.arm_device_balance_coef)],
        "auxfree-micro": ["--aux_free", "true", "--router_aux_loss_coef", "0", "--aux_free_update", "micro"],
        "auxfree-global": ["--aux_free", "true", "--router_aux_loss_coef", "0", "--aux_free_update", "global"],
        "qb-global": ["--aux_free", "true", "--aux_free_method", "quantile", "--router_aux_loss_coef", "0"],
        "qb-micro_mean": ["--aux_free", "true", "--aux_free_method", "quantile", "--quantile_scope", "micro_mean",
                          "--router_aux_loss_coef", "0"],
        "qb-global+seq": ["--aux_free", "true", "--aux_free_method", "quantile", "--balance_scope", "sequence",
                          "--router_aux_loss_coef", str(args.arm_sequence_coef)],
        "micro->global": ["--balance_scope", "micro", "--balance_group_size", str(args.domain_chunk),
                          "--switch_scope_at", switch, "--switch_scope_to", "global"],
        "global->micro": ["--balance_scope", "global", "--balance_group_size", str(args.domain_chunk),
                          "--switch_scope_at", switch, "--switch_scope_to", "micro"],
    }  # fmt: skip
    table["global+grouped"] = [*table["global"], "--n_group", str(args.arm_n_group),
                               "--topk_group", str(args.arm_topk_group)]  # fmt: skip
    if arm in table:
        return table[arm]
    if arm.startswith("global+cap") and _is_number(arm[len("global+cap") :]):
        return [*table["global"], "--expert_capacity_factor", arm[len("global+cap") :]]
    if arm.startswith("bsz") and arm[3:].isdigit():
        return ["--balance_scope", "micro", "--balance_group_size", arm[3:]]
    raise ValueError(
        f"arms: unknown arm {arm!r}: allowed {sorted(table)}, bsz<b> (e.g. bsz8) or global+cap<f> (e.g. global+cap1.25)"
    )


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def balance_bsz(arm: str, args: CompareArguments, batch: int, world: int, accumulation: int) -> int | None:
    """Sequences each balance loss counts over (x axis of Figure 2); None where it is not a plain LBL arm."""
    if arm == "micro":
        return args.domain_chunk
    if arm.startswith("bsz"):
        return int(arm[3:])
    if arm in ("global", "global+device", "global+grouped") or arm.startswith("global+cap"):
        return batch * world * accumulation
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _training_mean(history: list[dict], key: str, first: float = 1.0) -> float:
    """Mean of a logged metric over training, or over the first `first` share of its logs."""
    values = [h[key] for h in history if key in h]
    values = values[: max(1, round(len(values) * first))]
    return statistics.fmean(values) if values else float("nan")


RUN_FILES = ("eval.json", "specialization.json", "log_history.json")
# balance metrics some arms log (capacity, EP, ...): a report column where any arm has them
OPTIONAL_COLUMNS = {
    "dropped_fraction": "dropped", "sent_off_rank": "rows off-rank", "tokens_off_rank": "tokens off-rank",
    "dead_experts": "dead experts", "maxvio_early": "MaxVio global, first 10%", "bias_spread": "bias range",
}  # fmt: skip


def _finished(run_dir: Path, rest: list[str]) -> bool:
    """The arm's run is already done (a rerun of an interrupted compare keeps it), unless `--overwrite_output_dir
    true` asks to run it again."""
    overwrite = False
    if "--overwrite_output_dir" in rest:  # a bare flag is True, as HfArgumentParser reads it
        value = rest[rest.index("--overwrite_output_dir") + 1 :][:1]
        overwrite = not value or value[0].lower() not in ("false", "0", "no")
    done = all((run_dir / name).is_file() for name in RUN_FILES)
    if done and not overwrite:
        print(f"{run_dir}: finished by an earlier run, kept (--overwrite_output_dir true runs it again)")
    return done and not overwrite


def collect(run_dir: Path) -> dict:
    return {
        "eval": json.loads((run_dir / "eval.json").read_text()),
        "spec": json.loads((run_dir / "specialization.json").read_text()),
        "history": json.loads((run_dir / "log_history.json").read_text())["log_history"],
    }


def summarize(runs: dict[str, dict[int, dict]], bsz: dict[str, int | None]) -> dict:
    """Per arm: lists over seeds of each number in the report, plus Δ vs micro per seed."""
    summary = {}
    for arm, seeds in runs.items():
        domains = list(next(iter(seeds.values()))["eval"]["domains"])
        row = {
            "balance_bsz": bsz[arm],
            "avg_ppl": [r["eval"]["average_ppl"] for r in seeds.values()],
            "domain_ppl": {d: [r["eval"]["domains"][d]["ppl"] for r in seeds.values()] for d in domains},
            "kl": [r["spec"]["specialization_kl"] for r in seeds.values()],
            "max_freq": [statistics.fmean(r["spec"]["max_expert_frequency"].values()) for r in seeds.values()],
            "maxvio_global": [_training_mean(r["history"], "balance/maxvio_global") for r in seeds.values()],
            "maxvio_micro": [_training_mean(r["history"], "balance/maxvio_micro") for r in seeds.values()],
        }
        for key in ("maxvio_device", "maxvio_device_delivered", *OPTIONAL_COLUMNS):  # logged by some runs only
            logged, first = (key, 1.0) if key != "maxvio_early" else ("maxvio_global", 0.1)
            values = [_training_mean(r["history"], f"balance/{logged}", first) for r in seeds.values()]
            if not any(v != v for v in values):  # logged in every run (no NaN)
                row[key] = values
        if "micro" in runs:
            row["delta_vs_micro"] = [
                r["eval"]["average_ppl"] - runs["micro"][s]["eval"]["average_ppl"] for s, r in seeds.items()
            ]
        summary[arm] = row
    return summary


def report_markdown(summary: dict, command: str, seeds: list[int]) -> str:
    domains = list(next(iter(summary.values()))["domain_ppl"])
    device = all("maxvio_device" in row for row in summary.values())
    delivered = all("maxvio_device_delivered" in row for row in summary.values())
    head = ["arm", "balance BSZ", "avg PPL", "Δ vs micro", *[f"PPL {d}" for d in domains], "spec. KL",
            "max expert freq", "MaxVio global", "MaxVio micro"]  # fmt: skip
    head += ["MaxVio device"] * device + ["MaxVio device (all-to-all)"] * delivered
    shown = [k for k in OPTIONAL_COLUMNS if any(k in row for row in summary.values())]  # where any arm logs it
    head += [OPTIONAL_COLUMNS[k] for k in shown]
    lines = [
        "# QwenMoE-GB: micro vs global balance",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}; seeds {seeds} (mean ± std over seeds).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for arm, row in summary.items():
        cells = [
            arm,
            str(row["balance_bsz"] or "—"),
            _fmt(row["avg_ppl"]),
            _fmt(row["delta_vs_micro"], 4) if "delta_vs_micro" in row else "—",
            *[_fmt(row["domain_ppl"][d]) for d in domains],
            _fmt(row["kl"], 4),
            _fmt(row["max_freq"]),
            _fmt(row["maxvio_global"]),
            _fmt(row["maxvio_micro"]),
            *([_fmt(row["maxvio_device"])] if device else []),
            *([_fmt(row["maxvio_device_delivered"])] if delivered else []),
            *[_fmt(row[k], 4) if k in row else "0" if k == "dropped_fraction" else "—" for k in shown],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Δ vs micro: average PPL minus the micro arm's, per seed (negative = better than micro). spec. KL: "
        "I(domain; expert), the mean KL of each domain's expert distribution from the mixture's. MaxVio: mean over "
        "training logs of (max load − mean load) / mean load, global = whole step, micro = each micro-batch, device = "
        "the tokens each expert-parallel rank receives in a step (from the global counts, and as the all-to-all "
        "delivered them). dropped: the share of the top-k selections dropped over capacity (training). rows "
        "off-rank: the share of the (token, expert) rows the all-to-all sent to another rank; tokens off-rank: of the "
        "tokens with at least one row sent to another rank. dead experts: experts "
        "(summed over layers) that served no token in a step, mean over training logs. MaxVio global, first 10%: over "
        "the first tenth of the training logs (how fast an arm balances). bias range: max − min of the aux-free bias, "
        "mean over layers and logs.",
        "",
        "![PPL against balance BSZ](ppl_vs_balance_bsz.png)",
        "![micro vs global heatmaps](heatmaps_micro_vs_global.png)",
        "![LBL and CE curves](curves.png)",
        "![MaxVio per layer over training](maxvio_curves.png)",
    ]
    if device:
        lines.append("![load over devices, specialization and PPL](device_load.png)")
    return "\n".join(lines) + "\n"


def plot_figures(summary: dict, runs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((row["balance_bsz"], arm) for arm, row in summary.items() if row["balance_bsz"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if points:
        xs = [p[0] for p in points]
        stats = [_mean_std(summary[a]["avg_ppl"]) for _, a in points]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3)
        ax.set_xscale("log", base=2)
    ax.set_xlabel("balance BSZ (sequences)")
    ax.set_ylabel("average PPL")
    fig.savefig(out / "ppl_vs_balance_bsz.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    pair = [a for a in ("micro", "global") if a in runs]
    if pair:
        fig, axes = plt.subplots(1, len(pair), figsize=(6 * len(pair), 3), squeeze=False)
        for ax, arm in zip(axes[0], pair):
            spec = next(iter(runs[arm].values()))["spec"]
            freq = torch.tensor([spec["frequency"][d] for d in spec["domains"]])[:, -1]  # (domains, E) last layer
            ax.imshow(freq, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_yticks(range(len(spec["domains"])), spec["domains"])
            ax.set_xlabel("expert")
            ax.set_title(f"{arm}: last MoE layer, KL {spec['specialization_kl']:.3f}")
        fig.savefig(out / "heatmaps_micro_vs_global.png", dpi=110, bbox_inches="tight")
        plt.close(fig)

    if all("maxvio_device" in row for row in summary.values()):
        key = "maxvio_device_delivered" if all("maxvio_device_delivered" in r for r in summary.values()) else None
        title = "MaxVio over devices" + (" (all-to-all)" if key else " (global counts)")
        panels = [(key or "maxvio_device", title), ("kl", "specialization KL"), ("avg_ppl", "avg PPL")]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        names = list(summary)
        for ax, (field_name, title) in zip(axes, panels):
            stats = [_mean_std(summary[a][field_name]) for a in names]
            ax.bar(range(len(names)), [m for m, _ in stats], yerr=[e for _, e in stats], capsize=3, color="tab:blue")
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
            ax.set_title(title, fontsize=9)
        fig.savefig(out / "device_load.png", dpi=110, bbox_inches="tight")
        plt.close(fig)

    plot_maxvio_curves(runs, out / "maxvio_curves.png")

    fig, (ax_lbl, ax_ce) = plt.subplots(1, 2, figsize=(10, 3.5))
    for arm, seeds in runs.items():
        history = [h for h in next(iter(seeds.values()))["history"] if "ce_loss" in h]
        steps = [h["step"] for h in history]
        ax_lbl.plot(steps, [h.get("balance/global_lbl", float("nan")) for h in history], label=f"{arm} global LBL")
        ax_lbl.plot(steps, [h.get("balance/micro_lbl", float("nan")) for h in history], "--", label=f"{arm} micro")
        ax_ce.plot(steps, [h["ce_loss"] for h in history], label=arm)
    ax_lbl.set_xlabel("step")
    ax_lbl.set_ylabel("LBL")
    ax_lbl.legend(fontsize=6)
    ax_ce.set_xlabel("step")
    ax_ce.set_ylabel("CE")
    ax_ce.legend(fontsize=7)
    fig.savefig(out / "curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_maxvio_curves(runs: dict, path: Path) -> None:
    """MaxVio of the whole step over training, one panel per MoE layer, one line per arm (mean over seeds)."""
    import matplotlib.pyplot as plt

    def curve(history: list[dict], key: str) -> tuple[list[int], list[float]]:
        points = [(h["step"], h[key]) for h in history if key in h]
        return [p[0] for p in points], [p[1] for p in points]

    first = next(iter(next(iter(runs.values())).values()))["history"]
    layers = sorted({int(k.rsplit("_", 1)[1]) for h in first for k in h if k.startswith("balance/maxvio_global/")})
    keys = [f"balance/maxvio_global/layer_{i}" for i in layers] or ["balance/maxvio_global"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, seeds in runs.items():
            curves = [curve(r["history"], key) for r in seeds.values()]
            length = min(len(c[0]) for c in curves)
            if length:
                mean = [statistics.fmean(c[1][i] for c in curves) for i in range(length)]
                ax.plot(curves[0][0][:length], mean, label=arm)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(key.removeprefix("balance/").replace("/", " "), fontsize=9)
    axes[0][0].set_ylabel("MaxVio (whole step)")
    axes[0][-1].legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def compare(argv: list[str]) -> dict:
    from .cli import command_parser

    args, rest = command_parser("compare").parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    rest = COMPARE_DEFAULTS + rest
    arms = [a for a in args.arms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",") if s]

    def last(flag: str, default: str) -> int:
        """The value of the last occurrence of a flag (argparse: the last one wins)."""
        return int(rest[len(rest) - 1 - rest[::-1].index(flag) + 1]) if flag in rest else int(default)

    max_steps = last("--max_steps", "400")
    flags = {arm: arm_flags(arm, args, max_steps) for arm in arms}  # validates every arm before training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank (the group starts in the first run)
    runs: dict[str, dict[int, dict]] = {}
    for arm in arms:
        for seed in seeds:
            run_dir = out / arm.replace(">", "").replace("+", "_plus_") / f"seed{seed}"
            common = ["--domain_chunk", str(args.domain_chunk), "--seed", str(seed), "--output_dir", str(run_dir)]
            if not args.report_only and not _finished(run_dir, rest):
                pretrain(rest + flags[arm] + common)  # an interrupted arm resumes from its newest checkpoint
            if main_process:  # rank 0 writes the run's files; the other ranks go on to the next run
                runs.setdefault(arm, {})[seed] = collect(run_dir)
    if not main_process:
        return {}

    batch, accumulation = last("--per_device_train_batch_size", "8"), last("--gradient_accumulation_steps", "1")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    bsz = {arm: balance_bsz(arm, args, batch, world, accumulation) for arm in arms}
    summary = summarize(runs, bsz)
    command = "qwenmoe-gb compare " + " ".join(argv)
    (out / "report.md").write_text(report_markdown(summary, command, seeds))
    write_json(summary, out / "summary.json")
    plot_figures(summary, runs, out)
    print((out / "report.md").read_text())
    return summary
