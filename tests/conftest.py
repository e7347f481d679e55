import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# prepared data of every test run (and of the processes the tests start) in a folder of this session, not ~/.cache
os.environ["QWENMOE_GB_DATA_CACHE"] = tempfile.mkdtemp(prefix="qwenmoe-gb-data-cache-")

from modeling_qwenmoe_gb import QwenMoeGBConfig  # noqa: E402


def tiny_config(**overrides) -> QwenMoeGBConfig:
    """The HF-tester-sized config: vocab 99, hidden 32, 2 layers, 8 experts top-2, shared expert."""
    fields = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        router_aux_loss_coef=0.1,
        pad_token_id=0,
    )
    fields.update(overrides)
    return QwenMoeGBConfig(**fields)


@pytest.fixture
def config() -> QwenMoeGBConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
