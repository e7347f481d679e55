"""Benchmarks through EleutherAI's lm-evaluation-harness (`lm_eval`, the `lm-eval` extra) on a trained folder.

Features
- `run_lm_eval(folder, tasks, ...)`: lm-eval's own `simple_evaluate` with its Hugging Face model (`--model hf`) on
  the folder: a QwenMoE-GB checkpoint (its Hub code, `trust_remote_code`) or any transformers MoE trained as it is;
  local task folders through `include_path`. Writes `lm_eval.json` (per-task metrics, n-shot, versions) and returns it.
- `card_results(report)`: the metrics as huggingface_hub `EvalResult`s, which `hub.add_eval_results` puts in the
  folder's model card next to the perplexities.

The command line is lm-eval's as well: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True
--tasks ...` runs on the same folders (tests/test_lm_eval.py checks its log-likelihoods against ours).
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult
from transformers import AutoConfig

SKIPPED_KEYS = ("alias", "name", "sample_len")
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def run_lm_eval(
    folder: str | Path,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` (model `hf`) on `folder`; the report is also written to `folder/lm_eval.json`."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "lm_eval_tasks needs lm-evaluation-harness: pip install -e '.[lm-eval]' (lm_eval >= 0.4.13)"
        ) from error
    folder = Path(folder)
    custom_code = AutoConfig.from_pretrained(folder).model_type == "qwenmoe_gb"  # our Hub code; stock classes: none
    model_args = {"pretrained": str(folder), "trust_remote_code": custom_code}
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device or "cpu",
        task_manager=TaskManager(include_path=include_path) if include_path else None,
    )
    results = output["results"]
    report = {
        "results": {task: {k: v for k, v in m.items() if k not in SKIPPED_KEYS} for task, m in results.items()},
        "n-shot": output.get("n-shot", {}),
        "versions": output.get("versions", {}),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "model_args": model_args,
    }
    (folder / "lm_eval.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def card_results(report: dict) -> list[EvalResult]:
    """One `EvalResult` per task and metric of an lm-eval report (standard errors left out)."""
    results = []
    for task, metrics in report["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = f"{metric} ({task})" if filter_name in ("", "none") else f"{metric} ({task}, {filter_name})"
            results.append(EvalResult(
                task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                metric_name=name, metric_value=round(float(value), 4), source_name="lm-evaluation-harness",
                source_url=LM_EVAL_URL,
            ))  # fmt: skip
    return results


__all__ = ["card_results", "run_lm_eval"]
