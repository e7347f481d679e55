"""REAP against llm-compressor's `REAPPruningModifier` (llmcompressor 0.14.0.1 in its own venv: it pins transformers
<= 5.17), on stock Qwen3-MoE and OLMoE folders both versions load and the same calibration tokens: the same experts
kept in every layer, saliency within 1e-5 relative, the same selection counts. `make test-llmcompressor`."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_qwenmoe_gb.prune import calibrate, choose_experts, keep_count, scores_of

from .stock_models import tiny_model

pytestmark = pytest.mark.llmcompressor
PYTHON = os.environ.get("QWENMOE_GB_LLMC_PYTHON")
SCRIPT = Path(__file__).with_name("llmcompressor_reap.py")


@pytest.mark.skipif(not PYTHON, reason="QWENMOE_GB_LLMC_PYTHON (the llm-compressor venv's python) is not set")
@pytest.mark.parametrize("family, sparsity", [("qwen3_moe", 0.25), ("qwen3_moe", 0.5), ("olmoe", 0.5)])
def test_reap_equals_llmcompressor(family, sparsity, tmp_path):
    model = tiny_model(family, 0, initializer_range=0.02, norm_topk_prob=family == "qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(1, 96, (6, 16), generator=torch.Generator().manual_seed(7))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([PYTHON, str(SCRIPT), str(tmp_path / "model"), str(tmp_path / "ids.json"), str(sparsity),
                    str(tmp_path / "reference.json")], check=True, env=env, timeout=600)  # fmt: skip
    reference = json.loads((tmp_path / "reference.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    stats = calibrate(loaded, {"calibration": ids})["calibration"]
    ours = scores_of(stats, "reap")  # (L, E)
    num_experts = ours.shape[1]
    keep = num_experts - int(num_experts * sparsity)  # llm-compressor drops int(E · sparsity)
    assert keep == keep_count(num_experts, None, 1 - sparsity)
    kept = choose_experts(ours, keep)
    layers = sorted(reference["layers"], key=lambda name: int(name.split(".")[2]))
    assert len(layers) == len(kept)
    for layer, name in enumerate(layers):
        theirs = reference["layers"][name]
        assert kept[layer] == theirs["retained"], name
        assert stats["counts"][layer].tolist() == theirs["count"], name
        torch.testing.assert_close(ours[layer], torch.tensor(theirs["saliency"], dtype=torch.float64), rtol=1e-5,
                                   atol=0)  # fmt: skip
    assert reference["num_experts"] == keep
    print(f"{family} sparsity {sparsity}: kept {kept}")
