"""Model card and Hub upload for trained QwenMoE-GB checkpoints.

Features
- `write_model_card(folder, ...)`: the checkpoint's README.md from `model_cards/qwenmoe_gb_card.md` through
  huggingface_hub's `ModelCard` / `ModelCardData`: config, balance settings, data, evaluation, specialization plot.
- `push_folder(folder, repo_id)`: `create_repo` + `upload_folder` of the weights, the Hub code files and the card.
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


def _template() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards", here.parent / "model_cards"):
        if (candidate / "qwenmoe_gb_card.md").is_file():
            return candidate / "qwenmoe_gb_card.md"
    raise FileNotFoundError("model_cards/qwenmoe_gb_card.md not found")


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


HUB_FILES = ("config.json", "configuration_qwenmoe_gb.py", "modeling_qwenmoe_gb.py", "README.md")


def push_folder(
    folder: str | Path, repo_id: str, private: bool = False, token: str | None = None, api: HfApi | None = None
) -> str:
    """Upload a saved checkpoint folder (weights, code, card) to the Hub; returns the commit URL."""
    folder = Path(folder)
    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    if missing or not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"folder={str(folder)!r} is not a saved QwenMoE-GB checkpoint: missing {missing or ['*.safetensors']}"
        )
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
