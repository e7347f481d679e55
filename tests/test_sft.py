"""Fine-tuning: TRL's SFTTrainer with the balancer, PEFT LoRA on attention and experts, router trainable or frozen."""

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig  # noqa: E402

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM  # noqa: E402
from modeling_qwenmoe_gb.sft import QwenMoeGBSFTTrainer, lora_config  # noqa: E402

from .conftest import tiny_config  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=.?\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft_data() -> Dataset:
    rows = [{"prompt": f"what is {a} + {b}?", "completion": f" {a + b}."} for a in range(6) for b in range(6)]
    return Dataset.from_list(rows)


def run_sft(tmp_path, model, **config):
    args = SFTConfig(str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                     learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     disable_tqdm=True, max_length=32, **config)  # fmt: skip
    trainer = QwenMoeGBSFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=char_tokenizer())
    trainer.train()
    return trainer


def test_sft_trainer_with_global_balance(tmp_path):
    model = QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0, aux_free=True))
    before = model.model.layers[0].mlp.gate.weight.detach().clone()
    trainer = run_sft(tmp_path, model)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("balance/global_lbl" in h and "ce_loss" in h for h in logs)
    assert not torch.equal(before, model.model.layers[0].mlp.gate.weight)
    assert model.model.layers[0].mlp.gate.expert_bias.abs().sum() > 0  # aux-free updated once per step
    assert trainer.balancer.step_counts.sum() == 0


@pytest.mark.parametrize("train_router", [True, False])
def test_lora_on_attention_and_experts(tmp_path, train_router):
    base = QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0))
    router_before = base.model.layers[0].mlp.gate.weight.detach().clone()
    experts_before = base.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    model = get_peft_model(base, lora_config(rank=4, train_router=train_router))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trainable) and any("experts" in n and "lora" in n for n in trainable)
    assert any("gate.modules_to_save" in n for n in trainable) is train_router
    trainer = run_sft(tmp_path, model)
    assert "balance/micro_lbl" in trainer.state.log_history[0]
    (frozen,) = [p for n, p in model.named_parameters() if "layers.0.mlp.experts" in n and n.endswith("gate_up_proj")]
    assert not frozen.requires_grad  # LoRA trains adapters only
    torch.testing.assert_close(frozen, experts_before, rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert not torch.equal(merged.model.layers[0].mlp.experts.gate_up_proj, experts_before)  # LoRA merged in
    router_changed = not torch.equal(merged.model.layers[0].mlp.gate.weight, router_before)
    assert router_changed is train_router


def test_sft_example_script_with_lora(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    QwenMoeGBForCausalLM(tiny_config(vocab_size=260)).save_pretrained(tmp_path / "base")
    script = Path(__file__).resolve().parent.parent / "scripts" / "sft_example.py"
    cmd = [sys.executable, str(script), "--model", str(tmp_path / "base"), "--output_dir", str(tmp_path / "sft"),
           "--max_steps", "2", "--logging_steps", "1", "--lora", "--disable_tqdm", "true"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "balance/global_lbl" in result.stdout
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()
