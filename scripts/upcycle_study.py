"""Upcycling study: does global-batch balance upcycle a dense model better than micro-batch balance?

    python scripts/upcycle_study.py --data ../shared/corpus --out runs/upcycle --seeds 0,1,2

1. A small dense Qwen3 model is trained on the data (`--dense_steps`), the same domain-pure batches as every arm.
2. From it, for every seed, each arm trains `--steps` more optimizer steps on the same tokens:
   - `dense`: the dense model continued;
   - `copy-micro`, `copy-global`: upcycled by `copy` (8 experts = the FFN, top-2), micro / global balance;
   - `segment-micro`, `segment-global`: upcycled by `segment` (32 experts of a quarter of the FFN, top-8);
   - `scratch-copy`, `scratch-segment`: the same MoE shapes from random weights, global balance, for
     `--dense_steps + --steps` steps (the same total tokens as dense + upcycled).
   Both MoE shapes have the same total (4× the FFN) and active (2× the FFN) expert parameters.
3. Reported (report.md, summary.json, plots): held-out perplexity per domain and on average, specialization KL
   I(domain; expert) at checkpoints through training, MaxVio, and the initial loss of each upcycled model against
   the dense one. Every MoE arm is a `qwenmoe-gb pretrain` run (`--upcycle_from` or `--preset`), so its folder holds
   the usual eval.json, specialization.json, heatmaps, card.
"""

import argparse
import json
import statistics
from pathlib import Path

import transformers
from transformers import TrainingArguments, set_seed

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM, analysis
from modeling_qwenmoe_gb.convert import dense_moe_config, from_dense
from modeling_qwenmoe_gb.data import ByteTokenizer, DomainBatchSampler, collate_causal_lm, open_data
from modeling_qwenmoe_gb.pretraining import pretrain
from modeling_qwenmoe_gb.trainer import DomainBatchTrainer

DENSE = dict(vocab_size=260, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
RECIPES = {  # same total (4 × FFN) and active (2 × FFN) expert parameters
    "copy": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512),
    "segment": dict(num_experts=32, num_experts_per_tok=8, moe_intermediate_size=128),
}
ARMS = ("dense", "copy-micro", "copy-global", "segment-micro", "segment-global", "scratch-copy", "scratch-segment")


def common(args) -> list[str]:
    return ["--data", args.data, "--seq_len", str(args.seq_len), "--per_device_train_batch_size", str(args.batch),
            "--gradient_accumulation_steps", str(args.accumulation), "--learning_rate", str(args.lr),
            "--warmup_steps", "0", "--logging_steps", str(max(1, args.steps // 20)), "--disable_tqdm", "true",
            "--eval_max_sequences", str(args.eval_sequences), "--router_aux_loss_coef", str(args.coef),
            "--max_docs_per_domain", str(args.max_docs), "--report_to", "none"]  # fmt: skip


def train_dense(model, out: Path, steps: int, seed: int, args, train) -> None:
    """The dense model on the same domain-pure batches (`DomainBatchSampler`) as the MoE arms."""
    set_seed(seed)
    micro_batches = steps * args.accumulation
    sampler = DomainBatchSampler(train.sizes, args.batch, [1.0] * len(train.domains), micro_batches, seed)
    train_args = TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=args.batch,
                                   gradient_accumulation_steps=args.accumulation, learning_rate=args.lr,
                                   warmup_steps=0, lr_scheduler_type="cosine", weight_decay=0.01,
                                   dataloader_drop_last=True, logging_steps=max(1, steps // 20),
                                   save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                                   seed=seed)  # fmt: skip
    trainer = DomainBatchTrainer(model=model, args=train_args, train_dataset=train,
                                 data_collator=collate_causal_lm, train_batch_sampler=sampler)  # fmt: skip
    trainer.train()
    model.save_pretrained(out)
    analysis.write_json({"log_history": trainer.state.log_history}, out / "log_history.json")


def evaluate(model, test, args) -> dict:
    return analysis.perplexity_report(analysis.route_domains(model, test, 16, args.eval_sequences))


def kl_over_training(run: Path, test, args, heatmaps: bool = False) -> list[tuple[int, float]]:
    """Specialization KL of each checkpoint of a MoE run and of the final model; with `heatmaps`, the expert-frequency
    heatmap of each point as `heatmap_step<k>.png` in the run folder (when specialization appears)."""
    points = []
    final = json.loads((run / "log_history.json").read_text())["log_history"][-1]["step"]  # the run's last step
    for folder in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) + [run]:
        step = int(folder.name.split("-")[1]) if folder != run else final
        if folder == run and points and points[-1][0] == final:
            break  # the last checkpoint is the final model
        model = QwenMoeGBForCausalLM.from_pretrained(folder)
        routed = analysis.route_domains(model, test, 16, args.eval_sequences)
        spec = analysis.specialization_report(routed, model.config.num_experts_per_tok)
        points.append((step, spec["specialization_kl"]))
        if heatmaps:
            analysis.plot_heatmaps(spec, run / f"heatmap_step{step}.png", f"{run.parent.name}, step {step}")
    return points


def maxvio(run: Path) -> float | None:
    history = json.loads((run / "log_history.json").read_text())["log_history"]
    values = [h["balance/maxvio_global"] for h in history if "balance/maxvio_global" in h]
    return statistics.mean(values[len(values) // 2 :]) if values else None  # second half of training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/corpus", help="a folder of domains (train/test jsonl)")
    parser.add_argument("--out", default="runs/upcycle")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--dense_steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="steps after upcycling (every arm)")
    parser.add_argument("--checkpoints", type=int, default=3, help="KL measured at this many points in training")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch (one domain each)")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--coef", type=float, default=0.01, help="router_aux_loss_coef of every MoE arm")
    parser.add_argument("--max_docs", type=int, default=400, help="documents per domain")
    parser.add_argument("--eval_sequences", type=int, default=32, help="held-out sequences per domain")
    args = parser.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    data = open_data(args.data, "byte", max_docs_per_domain=args.max_docs)
    tokenizer = ByteTokenizer()
    train, test = data.domains("train", args.seq_len), data.domains("test", args.seq_len)

    dense_dir = out / "dense-base"
    if not (dense_dir / "model.safetensors").is_file():
        set_seed(0)
        dense = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**DENSE))
        train_dense(dense, dense_dir, args.dense_steps, 0, args, train)
        tokenizer.to_hf().save_pretrained(dense_dir)
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    summary = {"args": vars(args), "base": evaluate(dense, test, args), "initial": {}, "arms": {}}
    for recipe, shape in RECIPES.items():  # the upcycled model before any training, against the dense one
        set_seed(0)
        model = from_dense(dense, **shape, recipe=recipe)
        routed = analysis.route_domains(model, test, 16, args.eval_sequences)
        upcycled = analysis.perplexity_report(routed)
        gap = upcycled["average_loss"] - summary["base"]["average_loss"]
        kl = analysis.specialization_report(routed, model.config.num_experts_per_tok)["specialization_kl"]
        summary["initial"][recipe] = {"average_loss": upcycled["average_loss"], "gap_vs_dense": gap, "kl": kl}
        config = dense_moe_config(dense.config, recipe=recipe, **shape).to_dict()
        (out / f"moe-{recipe}.json").write_text(json.dumps({k: v for k, v in config.items() if k in QWEN_MOE_FIELDS}))

    for arm in arms:
        for seed in seeds:
            run = out / arm / f"seed{seed}"
            if not (run / "eval.json").is_file():
                run_arm(arm, seed, run, dense_dir, out, args, train)
            result = {"eval": json.loads((run / "eval.json").read_text())}
            if arm != "dense":
                result["kl_over_training"] = kl_over_training(run, test, args, heatmaps=seed == seeds[0])
                result["maxvio"] = maxvio(run)
            summary["arms"].setdefault(arm, {})[seed] = result
    analysis.write_json(summary, out / "summary.json")
    (out / "report.md").write_text(report(summary, seeds))
    plot(summary, seeds, out)
    print((out / "report.md").read_text())


QWEN_MOE_FIELDS = (
    *DENSE, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "use_qk_norm", "qkv_bias", "norm_topk_prob",
    "shared_expert_intermediate_size", "decoder_sparse_step", "rope_parameters",
)  # fmt: skip


def run_arm(arm: str, seed: int, run: Path, dense_dir: Path, out: Path, args, train) -> None:
    if arm == "dense":
        model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
        train_dense(model, run, args.steps, seed, args, train)
        data = open_data(args.data, "byte", max_docs_per_domain=args.max_docs)
        analysis.write_json(evaluate(model, data.domains("test", args.seq_len), args), run / "eval.json")
        return
    kind, variant = arm.split("-")
    keep = ["--save_only_model", "true", "--save_total_limit", str(args.checkpoints + 1)]
    save = ["--save_steps", str(max(1, args.steps // args.checkpoints)), *keep]
    flags = [*common(args), "--output_dir", str(run), "--seed", str(seed), *save]
    if kind == "scratch":
        steps = args.dense_steps + args.steps
        save = ["--save_steps", str(max(1, steps // args.checkpoints)), *keep]
        flags = [*common(args), "--output_dir", str(run), "--seed", str(seed), *save]
        pretrain([*flags, "--preset", str(out / f"moe-{variant}.json"), "--balance_scope", "global",
                  "--max_steps", str(steps)])  # fmt: skip
        return
    shape = RECIPES[kind]
    pretrain([*flags, "--upcycle_from", str(dense_dir), "--upcycle_recipe", kind, "--balance_scope", variant,
              "--max_steps", str(args.steps), *[f"--{k}={v}" for k, v in shape.items()]])  # fmt: skip


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(summary: dict, seeds: list[int]) -> str:
    domains = list(summary["base"]["domains"])
    lines = [
        "| arm | avg PPL | " + " | ".join(f"PPL {d}" for d in domains) + " | final KL | MaxVio (2nd half) |",
        "|---|---|" + "---|" * len(domains) + "---|---|",
    ]
    for arm, runs in summary["arms"].items():
        evals = [runs[s]["eval"] for s in seeds if s in runs]
        cells = [_mean_std([e["average_ppl"] for e in evals])]
        cells += [_mean_std([e["domains"][d]["ppl"] for e in evals]) for d in domains]
        kls = [runs[s]["kl_over_training"][-1][1] for s in seeds if "kl_over_training" in runs.get(s, {})]
        mv = [runs[s]["maxvio"] for s in seeds if runs.get(s, {}).get("maxvio") is not None]
        cells += [_mean_std(kls) if kls else "–", _mean_std(mv) if mv else "–"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    base = summary["base"]
    gaps = "; ".join(f"{r} {v['gap_vs_dense']:+.4f} nats" for r, v in summary["initial"].items())
    lines += ["", f"Dense model before the arms: average PPL {base['average_ppl']:.3f}.",
              f"Initial loss of the upcycled models against the dense one (before any training): {gaps}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(summary["arms"])
    means = [statistics.mean(r[s]["eval"]["average_ppl"] for s in seeds if s in r) for r in summary["arms"].values()]
    left.bar(names, means, color="tab:blue")
    for i, runs in enumerate(summary["arms"].values()):
        left.scatter([i] * len(runs), [runs[s]["eval"]["average_ppl"] for s in runs], color="black", s=10, zorder=3)
    left.set_ylim(min(means) * 0.95, max(means) * 1.03)
    left.set_ylabel("held-out average PPL (bytes)")
    left.tick_params(axis="x", rotation=30)
    for arm, runs in summary["arms"].items():
        if arm == "dense":
            continue
        start = [] if arm.startswith("scratch") else [(0, summary["initial"][arm.split("-")[0]]["kl"])]
        for seed, result in runs.items():
            steps, kls = zip(*(start if seed == seeds[0] else []), *result["kl_over_training"])  # step 0: seed 0's
            right.plot(steps, kls, marker="o", label=arm if seed == seeds[0] else None,
                       color=f"C{names.index(arm)}", alpha=0.8)  # fmt: skip
    right.set_xlabel("optimizer step of the arm")
    right.set_ylabel("specialization KL I(domain; expert)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "upcycle_study.png", dpi=120)


if __name__ == "__main__":
    main()
