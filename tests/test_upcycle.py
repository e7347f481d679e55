"""Upcycling dense Qwen2 / Qwen3 / Llama models into QwenMoE-GB (`from_dense`): the function-preserving recipes
compute the dense model's logits (transformers' dense model as the reference), parameter counts from the config equal
the built model's, every impossible setting is refused naming the field, and the upcycled model trains, saves,
reloads, exports and runs from the CLI."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.cli import pretrain
from modeling_qwenmoe_gb.convert import export_qwen_moe, from_dense

SHAPE = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=128)  # fmt: skip


def dense_model(kind: str, tied: bool = False):
    torch.manual_seed(0)
    if kind == "qwen3":
        config = transformers.Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=tied)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=tied)
    else:
        config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


PRESERVING = {
    "copy": dict(recipe="copy"),
    "copy+shared": dict(recipe="copy", shared_expert_intermediate_size=16),
    "segment+full-shared": dict(recipe="segment", moe_intermediate_size=16, shared_expert_intermediate_size=64),
}


@pytest.mark.parametrize("kind,tied", [("qwen2", False), ("qwen2", True), ("qwen3", False), ("qwen3", True),
                                       ("llama", False)])  # fmt: skip
@pytest.mark.parametrize("setting", PRESERVING)
def test_function_preserving_upcycles_compute_the_dense_logits(kind, tied, setting):
    dense = dense_model(kind, tied)
    model = from_dense(dense, num_experts=8, num_experts_per_tok=2, **PRESERVING[setting])
    assert model.config.use_qk_norm is (kind == "qwen3") and model.config.qkv_bias is (kind == "qwen2")
    ids = torch.randint(0, 99, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    expected = dense(ids, attention_mask=mask).logits
    # copy: Σ of normalised top-k weights is 1 up to fp32 rounding; segment with the full shared expert: bit-exact
    tolerance = 0.0 if setting.startswith("segment") else 1e-5
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=tolerance, atol=tolerance)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params()
    assert all((router.expert_bias == 0).all() for router in model.model.moe_routers())


def test_segments_and_reinit_are_not_function_preserving_and_the_gap_is_measured():
    """`segment` without the full shared expert, and any Drop-Upcycling ratio, change the function; the initial loss
    gap against the dense model is finite and reported (docs/guides/upcycling.md)."""
    dense = dense_model("qwen3")
    ids = torch.randint(0, 99, (4, 33))
    dense_loss = dense(ids, labels=ids).loss
    for kwargs in (dict(recipe="segment", moe_intermediate_size=16), dict(recipe="copy", reinit_ratio=0.25),
                   dict(recipe="segment", moe_intermediate_size=16, shared_expert_intermediate_size=32)):  # fmt: skip
        model = from_dense(dense, num_experts=8, num_experts_per_tok=2, **kwargs)
        gap = (model(ids, labels=ids).loss - dense_loss).item()
        assert torch.isfinite(torch.tensor(gap)) and abs(gap) > 1e-4, (kwargs, gap)


def test_segment_layout_and_reinit_fraction():
    dense = dense_model("qwen2")
    model = from_dense(dense, num_experts=8, num_experts_per_tok=2, recipe="segment", moe_intermediate_size=16)
    gate = dense.model.layers[0].mlp.gate_proj.weight
    experts = model.model.layers[0].mlp.experts
    for e in range(8):  # expert e = segment e mod 4, down projection × 4 (the number of segments)
        segment = slice((e % 4) * 16, (e % 4 + 1) * 16)
        assert torch.equal(experts.gate_up_proj[e][:16], gate[segment])
        assert torch.equal(experts.down_proj[e], dense.model.layers[0].mlp.down_proj.weight[:, segment] * 4)
    dropped = from_dense(dense, num_experts=8, num_experts_per_tok=2, recipe="copy", reinit_ratio=0.25, seed=3)
    changed = dropped.model.layers[1].mlp.experts.gate_up_proj[:, :64] != dense.model.layers[1].mlp.gate_proj.weight
    per_expert = changed.any(-1).sum(-1)  # (E,): hidden units re-initialised in each expert
    assert per_expert.tolist() == [16] * 8
    assert not torch.equal(changed[0], changed[1])  # different units per expert: diversity
    again = from_dense(dense, num_experts=8, num_experts_per_tok=2, recipe="copy", reinit_ratio=0.25, seed=3)
    assert torch.equal(again.model.layers[1].mlp.experts.gate_up_proj, dropped.model.layers[1].mlp.experts.gate_up_proj)


REFUSED = [
    (dict(recipe="segment", moe_intermediate_size=24), "moe_intermediate_size=24 does not divide intermediate_size=64"),
    (dict(recipe="segment", moe_intermediate_size=16, num_experts=6), "num_experts=6 is not a multiple of the 4"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 is above num_experts=8"),
    (dict(recipe="copy", moe_intermediate_size=16), "moe_intermediate_size=16: recipe 'copy' needs the dense width 64"),
    (dict(recipe="mix"), "recipe='mix' is unknown"),
    (dict(reinit_ratio=1.5), "reinit_ratio=1.5"),
    (dict(recipe="segment", moe_intermediate_size=16, shared_expert_intermediate_size=8),
     "shared_expert_intermediate_size=8"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,message", REFUSED)
def test_settings_that_cannot_work_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        from_dense(dense_model("qwen2"), **{"num_experts": 8, "num_experts_per_tok": 2, **kwargs})


def test_unsupported_sources_are_refused():
    with pytest.raises(ValueError, match="model_type='gpt2' is not a supported dense model"):
        from_dense(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4)), 8, 2)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, attention_bias=True))
    with pytest.raises(ValueError, match="attention_bias=True"):
        from_dense(llama, 8, 2)


def test_upcycled_model_trains_saves_reloads_and_exports(tmp_path):
    dense = dense_model("qwen3")
    dense.save_pretrained(tmp_path / "dense")
    model = from_dense(str(tmp_path / "dense"), num_experts=8, num_experts_per_tok=2, balance_scope="global")
    assert model.config._name_or_path == str(tmp_path / "dense")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 99, (4, 17))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])  # routing broke the symmetry of the copies
    model.eval().save_pretrained(tmp_path / "moe")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    export_qwen_moe(model, tmp_path / "stock")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    assert type(stock) is transformers.Qwen3MoeForCausalLM
    torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


def test_cli_pretrain_upcycles_a_dense_checkpoint(tmp_path):
    dense = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**SHAPE, "vocab_size": 260}))
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "run"
    pretrain(["--upcycle_from", str(tmp_path / "dense"), "--upcycle_recipe", "segment", "--num_experts", "8",
              "--num_experts_per_tok", "2", "--moe_intermediate_size", "16", "--shared_expert_intermediate_size", "64",
              "--output_dir", str(out), "--max_steps", "2", "--seq_len", "32", "--synthetic_docs", "20",
              "--eval_max_sequences", "2", "--save_strategy", "no", "--disable_tqdm", "true"])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 8 and config["moe_intermediate_size"] == 16 and config["model_type"] == "qwenmoe_gb"
    card = (out / "README.md").read_text()
    assert f"Upcycled from `{tmp_path / 'dense'}` (recipe `segment`" in card
    assert QwenMoeGBForCausalLM.from_pretrained(out).config.shared_expert_intermediate_size == 64


def test_upcycle_study_script_runs_at_toy_size(tmp_path):
    """`scripts/upcycle_study.py` end to end on a tiny local corpus: the dense base, a dense, an upcycled and a
    from-scratch arm, the report and the plot."""
    import subprocess
    import sys
    from pathlib import Path

    for domain, text in (("code", "def f(x):\n    return x + 1\n"), ("prose", "The cat sat on the mat. ")):
        (tmp_path / "corpus" / domain).mkdir(parents=True)
        for split, n in (("train", 12), ("test", 3)):
            rows = [json.dumps({"text": text * (20 + i)}) for i in range(n)]
            (tmp_path / "corpus" / domain / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    script = Path(__file__).resolve().parent.parent / "scripts" / "upcycle_study.py"
    cmd = [sys.executable, str(script), "--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "out"),
           "--seeds", "0", "--arms", "dense,copy-global,scratch-segment", "--dense_steps", "2", "--steps", "2",
           "--checkpoints", "2", "--seq_len", "32", "--batch", "2", "--accumulation", "1",
           "--eval_sequences", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["arms"]) == {"dense", "copy-global", "scratch-segment"}
    assert summary["initial"]["copy"]["gap_vs_dense"] == pytest.approx(0.0, abs=1e-5)  # copy preserves the function
    assert [s for s, _ in summary["arms"]["copy-global"]["0"]["kl_over_training"]] == [1, 2]
    assert (tmp_path / "out" / "upcycle_study.png").is_file() and "| copy-global |" in done.stdout
