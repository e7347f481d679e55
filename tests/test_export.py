"""Export to stock Qwen3-MoE / Qwen2-MoE: identical logits (transformers' own classes as the reference), both round
trips, refusal of what no stock architecture computes, the folder a stock loader needs, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.cli import main as cli
from modeling_qwenmoe_gb.convert import export_qwen_moe, from_qwen_moe, llama_cpp_notes, to_qwen_moe
from modeling_qwenmoe_gb.data import ByteTokenizer

from .conftest import tiny_config
from .test_convert import SHAPE

QWEN3 = dict(use_qk_norm=True, shared_expert_intermediate_size=0, head_dim=16, qkv_bias=False, norm_topk_prob=True)
CONFIGS = {  # several of each kind; initializer_range 0.2 so that routing differs between tokens
    "qwen2-shared-tied": dict(tie_word_embeddings=True),
    "qwen2-no-shared-no-qkv-bias": dict(shared_expert_intermediate_size=0, qkv_bias=False, norm_topk_prob=True),
    "qwen2-aux-free-zero-bias-dense-layer": dict(aux_free=True, mlp_only_layers=[0], balance_scope="micro"),
    "qwen3": QWEN3,
    "qwen3-attention-bias-sparse-step": {**QWEN3, "attention_bias": True, "decoder_sparse_step": 2},
    "qwen3-no-norm-topk-aux-free": {**QWEN3, "norm_topk_prob": False, "aux_free": True, "head_dim": 32},
}


def make(**overrides) -> QwenMoeGBForCausalLM:
    model = QwenMoeGBForCausalLM(tiny_config(initializer_range=0.2, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # nonzero biases and norms, so a dropped one shows
                param.normal_(0.3, 0.1)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_stock_model_computes_what_ours_computes(name):
    model = make(**CONFIGS[name])
    stock = to_qwen_moe(model)
    expected = transformers.Qwen3MoeForCausalLM if model.config.use_qk_norm else transformers.Qwen2MoeForCausalLM
    assert type(stock) is expected
    ids = torch.randint(1, 99, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    torch.testing.assert_close(stock(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    ours = model.generate(ids[:1, 4:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = stock.generate(ids[:1, 4:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ["qwen2-no-shared-no-qkv-bias", "qwen3-no-norm-topk-aux-free"])
def test_export_folder_is_stock_and_round_trips(name, tmp_path):
    model = make(**CONFIGS[name], balance_scope="global", router_z_loss_coef=1e-3, device_balance_groups=2)
    out = export_qwen_moe(model, tmp_path / "out", tokenizer=ByteTokenizer().to_hf())
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith(".py")]
    config = json.loads((out / "config.json").read_text())
    kind = "qwen3_moe" if model.config.use_qk_norm else "qwen2_moe"
    assert config["model_type"] == kind and "auto_map" not in config
    assert config["router_aux_loss_coef"] == pytest.approx(model.config.router_aux_loss_coef / 2)  # transformers' units
    keys = load_file(out / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # per-expert Hub layout
    assert not [k for k in keys if "expert_bias" in k or k.endswith("gate_up_proj")]
    card = (out / "README.md").read_text()
    assert "vllm serve" in card and "| `balance_scope` | global |" in card and "llama.cpp" in card
    back = from_qwen_moe(str(out))  # the QwenMoE-GB model again: same weights, same training settings
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    for field in ("balance_scope", "router_aux_loss_coef", "router_z_loss_coef", "device_balance_groups", "aux_free"):
        assert getattr(back.config, field) == getattr(model.config, field), field


LOAD_WITHOUT_PACKAGE = r"""
import sys, torch
sys.modules["modeling_qwenmoe_gb"] = None  # no package, no remote code: transformers' own classes only
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert type(model).__module__.startswith("transformers.models."), type(model).__module__
torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def assert_loads_without_the_package(out, model, tmp_path) -> None:
    """transformers alone (the package blocked, no remote code) loads `out` and computes `model`'s logits."""
    ids = torch.randint(1, 99, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")]
    subprocess.run(args, check=True, cwd=tmp_path, env=env, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "o.pt"), model(ids).logits, rtol=1e-6, atol=1e-6)


def test_export_loads_in_transformers_without_the_package_or_remote_code(tmp_path):
    model = make(**CONFIGS["qwen3"])
    out = export_qwen_moe(model, tmp_path / "out")
    assert_loads_without_the_package(out, model, tmp_path)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_export_of_a_converted_qwen_checkpoint_gives_back_its_tensors_and_config(kind, tmp_path):
    from .test_convert import save_reference

    save_reference(kind, tmp_path / "original")
    model = from_qwen_moe(str(tmp_path / "original"), balance_scope="global")
    assert model.config.router_aux_loss_coef == pytest.approx(0.001 * SHAPE["num_experts_per_tok"])  # our units
    out = export_qwen_moe(model, tmp_path / "exported")
    original, exported = load_file(tmp_path / "original/model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    for key, value in original.items():
        assert torch.equal(exported[key], value), key
    before = json.loads((tmp_path / "original/config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    after.pop("qwenmoe_gb")  # our record of the training settings, ignored by stock loaders
    assert after.pop("router_aux_loss_coef") == pytest.approx(before.pop("router_aux_loss_coef"))  # ÷ K again
    assert after == before


REFUSED = {
    "nonzero aux-free bias": (dict(aux_free=True), "auto", ["aux_free=True", "expert_bias", "layer 1"]),
    "sigmoid scores": (dict(router_scoring_func="sigmoid"), "auto", ["router_scoring_func='sigmoid'"]),
    "qk-norm with shared expert": (dict(use_qk_norm=True, head_dim=8), "auto", ["shared_expert_intermediate_size=32"]),
    "qk-norm to qwen2": ({**QWEN3}, "qwen2_moe", ["use_qk_norm=True"]),
    "no qk-norm to qwen3": (dict(shared_expert_intermediate_size=0), "qwen3_moe", ["use_qk_norm=False"]),
    "head size to qwen2": (dict(head_dim=16), "qwen2_moe", ["head_dim=16", "hidden_size=32"]),
    "unknown target": (dict(), "llama", ["to='llama'", "qwen3_moe"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_no_stock_architecture_computes_is_refused_with_the_way_to_serve_it(case, tmp_path):
    overrides, to, named = REFUSED[case]
    model = make(**overrides)
    if model.config.aux_free:
        with torch.no_grad():
            model.model.layers[1].mlp.gate.expert_bias[3] = 0.25
    with pytest.raises(ValueError) as error:
        export_qwen_moe(model, tmp_path / "out", to=to)
    for text in named:
        assert text in str(error.value), (text, str(error.value))
    if to != "llama":
        assert "model_impl='transformers'" in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_all_qk_norm_and_shared_expert_problems_are_named_at_once():
    model = make(use_qk_norm=True, head_dim=8, router_scoring_func="sigmoid")
    with pytest.raises(ValueError, match="router_scoring_func='sigmoid'.*shared_expert_intermediate_size=32"):
        to_qwen_moe(model)


def test_llama_cpp_differences_are_stated():
    qwen2 = tiny_config(norm_topk_prob=True)
    assert "never renormalises" in llama_cpp_notes(qwen2, "qwen2_moe")[0]
    assert llama_cpp_notes(tiny_config(norm_topk_prob=False), "qwen2_moe") == []
    assert "always renormalises" in llama_cpp_notes(tiny_config(**{**QWEN3, "norm_topk_prob": False}), "qwen3_moe")[0]
    assert "byte tokenizer" in llama_cpp_notes(qwen2, "qwen2_moe", ByteTokenizer().to_hf())[1]


def test_cli_exports_a_checkpoint_folder_and_repairs_an_old_one(tmp_path, capsys):
    model = make(**CONFIGS["qwen2-shared-tied"])
    model.save_pretrained(tmp_path / "run")
    ByteTokenizer().to_hf().save_pretrained(tmp_path / "run")
    report = {"domains": {"code": {"ppl": 3.25, "loss": 1.1787}}, "average_ppl": 3.25, "average_loss": 1.1787}
    (tmp_path / "run/eval.json").write_text(json.dumps(report))  # as `qwenmoe-gb evaluate` writes it
    cli(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "stock")])
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    assert type(stock) is transformers.Qwen2MoeForCausalLM
    ids = torch.randint(1, 99, (2, 7))
    torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)
    assert "3.25" in (tmp_path / "stock/README.md").read_text()  # the run's evaluation is on the card
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "stock")("ab")["input_ids"] == [97, 98]
    config = json.loads((tmp_path / "run/config.json").read_text())  # a checkpoint saved before AutoModel was written
    config["auto_map"].pop("AutoModel")
    (tmp_path / "run/config.json").write_text(json.dumps(config))
    cli(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "hub"), "--to", "qwenmoe_gb"])
    auto_map = json.loads((tmp_path / "hub/config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_qwenmoe_gb.QwenMoeGBModel"
    assert {"tokenizer.json", "eval.json", "modeling_qwenmoe_gb.py"} <= {p.name for p in (tmp_path / "hub").iterdir()}
    with pytest.raises(ValueError, match="out=''"):
        cli(["export", "--model", str(tmp_path / "run")])


GLM4 = dict(
    shared_expert_intermediate_size=0, router_scoring_func="sigmoid", aux_free=True, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True,
)  # fmt: skip
GLM4_CONFIGS = {
    "qkv-bias": dict(qkv_bias=True),
    "qk-norm": dict(use_qk_norm=True, qkv_bias=False, head_dim=16),
    "no-groups-no-norm-topk": dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
}


def make_glm4(**overrides) -> QwenMoeGBForCausalLM:
    model = make(**{**GLM4, **overrides})
    with torch.no_grad():
        for router in model.model.moe_routers():
            router.expert_bias.normal_(0, 0.2)  # a trained aux-free bias: it moves the selection
    return model


@pytest.mark.parametrize("name", GLM4_CONFIGS)
def test_sigmoid_aux_free_group_limited_model_exports_to_glm4_moe_exactly(name):
    model = make_glm4(**GLM4_CONFIGS[name])
    stock = to_qwen_moe(model)
    assert type(stock) is transformers.Glm4MoeForCausalLM
    ids = torch.randint(1, 99, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    torch.testing.assert_close(stock(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    unbiased = make_glm4(**GLM4_CONFIGS[name])
    unbiased.load_state_dict(model.state_dict())
    for router in unbiased.model.moe_routers():
        router.expert_bias.zero_()
    assert not torch.allclose(unbiased(ids).logits, model(ids).logits)  # the bias matters: the test would see a drop
    ours = model.generate(ids[:1, 4:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, stock.generate(ids[:1, 4:], max_new_tokens=8, do_sample=False, pad_token_id=0))


def test_glm4_moe_export_folder_loads_without_the_package_and_round_trips(tmp_path):
    model = make_glm4(expert_capacity_factor=1.25, balance_scope="global", device_balance_groups=2)
    out = export_qwen_moe(model, tmp_path / "out", tokenizer=ByteTokenizer().to_hf())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and "auto_map" not in config
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (4, 2, 2.5)
    assert not [p for p in out.iterdir() if p.suffix == ".py"]
    keys = load_file(out / "model.safetensors").keys()
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # per-expert layout, as vLLM reads it
    assert_loads_without_the_package(out, model, tmp_path)
    back = from_qwen_moe(str(out))
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    for field in (
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "router_scoring_func",
        "aux_free",
        "expert_capacity_factor",
        "balance_scope",
        "device_balance_groups",
        "router_aux_loss_coef",
    ):
        assert getattr(back.config, field) == getattr(model.config, field), field


def test_a_gated_shared_expert_with_sigmoid_routing_is_refused_naming_each_target(tmp_path):
    model = make_glm4(shared_expert_intermediate_size=32)
    with pytest.raises(ValueError) as error:
        export_qwen_moe(model, tmp_path / "out")
    message = str(error.value)
    for text in ("glm4_moe: shared_expert_intermediate_size=32 with its sigmoid gate", "qwen2_moe: n_group=4",
                 "router_scoring_func='sigmoid'", "model_impl='transformers'"):  # fmt: skip
        assert text in message, (text, message)
    assert not (tmp_path / "out").exists()
