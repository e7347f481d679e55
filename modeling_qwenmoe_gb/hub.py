"""Model card and Hub upload for trained QwenMoE-GB checkpoints.

Features
- `write_model_card(folder, ...)`: the checkpoint's README.md from `model_cards/qwenmoe_gb_card.md` through
  huggingface_hub's `ModelCard` / `ModelCardData`: config, balance settings, data, evaluation, specialization plot.
- `write_export_card(folder, ...)`: the card of a stock Qwen-MoE export (`model_cards/stock_export_card.md`): how it
  was trained, how to serve it, what llama.cpp would compute differently.
- `push_folder(folder, repo_id)`: `create_repo` + `upload_folder` of either form: a QwenMoE-GB checkpoint (weights,
  the Hub code files, the card; an `auto_map` saved before it named `AutoModel` is completed first) or a stock export
  (weights, config, tokenizer, card; no code).
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

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


def _template(name: str = "qwenmoe_gb_card.md") -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards", here.parent / "model_cards"):
        if (candidate / name).is_file():
            return candidate / name
    raise FileNotFoundError(f"model_cards/{name} not found")


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def write_model_card(
    folder: str | Path,
    config,
    eval_report: dict | None = None,
    specialization: dict | None = None,
    data_description: str = "",
    repo_id: str | None = None,
) -> ModelCard:
    folder = Path(folder)
    model_name = repo_id or folder.name
    metrics = []
    if eval_report:
        metrics = [
            {"type": "perplexity", "name": f"PPL {d}", "value": round(v["ppl"], 4)}
            for d, v in eval_report["domains"].items()
        ]
        metrics.append({"type": "perplexity", "name": "average PPL", "value": round(eval_report["average_ppl"], 4)})
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["mixture-of-experts", "qwenmoe_gb", "global-batch-load-balancing", "custom_code"],
        model_name=model_name,
        eval_results=None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(_template()),
        model_name=model_name,
        repo_id=repo_id or f"<user>/{folder.name}",
        total_params=_human(config.num_params()),
        active_params=_human(config.num_active_params()),
        balance_scope=config.balance_scope,
        architecture={k: getattr(config, k) for k in ARCHITECTURE_FIELDS},
        balance={k: getattr(config, k) for k in BALANCE_FIELDS},
        data_description=data_description or "not recorded",
        eval_table=format_ppl_table(eval_report) if eval_report else "not evaluated",
        specialization_kl=f"{specialization['specialization_kl']:.4f}" if specialization else "n/a",
        max_frequency=(
            ", ".join(f"{d} {v:.3f}" for d, v in specialization["max_expert_frequency"].items())
            if specialization
            else "n/a"
        ),
    )
    card.data.metrics = metrics or None
    card.save(folder / "README.md")
    return card


def write_export_card(
    folder: str | Path,
    config,
    stock_config,
    llama_cpp_notes: list[str],
    recorded: dict,
    source_name: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """README.md of a stock export: `config` is the QwenMoE-GB config it was trained with, `stock_config` the exported
    one, `recorded` the training run's `eval.json` / `data_info.json` / `specialization.json` where it had them."""
    folder = Path(folder)
    model_name = repo_id or folder.name
    eval_report, data_info = recorded.get("eval.json"), recorded.get("data_info.json")
    spec = recorded.get("specialization.json")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["mixture-of-experts", stock_config.model_type, "qwenmoe_gb", "global-batch-load-balancing"],
        model_name=model_name,
    )
    data = "not recorded"
    if data_info:
        domains = ", ".join(data_info["domains"])
        data = f"`{data_info['data']}` tokenized with `{data_info['tokenizer']}`; domains {domains}"
    card = ModelCard.from_template(
        card_data,
        template_path=str(_template("stock_export_card.md")),
        model_name=model_name,
        repo_id=repo_id or f"<user>/{folder.name}",
        total_params=_human(config.num_params()),
        active_params=_human(config.num_active_params()),
        balance_scope=config.balance_scope,
        architecture_class=stock_config.architectures[0] if stock_config.architectures else stock_config.model_type,
        model_type=stock_config.model_type,
        llama_cpp="llama.cpp: " + "; ".join(llama_cpp_notes) + "." if llama_cpp_notes else "",
        balance={k: getattr(config, k) for k in BALANCE_FIELDS},
        data_description=data + (f" (exported from `{source_name}`)" if source_name else ""),
        eval_table=format_ppl_table(eval_report) if eval_report else "not evaluated",
        specialization=(
            f"Expert specialization I(domain; expert): **{spec['specialization_kl']:.4f}**.\n\n"
            "![expert selection frequency per domain and layer](expert_heatmap.png)"
            if spec
            else ""
        ),
    )
    card.save(folder / "README.md")
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
    required = STOCK_FILES if model_type in ("qwen2_moe", "qwen3_moe") else HUB_FILES
    missing = [f for f in required if not (folder / f).is_file()]
    if missing or not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"folder={str(folder)!r} is neither a saved QwenMoE-GB checkpoint nor a stock export: missing "
            f"{missing or ['*.safetensors']}"
        )
    if required is HUB_FILES and complete_auto_map(folder):
        print(f"{folder}/config.json: auto_map completed with AutoModel (saved by an earlier version)")
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
