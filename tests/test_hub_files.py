"""save -> load (registered and as Hub custom code), checkpoint conversion of fused experts, Hub-file hygiene."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import modeling_qwenmoe_gb
from modeling_qwenmoe_gb import QwenMoeGBForCausalLM

from .conftest import tiny_config

HUB_FILES = {"configuration_qwenmoe_gb.py", "modeling_qwenmoe_gb.py"}
PACKAGE = Path(modeling_qwenmoe_gb.__file__).parent


def trained_like_model(**overrides):
    model = QwenMoeGBForCausalLM(tiny_config(aux_free=True, **overrides)).eval()
    with torch.no_grad():
        for router in model.model.moe_routers():
            router.expert_bias.copy_(torch.randn(8) * 0.1)
    return model


def test_save_writes_auto_map_hub_files_and_safetensors(tmp_path):
    trained_like_model().save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert HUB_FILES <= names and "model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert {p.name for p in tmp_path.glob("*.py")} == HUB_FILES
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_qwenmoe_gb.QwenMoeGBConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_qwenmoe_gb.QwenMoeGBForCausalLM"
    assert auto_map["AutoModel"] == "modeling_qwenmoe_gb.QwenMoeGBModel"  # what serving engines' backends build
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.mlp.gate.expert_bias" in keys


def test_registered_round_trip_is_exact_and_stable(tmp_path):
    model = trained_like_model()
    ids = torch.randint(1, 99, (2, 7))
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert type(again) is QwenMoeGBForCausalLM
    torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)
    for a, b in zip(model.model.moe_routers(), again.model.moe_routers()):
        torch.testing.assert_close(a.expert_bias, b.expert_bias, rtol=0, atol=0)
    torch.testing.assert_close(
        again.model.layers[1].mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj, rtol=0, atol=0
    )
    again.save_pretrained(tmp_path / "b")
    third = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    torch.testing.assert_close(third(ids).logits, expected, rtol=0, atol=0)
    assert AutoConfig.from_pretrained(tmp_path / "b").aux_free is True


REMOTE_SCRIPT = r"""
import sys, torch
sys.modules["modeling_qwenmoe_gb"] = None  # the package must not be importable here
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
torch.save({"logits": model(ids).logits, "module": type(model).__module__,
            "bias": model.model.layers[0].mlp.gate.expert_bias}, sys.argv[3])
out = model.generate(ids[:1, :3], max_new_tokens=3, do_sample=False, pad_token_id=0)
assert out.shape == (1, 6)
from transformers import AutoModel  # the base model, as vLLM's / SGLang's Transformers backends build it
base = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(base).__name__ == "QwenMoeGBModel" and base.is_backend_compatible()
torch.save(base(ids).last_hidden_state, sys.argv[3] + ".base")
"""


def test_trust_remote_code_without_the_package(tmp_path):
    model = trained_like_model()
    ids = torch.randint(1, 99, (2, 7))
    model.save_pretrained(tmp_path / "ckpt")
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
        check=True,
        cwd=tmp_path,
        env=env,
    )
    result = torch.load(tmp_path / "o.pt")
    assert result["module"].startswith("transformers_modules")
    torch.testing.assert_close(result["logits"], model(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(result["bias"], model.model.layers[0].mlp.gate.expert_bias, rtol=0, atol=0)
    base = torch.load(str(tmp_path / "o.pt") + ".base")
    torch.testing.assert_close(base, model.model(ids).last_hidden_state, rtol=0, atol=0)


def test_hub_files_import_only_stdlib_torch_transformers_and_each_other():
    allowed_roots = {"torch", "transformers", "__future__", "contextlib", "dataclasses", "typing", "math", "os"}
    allowed_roots.add("importlib")  # loads the optional liger_kernel for loss_implementation="liger" on CUDA only
    for name in HUB_FILES:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
                assert roots <= allowed_roots, (name, roots)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and node.module == "configuration_qwenmoe_gb", (name, node.module)
                else:
                    assert node.module.split(".")[0] in allowed_roots, (name, node.module)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"exec", "eval", "compile", "__import__"}, name
