"""The main job end to end at a tiny size: pretrain -> evaluate -> analyze, model card, push, resume."""

import json
from unittest import mock

import pytest
import torch

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.cli import main, pretrain
from modeling_qwenmoe_gb.hub import push_folder

from .card_checks import assert_card

TINY = [
    "--max_steps", "6",
    "--warmup_steps", "0",
    "--synthetic_docs", "40",
    "--per_device_train_batch_size", "2",
    "--gradient_accumulation_steps", "2",
    "--seq_len", "64",
    "--eval_max_sequences", "4",
    "--logging_steps", "3",
    "--save_steps", "3",
    "--disable_tqdm", "true",
    "--use_cpu", "true",
    "--config_overrides", '{"num_hidden_layers": 2}',
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    result = pretrain([*TINY, "--output_dir", str(out), "--aux_free", "true"])
    return out, result


def test_pretrain_writes_model_eval_analysis_and_card(run_dir):
    out, result = run_dir
    for name in ("model.safetensors", "config.json", "modeling_qwenmoe_gb.py", "README.md", "eval.json",
                 "specialization.json", "expert_heatmap.png", "topk_scores.png", "data_info.json"):  # fmt: skip
        assert (out / name).is_file(), name
    report = json.loads((out / "eval.json").read_text())
    assert set(report["domains"]) == {"arithmetic", "dna", "prose", "code"}
    for values in report["domains"].values():
        assert 1.0 < values["ppl"] < 1000.0 and values["tokens"] == 4 * 63
    assert report["average_ppl"] < 259.0  # better than uniform over the byte vocabulary on average
    assert report["average_ppl"] == pytest.approx(sum(v["ppl"] for v in report["domains"].values()) / 4)
    spec = json.loads((out / "specialization.json").read_text())
    assert 0.0 <= spec["specialization_kl"] <= torch.log(torch.tensor(4.0)).item() + 1e-6  # I(D; E) <= log |D|
    for domain, freq in spec["frequency"].items():
        assert torch.tensor(freq, dtype=torch.float64).sum(-1).allclose(torch.tensor(2.0, dtype=torch.float64))
        assert 2 / 8 - 1e-6 <= spec["max_expert_frequency"][domain] <= 1.0
    assert (out / "expert_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    card_data = assert_card(out, report).data  # huggingface_hub reads the evaluation back; no lineage: from scratch
    assert "custom_code" in card_data.tags and card_data.datasets is None  # the embedded corpus is not on the Hub
    card = (out / "README.md").read_text()
    assert f"{report['average_ppl']:.3f}" in card and f"{spec['specialization_kl']:.4f}" in card
    assert "balance_scope" in card and "global" in card
    pickles = [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert pickles == [] and (out / "training_args.json").is_file()  # weights as safetensors, args as JSON


def test_evaluate_and_analyze_commands_reload_the_checkpoint(run_dir, tmp_path, capsys):
    out, _ = run_dir
    main(["evaluate", "--model", str(out), "--out", str(tmp_path), "--seq_len", "64", "--eval_max_sequences", "4"])
    assert "| **average** |" in capsys.readouterr().out
    again = json.loads((tmp_path / "eval.json").read_text())
    original = json.loads((out / "eval.json").read_text())
    assert again["average_ppl"] == pytest.approx(original["average_ppl"], rel=1e-5)
    main(["analyze", "--model", str(out), "--out", str(tmp_path), "--seq_len", "64", "--eval_max_sequences", "4"])
    assert (tmp_path / "expert_heatmap.png").is_file() and "specialization KL" in capsys.readouterr().out


def test_push_uploads_weights_code_and_card_with_a_mocked_api(run_dir):
    out, _ = run_dir
    api = mock.MagicMock()
    push_folder(out, "someone/qwenmoe-gb-tiny", api=api)
    api.create_repo.assert_called_once_with("someone/qwenmoe-gb-tiny", private=False, exist_ok=True, repo_type="model")
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "someone/qwenmoe-gb-tiny" and kwargs["folder_path"] == str(out)
    uploaded = {p.name for p in out.iterdir() if p.is_file()}
    assert {"model.safetensors", "config.json", "configuration_qwenmoe_gb.py", "modeling_qwenmoe_gb.py",
            "README.md"} <= uploaded  # fmt: skip
    assert "checkpoint-*" in kwargs["ignore_patterns"]
    with pytest.raises(ValueError, match="is neither a saved QwenMoE-GB checkpoint nor a stock export"):
        push_folder(out / "nowhere", "someone/x", api=api)


def test_resume_restores_experts_and_matches_the_uninterrupted_run(run_dir, tmp_path):
    out, _ = run_dir
    resumed = tmp_path / "resumed"
    pretrain([*TINY, "--output_dir", str(resumed), "--aux_free", "true",
              "--resume_from_checkpoint", str(out / "checkpoint-3")])  # fmt: skip
    a = QwenMoeGBForCausalLM.from_pretrained(out)
    b = QwenMoeGBForCausalLM.from_pretrained(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    history = json.loads((resumed / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    original = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [h["loss"] for h in history if "loss" in h] == [h["loss"] for h in original if "loss" in h]


def test_bad_input_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="seq_len=4096 is above the model's max_position_embeddings=512"):
        pretrain([*TINY, "--output_dir", str(tmp_path / "a"), "--seq_len", "4096"])
    with pytest.raises(ValueError, match="balance_scope='nope' is unknown"):
        pretrain([*TINY, "--output_dir", str(tmp_path / "b"), "--balance_scope", "nope"])
    with pytest.raises(ValueError, match="switch_scope_to='later' is unknown"):
        pretrain([*TINY, "--output_dir", str(tmp_path / "d"), "--switch_scope_at", "2", "--switch_scope_to", "later"])
    with pytest.raises(ValueError, match="has no domains"):
        (tmp_path / "empty").mkdir()
        pretrain([*TINY, "--output_dir", str(tmp_path / "c"), "--data", str(tmp_path / "empty")])
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_bad_parallel_layout_fails_before_training(tmp_path):
    """The native engine's sizes are checked against the world size (1 here) and the experts before anything runs."""
    with pytest.raises(ValueError, match=r"fsdp_size=2 × dp_replicate_size=1 × tp_size=1 = 2 but the world size is 1"):
        pretrain([*TINY, "--output_dir", str(tmp_path / "a"), "--fsdp_size", "2"])
    with pytest.raises(ValueError, match="ep_size=3 is not allowed with num_experts=16"):
        pretrain([*TINY, "--output_dir", str(tmp_path / "b"), "--ep_size", "3"])
    with pytest.raises(ValueError, match="fsdp_size=0 is not allowed"):
        pretrain([*TINY, "--output_dir", str(tmp_path / "c"), "--fsdp_size", "0"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_input_leaves_an_existing_run_untouched(run_dir):
    out, _ = run_dir
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="router_aux_loss_coef=-1.0 is not allowed"):
        pretrain([*TINY, "--output_dir", str(out), "--router_aux_loss_coef", "-1"])
    with pytest.raises(ValueError, match="domain_weights names domain 'nope'"):
        pretrain([*TINY, "--output_dir", str(out), "--domain_weights", "nope=1"])
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing overwritten, nothing lost


def test_tokenizer_that_does_not_fit_the_model_is_rejected(tmp_path):
    from .conftest import tiny_config

    QwenMoeGBForCausalLM(tiny_config()).save_pretrained(tmp_path / "small-vocab")  # vocab 99 < 259 bytes + specials
    with pytest.raises(ValueError, match="tokenizer='byte' has 259 tokens but the model's vocab_size is 99"):
        pretrain([*TINY, "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "small-vocab")])
    assert not (tmp_path / "out").exists()


def test_scope_switch_mid_training(tmp_path):
    pretrain([*TINY, "--output_dir", str(tmp_path), "--balance_scope", "micro", "--switch_scope_at", "3",
              "--switch_scope_to", "global", "--save_strategy", "no"])  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["balance_scope"] == "global"


@pytest.mark.parametrize("disable_tqdm", ["true", "false"])
def test_console_shows_layer_means_and_the_history_keeps_every_layer(tmp_path, capsys, disable_tqdm):
    flags = [*TINY, "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--eval_max_sequences", "2"]
    pretrain([*flags, "--disable_tqdm", disable_tqdm, "--output_dir", str(tmp_path)])
    console = capsys.readouterr()
    printed = console.out + console.err
    assert "'balance/global_lbl'" in printed and "'ce_loss'" in printed
    assert "/layer_" not in printed
    history = json.loads((tmp_path / "log_history.json").read_text())["log_history"]
    assert "balance/global_lbl/layer_1" in history[0] and "balance/maxvio_global/layer_0" in history[0]
