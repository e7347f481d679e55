"""The docs' Python examples as tests (Sybil).

Every ```python block of README.md and docs/ runs under pytest, in page order, one namespace per page, inside a fresh
temporary folder (what an example saves lands there). A page's hidden setup (`<!-- invisible-code-block: python -->`)
calls `save_standin(name, family)`: a tiny model of that transformers family saved under the Hub name the example
loads, so `from_pretrained("Qwen/Qwen3-0.6B")` runs offline on the same code path. `<!-- skip: next "reason" -->`
marks the few that need several GPUs or a long run, with the reason on the page.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the examples load only what the page's setup saved

import torch
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


def save_standin(name: str, family: str) -> str:
    """Save a tiny randomly initialised `family` model (and no tokenizer) in the folder `name`; return `name`."""
    import transformers

    import modeling_qwenmoe_gb as qgb

    torch.manual_seed(0)
    if family == "qwenmoe_gb":
        model = qgb.QwenMoeGBForCausalLM(qgb.load_preset("tiny"))
    else:
        extra = {
            "qwen3": dict(head_dim=8),
            "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                              shared_expert_intermediate_size=32),
            "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                                first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, num_key_value_heads=4),
        }[family]  # fmt: skip
        config = transformers.AutoConfig.for_model(family, **{**TINY, **extra})
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(name)
    return name


class _InTemporaryFolder:
    def __init__(self):
        self.stack: list[tuple[str, tempfile.TemporaryDirectory]] = []

    def setup(self, namespace: dict) -> None:
        folder = tempfile.TemporaryDirectory(prefix="qwenmoe-gb-docs-")
        self.stack.append((os.getcwd(), folder))
        os.chdir(folder.name)
        namespace["save_standin"] = save_standin

    def teardown(self, namespace: dict) -> None:
        previous, folder = self.stack.pop()
        os.chdir(previous)
        folder.cleanup()  # what the page's examples saved


_folder = _InTemporaryFolder()
pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["README.md", "docs/*.md", "docs/guides/*.md", "docs/reference/*.md"],
    setup=_folder.setup,
    teardown=_folder.teardown,
).pytest()
