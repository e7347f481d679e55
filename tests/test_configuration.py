"""Config validation and parameter counts."""

import pytest

from modeling_qwenmoe_gb import PRESETS, QwenMoeGBConfig, QwenMoeGBForCausalLM, load_preset

from .conftest import tiny_config

INVALID = [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok=0"),
    ({"balance_scope": "batch"}, "balance_scope='batch'"),
    ({"router_scoring_func": "tanh"}, "router_scoring_func='tanh'"),
    ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef=-0.1"),
    ({"micro_balance_coef": -1.0}, "micro_balance_coef=-1.0"),
    ({"device_balance_coef": -1.0}, "device_balance_coef=-1.0"),
    ({"router_z_loss_coef": -1e-3}, "router_z_loss_coef=-0.001"),
    ({"aux_free_bias_update_rate": -1e-3}, "aux_free_bias_update_rate=-0.001"),
    ({"aux_free": "yes"}, "aux_free='yes'"),
    ({"balance_group_size": 0}, "balance_group_size=0"),
    ({"device_balance_groups": 3}, "device_balance_groups=3"),
    ({"device_balance_groups": 0}, "device_balance_groups=0"),
    ({"device_balance_groups": [[0, 1, 2], [3, 4, 5]]}, "not a partition"),
    ({"device_balance_groups": [[0, 1, 2, 3], [3, 4, 5, 6, 7]]}, "not a partition"),
    ({"device_balance_groups": [[0, 1, 2, 3], [4, 5, 6, 7, 8]]}, "not a partition"),
    ({"device_balance_groups": [[0, 1, 2, 3], []]}, "device_balance_groups"),
    ({"device_balance_groups": "two"}, "device_balance_groups='two'"),
]


@pytest.mark.parametrize("overrides,message", INVALID)
def test_invalid_fields_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match="allowed|required|partition|divisor") as err:
        tiny_config(**overrides)
    assert message in str(err.value)
    assert next(iter(overrides)) in str(err.value)


def test_groups_normalised_and_expanded():
    assert tiny_config(device_balance_groups=4).expert_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    explicit = tiny_config(device_balance_groups=[[7, 0, 1], [2, 3, 4, 5, 6]])
    assert explicit.device_balance_groups == [[0, 1, 7], [2, 3, 4, 5, 6]]
    assert tiny_config().expert_groups() is None
    ep = tiny_config(device_balance_groups="ep")  # resolved by the loaded model, not by the config
    assert ep.device_balance_groups == "ep"
    with pytest.raises(ValueError, match="read from the loaded model"):
        ep.expert_groups()


def test_config_round_trip(tmp_path):
    cfg = tiny_config(balance_scope="sequence", device_balance_groups=[[0, 1, 2], [3, 4, 5, 6, 7]], aux_free=True)
    cfg.save_pretrained(tmp_path)
    again = QwenMoeGBConfig.from_pretrained(tmp_path)
    for name in ("balance_scope", "device_balance_groups", "aux_free", "router_aux_loss_coef", "head_dim"):
        assert getattr(again, name) == getattr(cfg, name)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"shared_expert_intermediate_size": 0},
        {"use_qk_norm": True},
        {"use_qk_norm": True, "attention_bias": True},
        {"qkv_bias": False},
        {"mlp_only_layers": [0]},
        {"decoder_sparse_step": 2, "num_hidden_layers": 3},
        {"num_key_value_heads": 4, "head_dim": 16},
    ],
)
def test_num_params_matches_the_model(overrides):
    cfg = tiny_config(**overrides)
    model = QwenMoeGBForCausalLM(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_expert = routed // (cfg.num_experts * len(cfg.moe_layer_indices()))
    inactive = (cfg.num_experts - cfg.num_experts_per_tok) * per_expert * len(cfg.moe_layer_indices())
    assert cfg.num_active_params() == cfg.num_params() - inactive


@pytest.mark.parametrize(
    "name,total,active",
    [
        ("qwenmoe-gb-3.4b-a0.6b", 3.4e9, 0.6e9),
        ("qwenmoe-gb-15b-a2.54b", 15e9, 2.54e9),
        ("qwenmoe-gb-43b-a6.6b", 43e9, 6.6e9),
    ],
)
def test_paper_presets_land_on_the_paper_sizes(name, total, active):
    cfg = load_preset(name)
    assert cfg.num_params() == pytest.approx(total, rel=0.015)
    assert cfg.num_active_params() == pytest.approx(active, rel=0.015)
    assert cfg.num_experts_per_tok == 4 and cfg.shared_expert_intermediate_size == 4 * cfg.moe_intermediate_size


def test_presets_listed_and_unknown_rejected():
    assert "tiny" in PRESETS
    assert load_preset("tiny", balance_scope="micro").balance_scope == "micro"
    with pytest.raises(ValueError, match="preset='nope' is unknown"):
        load_preset("nope")
