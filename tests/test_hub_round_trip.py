"""Hub round trip on loopback: push_to_hub (model, code, card) with the real huggingface_hub client to a
Hub-compatible server on 127.0.0.1, then from_pretrained(repo_id, trust_remote_code=True) in a fresh process where the
package cannot be imported, then the same offline from the cache."""

import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi, constants

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.hub import push_folder, write_model_card

from .conftest import tiny_config
from .hub_server import HubServer

PULL = r"""
import sys, torch
sys.modules["modeling_qwenmoe_gb"] = None  # the package must not be importable here
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def pull(repo_id, tmp_path, env, name):
    out = tmp_path / f"{name}.pt"
    subprocess.run([sys.executable, "-c", PULL, repo_id, str(tmp_path / "ids.pt"), str(out)], check=True, env=env,
                   cwd=tmp_path, timeout=300)  # fmt: skip
    return torch.load(out)


def test_push_then_pull_with_trust_remote_code_and_offline(tmp_path, monkeypatch):
    model = QwenMoeGBForCausalLM(tiny_config(aux_free=True)).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    ids = torch.randint(1, 99, (2, 7))
    torch.save(ids, tmp_path / "ids.pt")
    expected = model(ids).logits
    with HubServer() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this server is loopback
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        model.push_to_hub("someone/pushed", token="hf_test")  # transformers' own push_to_hub
        assert {"model.safetensors", "config.json", "modeling_qwenmoe_gb.py"} <= set(
            hub.state.repos["someone/pushed"]["files"]
        )
        folder = tmp_path / "ckpt"  # our push: weights, code and card
        model.save_pretrained(folder)
        write_model_card(folder, model.config, repo_id="someone/qwenmoe-gb-tiny")
        push_folder(folder, "someone/qwenmoe-gb-tiny", api=HfApi(endpoint=hub.endpoint, token="hf_test"))
        stored = hub.state.repos["someone/qwenmoe-gb-tiny"]["files"]
        assert {"model.safetensors", "config.json", "configuration_qwenmoe_gb.py", "modeling_qwenmoe_gb.py",
                "README.md"} <= set(stored)  # fmt: skip
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   HF_HUB_DISABLE_XET="1")  # fmt: skip
        online = pull("someone/qwenmoe-gb-tiny", tmp_path, env, "online")
    torch.testing.assert_close(online, expected, rtol=0, atol=0)
    offline = pull("someone/qwenmoe-gb-tiny", tmp_path, {**env, "HF_HUB_OFFLINE": "1"}, "offline")  # server is gone
    torch.testing.assert_close(offline, expected, rtol=0, atol=0)


PULL_STOCK = r"""
import sys, torch
sys.modules["modeling_qwenmoe_gb"] = None  # no package and no remote code: a stock Qwen-MoE
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert type(model).__module__.startswith("transformers.models.qwen3_moe"), type(model).__module__
torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_push_a_stock_export_and_an_old_checkpoint(tmp_path, monkeypatch):
    """`push_folder` uploads a stock export (no code; pulled back without `trust_remote_code`) and completes the
    `auto_map` of a checkpoint saved before `AutoModel` was written."""
    import json

    from modeling_qwenmoe_gb.convert import export_qwen_moe

    model = QwenMoeGBForCausalLM(tiny_config(use_qk_norm=True, shared_expert_intermediate_size=0, head_dim=8)).eval()
    ids = torch.randint(1, 99, (2, 7))
    torch.save(ids, tmp_path / "ids.pt")
    export_qwen_moe(model, tmp_path / "stock")
    model.save_pretrained(tmp_path / "old")
    write_model_card(tmp_path / "old", model.config)
    config = json.loads((tmp_path / "old/config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (tmp_path / "old/config.json").write_text(json.dumps(config))
    with HubServer() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this server is loopback
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        push_folder(tmp_path / "stock", "someone/stock", api=api)
        push_folder(tmp_path / "old", "someone/old", api=api)
        stored = set(hub.state.repos["someone/stock"]["files"])
        assert {"model.safetensors", "config.json", "README.md"} <= stored and not [f for f in stored if ".py" in f]
        assert "AutoModel" in json.loads((tmp_path / "old/config.json").read_text())["auto_map"]
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   HF_HUB_DISABLE_XET="1")  # fmt: skip
        out = tmp_path / "stock.pt"
        subprocess.run([sys.executable, "-c", PULL_STOCK, "someone/stock", str(tmp_path / "ids.pt"), str(out)],
                       check=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    torch.testing.assert_close(torch.load(out), model(ids).logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="neither a saved QwenMoE-GB checkpoint nor a stock export"):
        push_folder(tmp_path, "someone/empty", api=HfApi(endpoint="http://127.0.0.1:9", token="x"))
