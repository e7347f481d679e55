"""What every card the project writes must satisfy, read back through huggingface_hub's own parser."""

from pathlib import Path

from huggingface_hub import ModelCard


def assert_card(folder, eval_report=None, base_model=None, relation=None, library_name="transformers") -> ModelCard:
    """The card in `folder` parses (`ModelCard.load`); its `eval_results` are the run's `eval.json` numbers (per
    domain and average, task text-generation, test split), `metrics` a list of metric names, the lineage fields
    `base_model` / `base_model_relation` as given (absent when None)."""
    card = ModelCard.load(Path(folder) / "README.md")
    data = card.data
    if eval_report is not None:
        assert data.metrics == ["perplexity"]
        got = {r.metric_name: r.metric_value for r in data.eval_results}
        expected = {f"perplexity ({d})": round(v["ppl"], 4) for d, v in eval_report["domains"].items()}
        expected["average perplexity"] = round(eval_report["average_ppl"], 4)
        assert got == expected, (got, expected)
        assert {(r.task_type, r.dataset_split, r.metric_type) for r in data.eval_results} == {
            ("text-generation", "test", "perplexity")
        }
        assert "model-index" in card.content  # what the Hub reads evaluation results from
    else:
        assert data.eval_results is None and data.metrics is None
    assert data.get("base_model") == base_model, data.get("base_model")
    assert data.get("base_model_relation") == relation, data.get("base_model_relation")
    assert data.library_name == library_name and data.license == "apache-2.0"
    assert isinstance(data.tags, list) and "mixture-of-experts" in data.tags
    return card
