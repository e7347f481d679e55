"""Cards the Hub understands: evaluation results as `model-index` (huggingface_hub's `EvalResult`), metric names, Hub
datasets, lineage (`base_model`, `base_model_relation`) for every way a run starts from another checkpoint, one writer
for every card; pushed to a Hub-compatible server on 127.0.0.1 and read back, the LoRA adapter loaded back with PEFT
and with transformers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.convert import export_qwen_moe
from modeling_qwenmoe_gb.hub import card_metadata, hub_model_id, push_folder, write_model_card

from .card_checks import assert_card
from .conftest import tiny_config
from .hub_server import HubServer

REPORT = {
    "domains": {"code": {"ppl": 3.14159, "loss": 1.1447}, "math": {"ppl": 2.71828, "loss": 1.0}},
    "average_ppl": 2.929935,
    "average_loss": 1.07235,
}


def test_hub_model_id_keeps_hub_names_and_cache_snapshots_only(tmp_path):
    assert hub_model_id("Qwen/Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"
    assert hub_model_id(str(tmp_path)) is None  # a local folder is not in the Hub's model tree
    snapshot = "/root/.cache/huggingface/hub/models--someone--base/snapshots/0123abcd"
    assert hub_model_id(snapshot) == "someone/base"
    assert hub_model_id("./not/there") is None and hub_model_id(None) is None and hub_model_id("a/b/c") is None


@pytest.mark.parametrize(
    "data,types,configs,datasets,average",
    [
        ("synthetic", {"qwenmoe-gb-synthetic"}, {"code", "math"}, None, "qwenmoe-gb-synthetic"),
        ("hub:org/mixed", {"org/mixed"}, {"code", "math"}, ["org/mixed"], "org/mixed"),
        ("hub:code=org/a,math=org/b", {"org/a", "org/b"}, {None}, ["org/a", "org/b"], "mixture"),
        ("/data/my-corpus", {"local:my-corpus"}, {"code", "math"}, None, "local:my-corpus"),
    ],
)
def test_card_metadata_names_the_data_as_the_run_knew_it(data, types, configs, datasets, average):
    meta = card_metadata("m", REPORT, data, base_model="org/base", base_model_relation="finetune")
    parsed = ModelCard(f"---\n{meta.to_yaml()}\n---\n").data  # what the Hub's parser reads back
    per_domain = [r for r in parsed.eval_results if r.metric_name != "average perplexity"]
    assert {r.dataset_type for r in per_domain} == types and {r.dataset_config for r in per_domain} == configs
    (mean,) = [r for r in parsed.eval_results if r.metric_name == "average perplexity"]
    assert mean.dataset_type == average and mean.metric_value == 2.9299
    assert parsed.datasets == datasets and parsed.metrics == ["perplexity"]
    assert parsed.base_model == "org/base" and parsed.base_model_relation == "finetune"
    with pytest.raises(ValueError, match="base_model_relation='fork'"):
        card_metadata("m", base_model="org/base", base_model_relation="fork")


def test_export_card_carries_the_runs_evaluation_and_lineage(tmp_path):
    """An export of a run that started from a Hub model sits under that model (the same model, another format), with
    the run's evaluation; an export of a Hub repo sits under that repo."""
    model = QwenMoeGBForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "run")
    (tmp_path / "run/eval.json").write_text(json.dumps(REPORT))
    write_model_card(tmp_path / "run", model.config, REPORT, base_model="org/base", base_model_relation="finetune")
    export_qwen_moe(tmp_path / "run", tmp_path / "stock")
    card = assert_card(tmp_path / "stock", REPORT, base_model="org/base", relation="finetune")
    assert "qwen2_moe" in card.data.tags and "custom_code" not in card.data.tags
    export_qwen_moe(model, tmp_path / "stock2", source_name="someone/qwenmoe-gb-run")
    assert_card(tmp_path / "stock2", base_model="someone/qwenmoe-gb-run")


def test_full_sft_card_names_its_starting_checkpoint(tmp_path):
    from .test_sft import run_sft

    model = QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0))
    model.config._name_or_path = "someone/base"  # as from_pretrained("someone/base") leaves it
    trainer = run_sft(tmp_path, model)
    trainer.create_model_card()
    card = assert_card(tmp_path, base_model="someone/base", relation="finetune")
    assert {"trl", "sft"} <= set(card.data.tags)
    model.config._name_or_path = str(tmp_path)  # a local start: named in the text, not in the model tree
    trainer.create_model_card()
    assert f"local checkpoint `{tmp_path}`" in assert_card(tmp_path).content


SETUP = """
import sys, torch
from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
"""

LORA_PUSH = SETUP + textwrap.dedent("""
    from peft import get_peft_model
    from trl import SFTConfig
    from modeling_qwenmoe_gb.sft import QwenMoeGBSFTTrainer, lora_config
    from tests.test_sft import char_tokenizer, sft_data
    base = QwenMoeGBForCausalLM.from_pretrained("someone/base")
    model = get_peft_model(base, lora_config(rank=4))
    args = SFTConfig(sys.argv[1], per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[],
                     use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32, hub_model_id="someone/adapter",
                     hub_token="hf_test", bf16=False)  # fp32 on CPU (TRL's default autocasts to bf16)
    trainer = QwenMoeGBSFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=char_tokenizer())
    trainer.train()
    trainer.push_to_hub()
    torch.save(model.eval()(torch.load(sys.argv[2])).logits, sys.argv[3])
""")

ADAPTER_PULL = SETUP + textwrap.dedent("""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[1])
    with_peft = PeftModel.from_pretrained(QwenMoeGBForCausalLM.from_pretrained("someone/base"), "someone/adapter")
    direct = AutoModelForCausalLM.from_pretrained("someone/adapter")  # transformers' PEFT integration
    torch.save({"peft": with_peft.eval()(ids).logits, "transformers": direct.eval()(ids).logits}, sys.argv[2])
""")


def test_pretrain_from_the_hub_then_push_and_a_lora_adapter_repo(tmp_path, monkeypatch):
    """A base model on the (loopback) Hub → `qwenmoe-gb pretrain --model_name_or_path someone/base`: the card names it
    (`finetune`) and carries the evaluation; `push_folder` sends it under its repo id. LoRA SFT of the same base pushed
    by the Trainer as a PEFT adapter repo (`adapter`, library peft), loaded back with `PeftModel.from_pretrained` and
    `AutoModelForCausalLM.from_pretrained(adapter_repo)`, both equal to the trained adapter."""
    ids = torch.randint(3, 40, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    with HubServer() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this server is loopback
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        QwenMoeGBForCausalLM(tiny_config(vocab_size=260, pad_token_id=0)).save_pretrained(tmp_path / "base")
        write_model_card(tmp_path / "base", QwenMoeGBForCausalLM(tiny_config()).config)
        push_folder(tmp_path / "base", "someone/base", api=api)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, in every subprocess
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_test", PYTHONPATH=root)  # fmt: skip
        run = [sys.executable, "-m", "modeling_qwenmoe_gb.cli", "pretrain", "--model_name_or_path", "someone/base",
               "--output_dir", str(tmp_path / "ft"), "--max_steps", "2", "--seq_len", "32", "--synthetic_docs", "20",
               "--eval_max_sequences", "2", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip
        subprocess.run(run, check=True, env=env, cwd=tmp_path, timeout=600, capture_output=True)
        report = json.loads((tmp_path / "ft/eval.json").read_text())
        assert_card(tmp_path / "ft", report, base_model="someone/base", relation="finetune")
        push_folder(tmp_path / "ft", "someone/ft", api=api)
        pushed = ModelCard(hub.state.repos["someone/ft"]["files"]["README.md"].decode())
        assert pushed.data.base_model == "someone/base" and len(pushed.data.eval_results) == 5
        assert "someone/ft" in pushed.content and "<user>/" not in pushed.content
        lora = [
            sys.executable,
            "-c",
            LORA_PUSH,
            str(tmp_path / "sft"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "o.pt"),
        ]
        subprocess.run(lora, check=True, env=env, cwd=root, timeout=600)
        files = hub.state.repos["someone/adapter"]["files"]
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
        assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "someone/base"
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter/README.md").write_bytes(files["README.md"])
        assert_card(tmp_path / "adapter", base_model="someone/base", relation="adapter", library_name="peft")
        pull = [sys.executable, "-c", ADAPTER_PULL, str(tmp_path / "ids.pt"), str(tmp_path / "p.pt")]
        subprocess.run(pull, check=True, env={**env, "HF_HOME": str(tmp_path / "hf2")}, cwd=root, timeout=600)
    trained, pulled = torch.load(tmp_path / "o.pt"), torch.load(tmp_path / "p.pt")
    torch.testing.assert_close(pulled["peft"], trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pulled["transformers"], trained, rtol=1e-5, atol=1e-5)


def test_lora_card_names_regex_targets_and_the_local_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    from .test_sft import run_sft

    QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0)).save_pretrained(tmp_path / "base")
    model = QwenMoeGBForCausalLM.from_pretrained(tmp_path / "base")  # a local base: named in the text only
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=r".*\.q_proj", task_type="CAUSAL_LM"))
    trainer = run_sft(tmp_path / "sft", lora)
    trainer.create_model_card()
    card = assert_card(tmp_path / "sft", library_name="peft")
    assert r"LoRA on `.*\.q_proj`" in card.content and f"local checkpoint `{tmp_path / 'base'}`" in card.content
