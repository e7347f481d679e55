"""Per-domain evaluation and expert-specialization analysis.

Features
- `route_domains`: one pass over each domain's held-out sequences (a QwenMoE-GB model, or any transformers MoE the
  balancer reads: `any_moe`): CE sum and token count (perplexity), expert
  selection counts (L, E), and the mean top-K routing-score sum per layer.
- `perplexity_report`: per-domain and domain-averaged perplexity (the paper's measure), JSON + a printed table.
- `specialization_report`: selection frequency per domain × layer × expert (paper Figure 1b), top-K score sum per
  layer and domain (Figure 4a), the specialization number I(domain; expert) = mean KL of each domain's expert
  distribution from the domain mixture's (uniform prior over domains), each domain's maximum expert frequency.
- PNG plots with matplotlib (Agg backend, no display).
- The same specialization numbers as a local `evaluate` metric: `evaluate.load(SPECIALIZATION_METRIC)`.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from .data import TokenDomains

SPECIALIZATION_METRIC = str(Path(__file__).resolve().parent / "metrics" / "expert_specialization")


@torch.no_grad()
def route_domains(model, packed: TokenDomains, batch_size: int = 16, max_sequences: int | None = None) -> dict:
    """{domain: {"ce_sum", "tokens", "counts" (L, E), "topk_score_sum" (L,)}} over the held-out sequences, for a
    QwenMoE-GB model or any transformers MoE the balancer reads (`any_moe`); a model without routers (a dense
    baseline) gets "ce_sum" and "tokens" only."""
    model.eval()
    device = next(model.parameters()).device
    stock = stock_view(model)
    routers = model.model.moe_routers() if stock is None and hasattr(model.model, "moe_routers") else None
    recording = stock.analysis() if stock is not None else contextlib.nullcontext()
    out = {}
    with recording:
        for domain in [d for d, n in zip(packed.domains, packed.sizes) if n > 0]:  # a domain shorter than seq_len: none
            seqs = packed.sequences(domain, max_sequences)  # (N, S)
            ce_sum, tokens, counts, topk = 0.0, 0, 0, 0
            for start in range(0, len(seqs), batch_size):
                ids = seqs[start : start + batch_size].to(device)  # (B, S)
                result = model(input_ids=ids, output_router_logits=routers is not None, use_cache=False)
                logits = result.logits[:, :-1].float()  # (B, S-1, V)
                ce = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
                ce_sum += ce.item()
                tokens += ids[:, 1:].numel()
                if routers is not None:
                    counts = counts + result.router_stats.counts.sum(1).double().cpu()  # (L, E)
                    scores = [_topk_score_sum(x, r) for x, r in zip(result.router_logits, routers)]
                    topk = topk + torch.stack(scores).cpu()  # (L,)
                elif stock is not None:
                    counts = counts + stock.router_stats().counts.sum(1).double().cpu()  # (L, E)
                    topk = topk + stock.last_topk_score_sums().cpu()  # (L,)
            out[domain] = {"ce_sum": ce_sum, "tokens": tokens}
            if routers is not None or stock is not None:
                out[domain].update(counts=counts, topk_score_sum=topk / (len(seqs) * seqs.shape[1]))
    return out


def _topk_score_sum(router_logits: torch.Tensor, router) -> torch.Tensor:
    """Σ over tokens of the (unnormalised) scores of the selected top-K experts, for one layer."""
    scores, index, _ = router.select(router_logits)  # (T, E), (T, K)
    return scores.gather(-1, index).sum().double()


def stock_view(model):
    """The balancer's hooks on a transformers MoE that is not a QwenMoE-GB model (the trainer's, when it left them),
    or None for a QwenMoE-GB model or a model without routers."""
    from .any_moe import StockMoE, base_model_of
    from .balance import find_moe_model

    if find_moe_model(model) is not None:
        return None
    try:
        base = base_model_of(model)
    except ValueError:  # no router: a dense model
        return None
    existing = getattr(base, "_qwenmoe_gb_stats", None)
    return existing if existing is not None and existing._handles else StockMoE(model)  # its hooks, if still on


def experts_per_token(model) -> int:
    """K of a QwenMoE-GB model or of any transformers MoE the balancer reads."""
    stock = stock_view(model)
    return stock.config.num_experts_per_tok if stock is not None else model.config.num_experts_per_tok


def perplexity_report(routed: dict) -> dict:
    domains = {
        d: {"loss": r["ce_sum"] / r["tokens"], "ppl": math.exp(r["ce_sum"] / r["tokens"]), "tokens": r["tokens"]}
        for d, r in routed.items()
    }
    return {
        "domains": domains,
        "average_ppl": sum(v["ppl"] for v in domains.values()) / len(domains),
        "average_loss": sum(v["loss"] for v in domains.values()) / len(domains),
    }


def format_ppl_table(report: dict) -> str:
    lines = ["| domain | loss | PPL |", "|---|---|---|"]
    lines += [f"| {d} | {v['loss']:.4f} | {v['ppl']:.3f} |" for d, v in report["domains"].items()]
    lines.append(f"| **average** | {report['average_loss']:.4f} | {report['average_ppl']:.3f} |")
    return "\n".join(lines)


def specialization_stats(counts: dict[str, torch.Tensor], top_k: int) -> dict:
    """From per-domain (L, E) selection counts: frequency (share of tokens selecting each expert), KL of each domain's
    expert distribution from the uniform mixture of domains per layer, and the maximum expert frequency."""
    domains = list(counts)
    stacked = torch.stack([counts[d].double() for d in domains])  # (Dm, L, E)
    dist = stacked / stacked.sum(-1, keepdim=True).clamp_min(1e-12)  # (Dm, L, E), sums to 1 over experts
    freq = dist * top_k  # share of tokens that select each expert
    mixture = dist.mean(0, keepdim=True)  # (1, L, E)
    kl = (dist * (dist.clamp_min(1e-12) / mixture.clamp_min(1e-12)).log()).sum(-1)  # (Dm, L)
    return {
        "domains": domains,
        "specialization_kl": float(kl.mean()),
        "kl_per_layer": kl.mean(0).tolist(),
        "kl_per_domain": dict(zip(domains, kl.mean(1).tolist())),
        "max_expert_frequency": dict(zip(domains, freq.amax(-1).mean(-1).tolist())),
        "max_expert_frequency_per_layer": {d: freq[i].amax(-1).tolist() for i, d in enumerate(domains)},
        "frequency": {d: freq[i].tolist() for i, d in enumerate(domains)},
        "dead_experts": [torch.nonzero(layer == 0).flatten().tolist() for layer in stacked.sum(0)],  # per layer
    }


def specialization_report(routed: dict, top_k: int) -> dict:
    report = specialization_stats({d: r["counts"] for d, r in routed.items()}, top_k)
    report["topk_score_sum"] = {d: r["topk_score_sum"].tolist() for d, r in routed.items()}
    return report


def plot_heatmaps(report: dict, path: Path, title: str = "") -> Path:
    """Selection frequency, one panel per MoE layer: domains × experts (paper Figure 1b); experts that no token of
    any domain selected (dead) have red labels and are counted per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = report["domains"]
    freq = torch.tensor([report["frequency"][d] for d in domains])  # (Dm, L, E)
    layers, experts = freq.shape[1], freq.shape[2]
    fig, axes = plt.subplots(layers, 1, figsize=(max(6, 0.35 * experts + 2), 1.0 + 0.45 * len(domains) * layers))
    axes = [axes] if layers == 1 else list(axes)
    for layer, ax in enumerate(axes):
        image = ax.imshow(freq[:, layer], aspect="auto", cmap="viridis", vmin=0, vmax=float(freq.max()))
        ax.set_yticks(range(len(domains)), domains, fontsize=8)
        ax.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=6)
        dead = set(report.get("dead_experts", [[]] * layers)[layer])
        for tick, expert in zip(ax.get_xticklabels(), range(experts)):
            if expert in dead:  # served no token of any domain: marked in red
                tick.set_color("red")
                tick.set_fontweight("bold")
        ax.set_ylabel(f"layer {layer}" + (f" ({len(dead)} dead)" if dead else ""), fontsize=8)
    axes[-1].set_xlabel("expert")
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of tokens selecting the expert")
    fig.suptitle(title or f"expert selection frequency (specialization KL {report['specialization_kl']:.3f})")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_topk_scores(report: dict, path: Path) -> Path:
    """Mean top-K routing-score sum per layer and domain (paper Figure 4a)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for domain, values in report["topk_score_sum"].items():
        ax.plot(range(len(values)), values, marker="o", label=domain)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("mean top-K score sum")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path
