"""Expert pruning from routing statistics: `qwenmoe-gb prune`.

Features
- `prune_sites(model)`: the MoE layers of a QwenMoE-GB model or of any transformers MoE the balancer reads
  (`any_moe.find_moe_layers`): the block's qualified name and its experts module.
- `calibrate(model, sequences)`: one pass per domain over calibration sequences, with a hook on each layer's experts
  (called as `experts(hidden_states, top_k_index, top_k_weights)` by every family): per layer and expert, float64,
  - `counts`: top-k selections (`frequency`, what the balancer counts);
  - `gate_sum`: Σ of the gate weights the expert's output is multiplied by;
  - `reap_sum`: Σ of gate weight × ‖f_j(x)‖₂ (REAP, Cerebras 2025), f_j(x) the expert's own output computed by the
    model's experts module (its implementation, its activation, its biases) for the selected tokens.
  `reap` = reap_sum / counts (the mean over the tokens routed to the expert), as llm-compressor's REAPPruningModifier.
- `choose_experts(scores, keep, n_group)`: the `keep` highest-scoring experts of every layer (the same number in each
  of `n_group` expert groups for group-limited routers, so the groups stay contiguous blocks), in index order.
- `pruned_model(model, kept)`: a new model of the same class with the experts' fused tensors, the router rows (and
  router bias), the aux-free bias entries and every other per-expert tensor of the block cut to the kept experts, and
  the expert count set in the config: a stock transformers model stays stock (it loads with its own class, no code).
  Every tensor of the new model is checked against the shape its class expects (strict load); the one dimension
  that changes must be the experts' (the first for fused experts and routers, the last for ERNIE's (1, E) bias).
- `prune(argv)`: the command: calibrate on the chosen domains (train split, prepared or raw data as `pretrain --data`
  takes it), prune, save, write `pruning.json` (scores, kept experts per layer) and `pruning_scores.png`, evaluate the
  pruned and the unpruned model on the held-out split and write a model card (base model, method, calibration, kept
  experts, perplexity retained per domain). Bad input is refused before anything is written.

Exactness: on tokens whose routing never selects a dropped expert, the pruned model computes what the original does,
for routers whose gate weights do not depend on the dropped experts' scores: top-k then softmax (Mixtral, GPT-OSS),
softmax renormalised over the top-k (`norm_topk_prob=True`: Qwen3-MoE as released, QwenMoE-GB presets), sigmoid
scores (DeepSeek-V3, GLM-4.5; group scores are sums within a group, so a token's groups must not involve a dropped
expert either). A softmax over all experts kept unnormalised (`norm_topk_prob=False`: OLMoE, Qwen2-MoE) loses the
dropped experts' share of the denominator: the kept experts' gate weights grow by that share (as in REAP).

Shape legend: T tokens, K top-k, E experts, L MoE layers, H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

SCORES = ("reap", "frequency", "gate_sum")  # `--score`
EXPERT_COUNT_FIELDS = ("num_experts", "n_routed_experts", "num_local_experts")  # per family, in its config
PRUNING_FILE = "pruning.json"


# --------------------------------------------------------------------------------------------- the MoE layers


@dataclass
class PruneSite:
    """One MoE layer: where pruning cuts."""

    block: str  # qualified name of the MoE block in the model (its per-expert tensors live under it)
    experts: nn.Module  # called as experts(hidden_states, top_k_index, top_k_weights)
    num_experts: int


def prune_sites(model: nn.Module) -> list[PruneSite]:
    """The MoE layers of a QwenMoE-GB model or of any transformers MoE `any_moe` reads; `ValueError` naming the model's
    class otherwise."""
    from .any_moe import experts_and_top_k, find_moe_layers
    from .modeling_qwenmoe_gb import QwenMoeGBSparseMoeBlock

    own = [(n, m) for n, m in model.named_modules() if isinstance(m, QwenMoeGBSparseMoeBlock)]
    if own:
        return [PruneSite(n, m.experts, m.gate.num_experts) for n, m in own]
    try:
        layers = find_moe_layers(model)
    except ValueError as error:
        raise ValueError(f"model={type(model).__name__}: its MoE layers cannot be read for pruning: {error}") from None
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [names[id(layer.experts)].rpartition(".")[0] for layer in layers]  # the experts' parent
    return [PruneSite(b, layer.experts, experts_and_top_k(layer, model.config)[0]) for b, layer in zip(blocks, layers)]


# --------------------------------------------------------------------------------------------- calibration


class _Recorder:
    """Forward pre-hooks on each site's experts that add one forward's statistics to (L, E) float64 sums."""

    def __init__(self, sites: list[PruneSite]):
        self.sites = sites
        width = max(s.num_experts for s in sites)
        self.sums = {k: torch.zeros(len(sites), width, dtype=torch.float64) for k in ("counts", "gate_sum", "reap_sum")}
        self._inside = False  # the hook calls the experts module itself: its own pre-hook must not record that
        self._handles = [
            s.experts.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, s in enumerate(sites)
        ]

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._inside:
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)  # (T, H)
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)  # (T, K)
            weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)  # (T, K)
            flat = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
            self._inside = True
            try:
                self._add(layer, module, flat, index.reshape(len(flat), -1), weights.reshape(len(flat), -1))
            finally:
                self._inside = False

        return hook

    def _add(self, layer: int, experts: nn.Module, hidden, index, weights) -> None:
        num_experts = self.sites[layer].num_experts
        for k in range(index.shape[1]):
            chosen, gate = index[:, k], weights[:, k]  # (T,), (T,)
            real = chosen < num_experts  # a dropped selection (capacity) carries the sentinel E
            one = torch.ones_like(weights[:, k : k + 1])  # (T, 1): the expert's own output, unweighted
            out = experts(hidden, index[:, k : k + 1], one)  # (T, H) = f_chosen(x)
            norms = out.double().norm(dim=-1)  # (T,)
            chosen, gate, norms = chosen[real].cpu(), gate[real].double().cpu(), norms[real].cpu()
            self.sums["counts"][layer].index_add_(0, chosen, torch.ones_like(gate))
            self.sums["gate_sum"][layer].index_add_(0, chosen, gate)
            self.sums["reap_sum"][layer].index_add_(0, chosen, gate * norms)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def calibrate(model: nn.Module, sequences: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, dict]:
    """{domain: {"counts", "gate_sum", "reap_sum": (L, E) float64, "tokens": int}} over each domain's (N, S)
    calibration sequences (every token real)."""
    sites = prune_sites(model)
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for domain, seqs in sequences.items():
        recorder = _Recorder(sites)
        try:
            for start in range(0, len(seqs), batch_size):
                model(input_ids=seqs[start : start + batch_size].to(device), use_cache=False)
        finally:
            recorder.remove()
        out[domain] = {**recorder.sums, "tokens": int(seqs.numel())}
    return out


def scores_of(stats: dict, score: str) -> torch.Tensor:
    """(L, E) float64 scores of pooled statistics: `frequency` = counts, `gate_sum`, `reap` = reap_sum / counts (0
    for an expert no token chose)."""
    if score not in SCORES:
        raise ValueError(f"score={score!r} is unknown: allowed {list(SCORES)}")
    if score == "frequency":
        return stats["counts"].clone()
    if score == "gate_sum":
        return stats["gate_sum"].clone()
    return stats["reap_sum"] / stats["counts"].clamp(min=1.0)


def pool(stats: dict[str, dict], domains: list[str]) -> dict:
    """The statistics of several domains together (sums add)."""
    keys = ("counts", "gate_sum", "reap_sum")
    pooled = {k: sum(stats[d][k] for d in domains) for k in keys}
    pooled["tokens"] = sum(stats[d]["tokens"] for d in domains)
    return pooled


# --------------------------------------------------------------------------------------------- choosing and cutting


def choose_experts(scores: torch.Tensor, keep: int, n_group: int = 1) -> list[list[int]]:
    """Per layer, the indices (ascending) of the `keep` highest-scoring experts of (L, E) `scores`; with `n_group`
    > 1, `keep / n_group` in each contiguous group. Ties go to the lower index."""
    layers, num_experts = scores.shape
    per_group, size = keep // n_group, num_experts // n_group
    kept = []
    for row in scores:
        chosen = []
        for g in range(n_group):
            part = row[g * size : (g + 1) * size]
            order = sorted(range(size), key=lambda i: (-float(part[i]), i))  # highest first, lower index on ties
            chosen += [g * size + i for i in order[:per_group]]
        kept.append(sorted(chosen))
    return kept


def check_keep(model: nn.Module, keep: int) -> None:
    """`ValueError` naming the field when `keep` experts per layer cannot be kept in this model."""
    config = model.config
    num_experts = prune_sites(model)[0].num_experts
    top_k = getattr(config, "num_experts_per_tok", None)
    if not 1 <= keep <= num_experts:
        raise ValueError(f"keep_experts={keep} is not allowed: the model has num_experts={num_experts}; allowed "
                         f"{top_k or 1}..{num_experts}")  # fmt: skip
    if isinstance(top_k, int) and keep < top_k:
        raise ValueError(
            f"keep_experts={keep} is fewer than num_experts_per_tok={top_k}: every token selects {top_k} experts; "
            f"allowed {top_k}..{num_experts}"
        )
    n_group = routing_groups(config)
    if n_group > 1:
        topk_group = getattr(config, "topk_group", None) or n_group
        if keep % n_group:
            raise ValueError(
                f"keep_experts={keep} is not a multiple of n_group={n_group}: group-limited routing needs the same "
                f"number of experts in every group; allowed multiples of {n_group}"
            )
        if isinstance(top_k, int) and topk_group * (keep // n_group) < top_k:
            raise ValueError(
                f"keep_experts={keep} leaves {keep // n_group} experts in each of the topk_group={topk_group} groups a "
                f"token may use, fewer than num_experts_per_tok={top_k}"
            )
    groups = getattr(config, "device_balance_groups", None)
    if isinstance(groups, list):
        raise ValueError(
            f"device_balance_groups={groups} (an explicit expert partition) cannot follow the pruned experts: set it "
            "to a number of groups or None in the model's config first"
        )
    if isinstance(groups, int) and keep % groups:
        raise ValueError(f"keep_experts={keep} is not a multiple of device_balance_groups={groups}")


def routing_groups(config) -> int:
    n_group = getattr(config, "n_group", None) or 1
    return n_group if n_group > 1 else 1


def pruned_config(config, keep: int):
    """A copy of `config` with `keep` experts (every expert-count field the config has)."""
    new = config.__class__.from_dict(config.to_dict())
    for name in EXPERT_COUNT_FIELDS:
        if isinstance(getattr(new, name, None), int):
            setattr(new, name, keep)
    return new


def pruned_model(model: nn.Module, kept: list[list[int]]) -> nn.Module:
    """A new model of `model`'s class with only the `kept` experts of each MoE layer (see the module docstring)."""
    sites = prune_sites(model)
    if len(kept) != len(sites):
        raise ValueError(f"kept has {len(kept)} layers; the model has {len(sites)} MoE layers")
    keep = {len(k) for k in kept}
    if len(keep) != 1:
        raise ValueError(f"kept experts per layer {sorted(keep)}: the model's class takes one expert count")
    (count,) = keep
    check_keep(model, count)
    config = pruned_config(model.config, count)
    dtype = next(model.parameters()).dtype
    new = type(model)(config).to(dtype)
    expected = new.state_dict()
    state = {}
    for key, tensor in model.state_dict().items():
        if key not in expected:
            raise ValueError(f"{type(model).__name__}: {key} has no place in the pruned model")
        want = expected[key].shape
        if want == tensor.shape:
            state[key] = tensor
            continue
        site = max((i for i, s in enumerate(sites) if key.startswith(s.block + ".")), default=None,
                   key=lambda i: len(sites[i].block))  # fmt: skip
        dims = [d for d in range(tensor.ndim) if tensor.shape[d] != want[d]] if tensor.ndim == len(want) else []
        if site is None or len(dims) != 1 or (tensor.shape[dims[0]], want[dims[0]]) != (sites[site].num_experts, count):
            raise ValueError(
                f"{type(model).__name__}: {key} {tuple(tensor.shape)} becomes {tuple(want)} in the pruned model, "
                "which is not a cut of its experts dimension"
            )
        state[key] = tensor.index_select(dims[0], torch.tensor(kept[site])).contiguous()  # the experts' dimension
    new.load_state_dict(state, strict=True)
    new.generation_config = model.generation_config
    return new.eval()


# --------------------------------------------------------------------------------------------- the command


@dataclass
class PruneArguments:
    keep_experts: int | None = field(default=None, metadata={"help": "experts kept in every MoE layer"})
    keep_fraction: float | None = field(default=None, metadata={"help": "share of experts kept, in (0, 1]"})
    score: str = field(default="reap", metadata={"help": "expert score", "choices": list(SCORES)})
    domains: str | None = field(default=None, metadata={"help": "calibration domains d1,d2 (default: all)"})
    calibration_sequences: int = field(default=128, metadata={"help": "calibration sequences per domain (train)"})
    output_dir: str = field(default="", metadata={"help": "the pruned model's folder (new)"})
    evaluate: bool = field(default=True, metadata={"help": "held-out PPL of the original and the pruned model"})
    base_model: str | None = field(
        default=None, metadata={"help": "Hub repo id of the unpruned model for the card (default: from --model)"}
    )


def keep_count(num_experts: int, keep_experts: int | None, keep_fraction: float | None) -> int:
    """Experts kept per layer from exactly one of `keep_experts` / `keep_fraction` (rounded to nearest)."""
    if (keep_experts is None) == (keep_fraction is None):
        raise ValueError("give exactly one of keep_experts / keep_fraction")
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction={keep_fraction} is not allowed: allowed (0, 1]")
        return max(1, round(num_experts * keep_fraction))
    return keep_experts


def calibration_sequences(train, domains: list[str], count: int) -> dict[str, torch.Tensor]:
    """(N, S) training sequences of each domain; `ValueError` naming a domain with none."""
    out = {}
    for domain in domains:
        seqs = train.sequences(domain, count) if domain in train.domains else None
        if seqs is None or len(seqs) == 0:
            raise ValueError(
                f"domains: {domain!r} has no calibration sequence of seq_len={train.seq_len} tokens in the training "
                "split; allowed domains with data"
            )
        out[domain] = seqs
    return out


def parse_domains(spec: str | None, available: list[str]) -> list[str]:
    domains = [d for d in (spec or "").split(",") if d] or list(available)
    unknown = [d for d in domains if d not in available]
    if unknown:
        raise ValueError(f"domains={spec!r}: unknown {unknown}; allowed {available}")
    return domains


def prune(argv: list[str]) -> dict:
    """`qwenmoe-gb prune --model DIR --data D (--keep_experts N | --keep_fraction F) [--score S] --output_dir OUT`."""
    from . import analysis
    from .cli import command_parser
    from .hub import hub_model_id
    from .pretraining import load_trained, use_recorded_data

    path_args, data_args, args = command_parser("prune").parse_args_into_dataclasses(args=argv)
    if not args.output_dir:
        raise ValueError("output_dir='' is not allowed: give --output_dir DIR (a new folder)")
    out = Path(args.output_dir)
    if out.resolve() == Path(path_args.model).resolve() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise ValueError(f"output_dir={args.output_dir!r} exists and is not empty (or is the model): give a new folder")
    use_recorded_data(path_args.model, data_args, argv)
    model = load_trained(path_args.model)
    sites = prune_sites(model)  # refuses a model whose MoE layers cannot be read, naming it
    keep = keep_count(sites[0].num_experts, args.keep_experts, args.keep_fraction)
    check_keep(model, keep)
    opened = data_args.open()
    opened.check_vocab(model.config.vocab_size, data_args.data_cache)
    train = opened.domains("train", data_args.seq_len)
    domains = parse_domains(args.domains, train.domains)
    seqs = calibration_sequences(train, domains, args.calibration_sequences)
    stats = calibrate(model, seqs, data_args.eval_batch_size)
    pooled = pool(stats, domains)
    scores = scores_of(pooled, args.score)
    kept = choose_experts(scores, keep, routing_groups(model.config))
    new = pruned_model(model, kept)
    out.mkdir(parents=True, exist_ok=True)
    new.save_pretrained(out)
    _copy_tokenizer(path_args.model, out)
    report = {
        "base_model": args.base_model or hub_model_id(path_args.model) or str(path_args.model),
        "score": args.score, "domains": domains,
        "calibration_tokens": {d: stats[d]["tokens"] for d in domains}, "keep_experts": keep,
        "num_experts": sites[0].num_experts, "layers": [s.block for s in sites], "kept": kept,
        "scores": scores.tolist(), "counts": pooled["counts"].tolist(),
    }  # fmt: skip
    if args.evaluate:
        test = opened.domains("test", data_args.seq_len)
        before = analysis.perplexity_report(analysis.route_domains(model, test, data_args.eval_batch_size,
                                                                   data_args.eval_max_sequences))  # fmt: skip
        after = analysis.perplexity_report(analysis.route_domains(new, test, data_args.eval_batch_size,
                                                                  data_args.eval_max_sequences))  # fmt: skip
        report["eval"] = {"original": before, "pruned": after}
    analysis.write_json(report, out / PRUNING_FILE)
    plot_scores(scores, kept, out / "pruning_scores.png", f"{args.score} scores, kept {keep}/{sites[0].num_experts}")
    write_pruned_card(out, new, report, data_args.data)
    print(f"pruned {path_args.model} to {keep}/{sites[0].num_experts} experts per layer ({args.score}, calibrated on "
          f"{', '.join(domains)}) → {out}")  # fmt: skip
    return report


def _copy_tokenizer(source: str, out: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "data_info.json"):
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, out / name)


def plot_scores(scores: torch.Tensor, kept: list[list[int]], path: Path, title: str) -> Path:
    """Heatmap of the (L, E) scores (each layer scaled to its maximum), kept experts outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaled = scores / scores.max(dim=1, keepdim=True).values.clamp(min=1e-30)  # (L, E)
    fig, ax = plt.subplots(figsize=(max(4, scores.shape[1] * 0.3), max(2, scores.shape[0] * 0.4)))
    ax.imshow(scaled.numpy(), aspect="auto", cmap="viridis")
    for layer, experts in enumerate(kept):
        for e in experts:
            ax.add_patch(plt.Rectangle((e - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="white", lw=1))
    ax.set_xlabel("expert (outlined: kept)")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_pruned_card(folder: Path, model: nn.Module, report: dict, data: str | None):
    """The pruned model's card: base model (relation `quantized`, the Hub's closest to a compression of the same
    model), method, calibration, kept experts, and the held-out perplexity of the pruned model as eval results."""
    from huggingface_hub import ModelCard

    from .hub import _template, card_metadata

    evals = report.get("eval")
    base = report["base_model"]
    hub_id = None if Path(base).exists() else base
    metadata = card_metadata(folder.name, evals["pruned"] if evals else None, data, hub_id,
                             "quantized" if hub_id else None, ["expert-pruning", report["score"]],
                             family_tag=model.config.model_type)  # fmt: skip
    retained = ""
    if evals:
        rows = [
            f"| {d} | {evals['original']['domains'][d]['ppl']:.3f} | {v['ppl']:.3f} | "
            f"{evals['original']['domains'][d]['ppl'] / v['ppl']:.3f} |"
            for d, v in evals["pruned"]["domains"].items()
        ]
        header = ["| domain | PPL before | PPL after | retained (before / after) |", "|---|---|---|---|"]
        retained = "\n".join([*header, *rows])
    card = ModelCard.from_template(
        metadata, template_path=str(_template("pruned_card.md")), model_name=folder.name, base_model=base,
        hub_base=hub_id, architecture_class=type(model).__name__, score=report["score"],
        domains=", ".join(report["domains"]),
        tokens=", ".join(f"{d} {n:,}" for d, n in report["calibration_tokens"].items()),
        keep=report["keep_experts"], num_experts=report["num_experts"],
        kept_rows="\n".join(f"| {n} | {k} |" for n, k in zip(report["layers"], report["kept"])),
        retained=retained or "not evaluated",
    )  # fmt: skip
    card.save(folder / "README.md")
    return card


__all__ = [
    "SCORES",
    "PruneSite",
    "calibrate",
    "check_keep",
    "choose_experts",
    "keep_count",
    "pool",
    "prune",
    "prune_sites",
    "pruned_config",
    "pruned_model",
    "scores_of",
]
