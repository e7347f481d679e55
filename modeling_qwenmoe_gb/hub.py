"""Model cards and Hub upload for QwenMoE-GB checkpoints, stock exports and LoRA adapters.

Features
- `write_model_card(folder, config, ...)`: every card the project writes (pretrain and compare runs, stock exports,
  SFT and LoRA adapters) goes through it: a template of `model_cards/` rendered through huggingface_hub's `ModelCard`,
  metadata from `card_metadata`.
- `card_metadata(...)`: huggingface_hub's own types: per-domain and average held-out perplexity as `EvalResult`s
  (written as `model-index`: task text-generation, the dataset as the run knew it), `metrics` as metric names,
  `datasets` for Hub data, `base_model` + `base_model_relation` (lineage: the model tree), tags, license.
- `hub_model_id(name_or_path)`: the Hub repo a model came from (a Hub name, or a snapshot in the HF cache).
- `push_folder(folder, repo_id)`: `create_repo` + `upload_folder` of either form: a QwenMoE-GB checkpoint (weights,
  the Hub code files, the card; an `auto_map` saved before it named `AutoModel` is completed first) or a stock export
  (weights, config, tokenizer, card; no code). The card's placeholder repo id becomes `repo_id`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .analysis import format_ppl_table

BALANCE_FIELDS = (
    "balance_scope",
    "router_aux_loss_coef",
    "micro_balance_coef",
    "balance_group_size",
    "device_balance_groups",
    "device_balance_coef",
    "router_z_loss_coef",
    "aux_free",
    "aux_free_bias_update_rate",
    "aux_free_method",
    "quantile_scope",
    "quantile_bins",
    "quantile_ema",
    "router_scoring_func",
)
ARCHITECTURE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)
BASE_MODEL_RELATIONS = ("finetune", "adapter", "merge", "quantized")  # the Hub's model-tree relations
SYNTHETIC = ("qwenmoe-gb-synthetic", "QwenMoE-GB synthetic corpus")  # dataset type and name of the embedded corpus
TAGS = ["mixture-of-experts", "qwenmoe_gb", "global-batch-load-balancing"]
HUB_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _template(name: str = "qwenmoe_gb_card.md") -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards", here.parent / "model_cards"):
        if (candidate / name).is_file():
            return candidate / name
    raise FileNotFoundError(f"model_cards/{name} not found")


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def hub_model_id(name_or_path: str | None) -> str | None:
    """The Hub repo id a model was loaded from: `name_or_path` itself when it is a Hub name (not a local folder), the
    repo of a snapshot folder in the HF cache, else None (a local checkpoint has no place in the Hub's model tree)."""
    if not name_or_path:
        return None
    if match := HUB_CACHE_SNAPSHOT.search(str(name_or_path)):
        return f"{match[1]}/{match[2]}"
    name = str(name_or_path)
    if Path(name).exists() or name.startswith((".", "/")) or not HUB_ID.match(name):
        return None
    return name


def dataset_sources(data: str | None, domains: list[str]) -> tuple[dict[str, tuple[str, str, str | None]], list[str]]:
    """How the run knew its data, per domain (dataset type, dataset name, config), and the Hub datasets among them.
    `data` as `qwenmoe-gb pretrain --data` takes it: `synthetic`, `hub:org/name` (domains from a column: config =
    domain), `hub:code=org/a,math=org/b` (a dataset per domain), or a local folder (one sub-folder per domain)."""
    if data is None or data == "synthetic":
        return {d: (*SYNTHETIC, d) for d in domains}, []
    if data.startswith("hub:"):
        specs = [n for n in data[4:].split(",") if n]
        named = {spec.rpartition("=")[0] or spec.rstrip("/").split("/")[-1]: spec.rpartition("=")[2] for spec in specs}
        hub_ids = list(dict.fromkeys(named.values()))
        if len(hub_ids) == 1:  # one dataset; its domains are configurations of it
            return {d: (hub_ids[0], hub_ids[0], d) for d in domains}, hub_ids
        return {d: (named[d], named[d], None) if d in named else (data, data, d) for d in domains}, hub_ids
    folder = Path(data).name or str(data)
    return {d: (f"local:{folder}", folder, d) for d in domains}, []


def eval_results(eval_report: dict, data: str | None = None) -> list[EvalResult]:
    """Held-out perplexity (the test split of each domain) as `EvalResult`s: one per domain and the average."""
    domains = list(eval_report["domains"])
    sources, _ = dataset_sources(data, domains)
    results = []
    for domain, values in eval_report["domains"].items():
        dataset_type, dataset_name, config = sources[domain]
        results.append(EvalResult(
            task_type="text-generation", dataset_type=dataset_type, dataset_name=dataset_name, dataset_config=config,
            dataset_split="test", metric_type="perplexity", metric_name=f"perplexity ({domain})",
            metric_value=round(float(values["ppl"]), 4),
        ))  # fmt: skip
    names = sorted({sources[d][1] for d in domains})
    whole = (sources[domains[0]][0], names[0]) if len(names) == 1 else ("mixture", ", ".join(names))
    average = round(float(eval_report["average_ppl"]), 4)
    results.append(EvalResult(
        task_type="text-generation", dataset_type=whole[0], dataset_name=whole[1], dataset_split="test",
        metric_type="perplexity", metric_name="average perplexity", metric_value=average,
    ))  # fmt: skip
    return results


def card_metadata(
    model_name: str,
    eval_report: dict | None = None,
    data: str | None = None,
    base_model: str | None = None,
    base_model_relation: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    library_name: str = "transformers",
    family_tag: str = "qwenmoe_gb",
) -> ModelCardData:
    """The card's metadata in huggingface_hub's types (see the module docstring). `family_tag`: the model family's
    tag (`qwenmoe_gb`, or the model type of a transformers MoE trained as it is)."""
    if base_model_relation is not None and base_model_relation not in BASE_MODEL_RELATIONS:
        raise ValueError(
            f"base_model_relation={base_model_relation!r} is unknown: allowed {list(BASE_MODEL_RELATIONS)}"
        )
    results = eval_results(eval_report, data) if eval_report else None
    _, hub_datasets = dataset_sources(data, list(eval_report["domains"]) if eval_report else [])
    lineage = {"base_model": base_model, "base_model_relation": base_model_relation} if base_model else {}
    return ModelCardData(
        library_name=library_name,
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=list(dict.fromkeys([*(family_tag if t == "qwenmoe_gb" else t for t in TAGS), *tags])),
        model_name=model_name,
        datasets=hub_datasets or None,
        metrics=["perplexity"] if results else None,
        eval_results=results,
        **lineage,
    )


def write_model_card(
    folder: str | Path,
    config,
    eval_report: dict | None = None,
    specialization: dict | None = None,
    data_description: str = "",
    repo_id: str | None = None,
    *,
    data: str | None = None,
    base_model: str | None = None,
    base_model_relation: str | None = None,
    source: str | None = None,
    origin: str | None = None,
    template: str = "qwenmoe_gb_card.md",
    tags: list[str] | tuple[str, ...] = (),
    library_name: str = "transformers",
    balance_config=None,
    model=None,
    **fields,
) -> ModelCard:
    """`folder`/README.md from `model_cards/<template>`: `config` (the QwenMoE-GB config it was trained with), the
    run's `eval_report` (`eval.json`) and `specialization`, its `data` (as `--data` took it) and description, and its
    lineage: `base_model` (a Hub repo id) and `base_model_relation`, or `source` (a local checkpoint, text only);
    `origin` replaces the lineage sentence (e.g. how the model was upcycled).
    `fields` go to the template. A transformers MoE trained as it is (not a QwenMoE-GB config) takes the
    `any_moe_card.md` template: `balance_config` is the balancer's `BalanceConfig` and `model` the trained model (its
    parameters are counted). Returns the card."""
    folder = Path(folder)
    model_name = repo_id or folder.name
    balance_config = balance_config or config
    own = hasattr(config, "num_params")  # a QwenMoE-GB config; else a transformers MoE trained as it is
    if not own:  # e.g. the adapter card of a transformers MoE
        fields.setdefault("base_description", f"a {type(model).__name__ if model is not None else config.model_type}")
        fields.setdefault("remote_code", "")
    if not own and template == "qwenmoe_gb_card.md":
        template = "any_moe_card.md"
        fields.setdefault("architecture_class", type(model).__name__ if model is not None else config.model_type)
        fields.setdefault("model_type", config.model_type)
        fields.setdefault("aux_free", balance_config.aux_free)
    if template == "qwenmoe_gb_card.md":  # the repository carries its code: loads with trust_remote_code
        tags = [*tags, "custom_code"]
    total, active = (config.num_params(), config.num_active_params()) if own else _counted(model, balance_config)
    architecture = {k: getattr(config, k) for k in ARCHITECTURE_FIELDS if hasattr(config, k)}
    if not own:
        architecture.update(
            num_experts=balance_config.num_experts, num_experts_per_tok=balance_config.num_experts_per_tok
        )
    metadata = card_metadata(model_name, eval_report, data, base_model, base_model_relation, tags, library_name,
                             family_tag="qwenmoe_gb" if own else config.model_type)  # fmt: skip
    card = ModelCard.from_template(
        metadata,
        template_path=str(_template(template)),
        model_name=model_name,
        repo_id=repo_id or f"<user>/{folder.name}",
        total_params=_human(total),
        active_params=_human(active),
        balance_scope=balance_config.balance_scope,
        architecture=architecture,
        balance={k: getattr(balance_config, k) for k in BALANCE_FIELDS if hasattr(balance_config, k)},
        data_description=data_description or "not recorded",
        eval_table=format_ppl_table(eval_report) if eval_report else "not evaluated",
        specialization_kl=f"{specialization['specialization_kl']:.4f}" if specialization else None,
        max_frequency=(
            ", ".join(f"{d} {v:.3f}" for d, v in specialization["max_expert_frequency"].items())
            if specialization
            else None
        ),
        lineage=origin or _lineage(base_model, base_model_relation, source),
        **fields,
    )
    card.save(folder / "README.md")
    return card


def _counted(model, balance_config) -> tuple[int, int]:
    """(total, active) parameters of a transformers MoE: an active token uses K of the E routed experts."""
    if model is None:
        return 0, 0
    from .any_moe import find_moe_layers

    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for layer in find_moe_layers(model) for p in layer.experts.parameters())
    k, e = balance_config.num_experts_per_tok, balance_config.num_experts
    return total, total - routed + routed * k // e


def _lineage(base_model: str | None, relation: str | None, source: str | None) -> str:
    if base_model:
        how = {"adapter": "A LoRA adapter of", "merge": "Merged from", "quantized": "Quantized from"}
        return f"{how.get(relation, 'Fine-tuned from')} [{base_model}](https://huggingface.co/{base_model})."
    return f"Trained from the local checkpoint `{source}`." if source else ""


def add_eval_results(folder: str | Path, results: list[EvalResult]) -> ModelCard | None:
    """Put `results` in the folder's model card (`model-index`), replacing results of the same metric name; None
    when the folder has no card."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    names = {r.metric_name for r in results}
    kept = [r for r in card.data.eval_results or [] if r.metric_name not in names]
    card.data.eval_results = kept + list(results)
    card.data.model_name = card.data.model_name or Path(folder).name
    if card.data.metrics is not None or results:
        card.data.metrics = sorted({*(card.data.metrics or []), *(r.metric_type for r in results)})
    card.save(path)
    return card


HUB_FILES = ("config.json", "configuration_qwenmoe_gb.py", "modeling_qwenmoe_gb.py", "README.md")
STOCK_FILES = ("config.json", "README.md")


def complete_auto_map(folder: str | Path) -> bool:
    """Add the `AutoModel` entry (the base model, which serving engines' Transformers backends build) to the
    `auto_map` of a QwenMoE-GB checkpoint saved before it was written; True if the file changed."""
    from .modeling_qwenmoe_gb import hub_auto_map

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    auto_map = config.get("auto_map") or {}
    if config.get("model_type") != "qwenmoe_gb" or all(k in auto_map for k in hub_auto_map()):
        return False
    config["auto_map"] = {**hub_auto_map(), **auto_map}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def push_folder(
    folder: str | Path, repo_id: str, private: bool = False, token: str | None = None, api: HfApi | None = None
) -> str:
    """Upload a saved checkpoint folder (weights, code, card) to the Hub; returns the commit URL."""
    folder = Path(folder)
    model_type = (read_json(folder / "config.json") or {}).get("model_type")
    required = HUB_FILES if model_type == "qwenmoe_gb" else STOCK_FILES  # else: transformers' own class
    missing = [f for f in required if not (folder / f).is_file()]
    if missing or not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"folder={str(folder)!r} is neither a saved QwenMoE-GB checkpoint nor a stock export: missing "
            f"{missing or ['*.safetensors']}"
        )
    if required is HUB_FILES and complete_auto_map(folder):
        print(f"{folder}/config.json: auto_map completed with AutoModel (saved by an earlier version)")
    card = folder / "README.md"
    card.write_text(card.read_text().replace(f"<user>/{folder.name}", repo_id))  # the card names its repository
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload QwenMoE-GB checkpoint",
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.pt", "*.bin", "optimizer*", "rng_state*"],
    )
    return str(getattr(commit, "commit_url", commit))


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
