"""Run llm-compressor's REAPPruningModifier (in its own venv) on a model folder and calibration token ids; write the
experts it keeps and its saliency scores per MoE layer as JSON. Usage (the venv's python):

    python tests/llmcompressor_reap.py MODEL_DIR IDS.json SPARSITY OUT.json

IDS.json: a list of equal-length token-id lists. The saliency and counts are read where llm-compressor computes them
(`REAPSaliencyTracker.compute_retained_experts`), paired with the layer it then prunes (`prune_moe_layer`).

`oneshot` runs its `basic` pipeline: the model's own forward. Its default `sequential` pipeline (0.14.0.1, with
transformers 5.17) ran the tiny Qwen3-MoE's attention without the causal mask during calibration (each layer's input
equals a forward with a full attention mask), so its scores are those of another computation."""

import json
import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.reap import base
from llmcompressor.modifiers.pruning.reap.utils import REAPSaliencyTracker
from transformers import AutoModelForCausalLM

PIPELINE = "basic"  # see the module docstring


def main(model_dir: str, ids_path: str, sparsity: float, out_path: str) -> None:
    ids = json.loads(open(ids_path).read())
    found, pending = {}, {}
    compute = REAPSaliencyTracker.compute_retained_experts

    def recorded_compute(self, *args, **kwargs):
        pending["saliency"], pending["count"] = self.mean_saliency.tolist(), self.count.cpu().tolist()
        return compute(self, *args, **kwargs)

    prune_layer = base.prune_moe_layer

    def recorded_prune(model, layer_name, retained, attrs):
        found[layer_name] = {
            "retained": list(retained),
            "saliency": pending.pop("saliency"),
            "count": pending.pop("count"),
        }
        return prune_layer(model, layer_name, retained, attrs)

    REAPSaliencyTracker.compute_retained_experts = recorded_compute
    base.prune_moe_layer = recorded_prune
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": ids})
    oneshot(
        model=model,
        dataset=data,
        recipe=base.REAPPruningModifier(sparsity=sparsity),
        num_calibration_samples=len(ids),
        max_seq_length=len(ids[0]),
        shuffle_calibration_samples=False,
        pipeline=PIPELINE,
    )
    json.dump({"layers": found, "num_experts": model.config.num_experts}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
