"""The custom-model contract of vLLM's and SGLang's Transformers backends (vLLM docs "Writing custom models"), checked
on the classes those backends load: `auto_map.AutoModel`, kwargs from the base model down to attention, attention
through `ALL_ATTENTION_FUNCTIONS`, `_supports_attention_backend`, an `experts` module with 3-D packed parameters and
the forward `(hidden_states, top_k_index, top_k_weights)`, the routing bias a persistent buffer of the router. The
engines themselves run the checkpoints in `tests/serving/` (`make test-serving`)."""

import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from modeling_qwenmoe_gb import QwenMoeGBModel
from modeling_qwenmoe_gb.modeling_qwenmoe_gb import QwenMoeGBSparseMoeBlock, hub_auto_map

from .conftest import tiny_config


def test_attention_goes_through_the_registered_interface_with_the_callers_kwargs():
    """A backend registers its own attention function and passes its own kwargs to the base model's forward; both
    must reach attention in every layer."""
    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs.get("engine_metadata")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("engine_probe", probe)
    model = QwenMoeGBModel(tiny_config()).eval()
    ids = torch.randint(1, 99, (2, 7))
    reference = model(ids).last_hidden_state
    model.set_attn_implementation("engine_probe")
    out = model(ids, engine_metadata="from-the-engine").last_hidden_state
    assert seen == [(0, "from-the-engine"), (1, "from-the-engine")]
    torch.testing.assert_close(out, reference)
    assert model.is_backend_compatible() and QwenMoeGBModel._supports_attention_backend


def test_moe_block_has_packed_experts_with_the_backend_signature_and_router_keeps_its_bias():
    model = QwenMoeGBModel(tiny_config(aux_free=True))
    block = model.layers[0].mlp
    assert isinstance(block, QwenMoeGBSparseMoeBlock)
    experts = block.experts
    assert [p.dim() for p in experts.parameters()] == [3, 3]  # packed: gate_up_proj (E, 2I, D), down_proj (E, D, I)
    assert list(inspect.signature(experts.forward).parameters) == ["hidden_states", "top_k_index", "top_k_weights"]
    assert (
        "expert_bias" in dict(block.gate.named_buffers())
        and "expert_bias" not in block.gate._non_persistent_buffers_set
    )
    assert "layers.0.mlp.gate.expert_bias" in model.state_dict()
    assert hub_auto_map()["AutoModel"] == "modeling_qwenmoe_gb.QwenMoeGBModel"
