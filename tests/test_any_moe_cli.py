"""`qwenmoe-gb pretrain --model_name_or_path` on transformers' own MoE models, trained as they are: the saved folder
keeps its model type and class (it loads with transformers alone), the balance flags reach the trainer, evaluation,
analysis and the card work as for a QwenMoE-GB run; `--convert_to_qwenmoe_gb` keeps the conversion for Qwen-MoE."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_qwenmoe_gb import load_preset
from modeling_qwenmoe_gb.any_moe import find_moe_layers
from modeling_qwenmoe_gb.cli import main, pretrain

from .card_checks import assert_card
from .stock_models import tiny_model
from .test_cli import TINY

ROOT = Path(__file__).resolve().parent.parent
STOCK = [flag for flag in TINY if flag not in ("--config_overrides", '{"num_hidden_layers": 2}')]


def save_tiny(folder, family: str) -> None:
    tiny_model(family, vocab_size=300, max_position_embeddings=256).save_pretrained(folder)  # the byte tokenizer: 259


@pytest.fixture(scope="module")
def deepseek_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    save_tiny(root / "deepseek_v3", "deepseek_v3")
    flags = ["--aux_free", "true", "--aux_free_bias_update_rate", "0.01", "--router_aux_loss_coef", "0.05"]
    result = pretrain([*STOCK, "--model_name_or_path", str(root / "deepseek_v3"), "--output_dir", str(root / "run"),
                       *flags])  # fmt: skip
    return root, result


def test_a_deepseek_v3_trains_as_itself_with_global_balance_and_aux_free(deepseek_run):
    root, result = deepseek_run
    out = root / "run"
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert not (out / "modeling_qwenmoe_gb.py").exists()  # no code: transformers' own class
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert type(trained).__name__ == "DeepseekV3ForCausalLM"
    start = AutoModelForCausalLM.from_pretrained(root / "deepseek_v3")
    for before, after in zip(find_moe_layers(start), find_moe_layers(trained)):
        assert before.bias.abs().sum() == 0 and after.bias.abs().sum() > 0  # updated, saved under its own name
    history = json.loads((out / "log_history.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h][-1]
    assert {"balance/global_lbl", "balance/maxvio_global", "balance/bias_spread", "ce_loss"} <= set(logged)
    for name in ("eval.json", "specialization.json", "expert_heatmap.png", "topk_scores.png", "README.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "eval.json").read_text())
    card = assert_card(out, report)
    assert "deepseek_v3" in card.data.tags and "custom_code" not in card.data.tags
    assert "DeepseekV3ForCausalLM" in card.content and "`aux_free` | True" in card.content
    assert "`router_scoring_func` | sigmoid" in card.content  # read from the model's graph
    spec = result["specialization"]
    for freq in spec["frequency"].values():
        assert torch.tensor(freq, dtype=torch.float64).sum(-1).allclose(torch.tensor(2.0, dtype=torch.float64))


def test_evaluate_and_analyze_a_stock_run(deepseek_run, tmp_path, capsys):
    root, result = deepseek_run
    out = root / "run"
    flags = ["--out", str(tmp_path), "--seq_len", "64", "--eval_max_sequences", "4"]
    main(["evaluate", "--model", str(out), *flags])
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["average_ppl"] == pytest.approx(result["eval"]["average_ppl"], rel=1e-5)
    main(["analyze", "--model", str(out), *flags])
    spec = json.loads((tmp_path / "specialization.json").read_text())
    assert spec["specialization_kl"] == pytest.approx(result["specialization"]["specialization_kl"], rel=1e-5)
    assert "specialization KL" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_other_families_train_through_the_cli(tmp_path, family):
    save_tiny(tmp_path / family, family)
    flags = ["--balance_scope", "micro", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no"]
    pretrain([*STOCK, "--model_name_or_path", str(tmp_path / family), "--output_dir", str(tmp_path / "run"), *flags])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_type"] == family
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())["log_history"]
    assert "balance/micro_lbl" in [h for h in history if "loss" in h][-1]


def test_qwen3_moe_stays_stock_unless_converted(tmp_path):
    save_tiny(tmp_path / "qwen3", "qwen3_moe")
    flags = [*STOCK, "--model_name_or_path", str(tmp_path / "qwen3"), "--max_steps", "2", "--save_strategy", "no"]
    pretrain([*flags, "--output_dir", str(tmp_path / "stock")])
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["model_type"] == "qwen3_moe"
    pretrain([*flags, "--output_dir", str(tmp_path / "ours"), "--convert_to_qwenmoe_gb", "true"])
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "qwenmoe_gb"


def test_flags_that_do_not_apply_to_a_stock_model_are_refused(tmp_path):
    save_tiny(tmp_path / "olmoe", "olmoe")
    flags = [*STOCK, "--model_name_or_path", str(tmp_path / "olmoe"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="aux_free=True is not allowed for OlmoeForCausalLM"):
        pretrain([*flags, "--aux_free", "true"])
    with pytest.raises(ValueError, match="router_scoring_func='sigmoid' applies to QwenMoE-GB models"):
        pretrain([*flags, "--router_scoring_func", "sigmoid"])
    with pytest.raises(ValueError, match="convert_to_qwenmoe_gb=True is not allowed for model_type='olmoe'"):
        pretrain([*flags, "--convert_to_qwenmoe_gb", "true"])
    assert not (tmp_path / "run").exists()


def test_a_stock_architecture_from_scratch(tmp_path):
    """`--model_config` trains transformers' own class from a config at the run's seed (another seed: other weights)."""
    config = str(ROOT / "configuration" / "stock" / "olmoe-byte.json")
    flags = [*STOCK, "--model_config", config, "--config_overrides", '{"num_hidden_layers": 2}', "--max_steps", "2",
             "--save_strategy", "no"]  # fmt: skip
    pretrain([*flags, "--output_dir", str(tmp_path / "a"), "--seed", "0"])
    pretrain([*flags, "--output_dir", str(tmp_path / "b"), "--seed", "1"])
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["model_type"] == "olmoe" and saved["num_hidden_layers"] == 2
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / n) for n in "ab")
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="model_name_or_path and model_config are both given"):
        pretrain([*flags, "--output_dir", str(tmp_path / "c"), "--model_name_or_path", str(tmp_path / "a")])
    load_preset("tiny").save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="a QwenMoE-GB model from scratch is a --preset"):
        pretrain([*flags, "--output_dir", str(tmp_path / "c"), "--model_config", str(tmp_path / "ours")])


def test_quantile_balancing_on_a_stock_deepseek_v3_from_its_config(tmp_path):
    """`pretrain --model_config deepseek-v3-byte.json` without group limits and `--aux_free_method quantile`: the saved
    folder is a stock DeepSeek-V3 whose own bias QB set (centred), with QB's metrics logged and named in the card; with
    the config's group limits QB is refused, naming them, before anything is written."""
    config = str(ROOT / "configuration" / "stock" / "deepseek-v3-byte.json")
    qb = ["--aux_free", "true", "--aux_free_method", "quantile", "--router_aux_loss_coef", "0"]
    flags = [*STOCK, "--model_config", config, "--max_steps", "3", "--save_strategy", "no", *qb]
    out = tmp_path / "run"
    pretrain([*flags, "--config_overrides", '{"num_hidden_layers": 2, "n_group": 1, "topk_group": 1}',
              "--output_dir", str(out)])  # fmt: skip
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert type(trained).__name__ == "DeepseekV3ForCausalLM"
    (layer,) = find_moe_layers(trained)
    assert layer.bias.abs().sum() > 0 and abs(float(layer.bias.sum())) < 1e-5
    logged = [h for h in json.loads((out / "log_history.json").read_text())["log_history"] if "loss" in h][-1]
    assert {"balance/qb_maxvio_after", "balance/qb_bin_width", "balance/bias_spread"} <= set(logged)
    assert "`aux_free_method` | quantile" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match=r"group-limited routing \(n_group=4, topk_group=2\)"):
        pretrain([*flags, "--config_overrides", '{"num_hidden_layers": 2}', "--output_dir", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()
