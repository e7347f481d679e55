"""Generation is exact: with the KV cache == without it, token for token, for QwenMoE-GB and, through the same
checks, transformers' own Qwen2-MoE as a control (greedy and beam search; eager and sdpa attention; dynamic and static
cache; a left-padded batch; continuing from a returned cache and from `inputs_embeds`; compiled decoding)."""

import logging
import warnings

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.generation import CompileConfig

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.modeling_qwenmoe_gb import CACHE_ARG

from .conftest import tiny_config

NEW_TOKENS = 12


def make_model(kind: str, attn: str = "eager", **overrides):
    """Our tiny model, or transformers' Qwen2-MoE with the same architecture and weights (the control)."""
    ours = QwenMoeGBForCausalLM._from_config(tiny_config(**overrides), attn_implementation=attn).eval()
    for p in ours.parameters():  # larger weights than the default init: the argmax of every step is decisive
        torch.nn.init.normal_(p, std=0.3)
    if kind == "ours":
        return ours
    fields = {k: v for k, v in tiny_config(**overrides).to_dict().items() if k in Qwen2MoeConfig.__dataclass_fields__}
    control = Qwen2MoeForCausalLM._from_config(Qwen2MoeConfig(**fields), attn_implementation=attn).eval()
    missing, unexpected = control.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and all(k.endswith("expert_bias") or "step_expert_counts" in k for k in unexpected)
    return control


def left_padded_batch(vocab: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 7 and 4 tokens, the shorter one left-padded with token 0."""
    ids = torch.randint(1, vocab, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def greedy(model, ids, mask, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, **kwargs}
    return model.generate(ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("kind", ["ours", "control"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_with_cache_equals_without(kind, attn, cache):
    model = make_model(kind, attn)
    ids, mask = left_padded_batch()
    reference = greedy(model, ids, mask, use_cache=False)
    cached = greedy(model, ids, mask, use_cache=True, cache_implementation=cache)
    assert cached.shape == (2, 7 + NEW_TOKENS)
    assert len(set(reference[:, 7:].flatten().tolist())) > 2  # a real sequence, not one repeated token
    torch.testing.assert_close(cached, reference, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ours", "control"])
def test_beam_search_with_cache_equals_without(kind):
    model = make_model(kind)
    ids, mask = left_padded_batch()
    beams = {"num_beams": 3, "num_return_sequences": 2}
    torch.testing.assert_close(
        greedy(model, ids, mask, use_cache=True, **beams), greedy(model, ids, mask, use_cache=False, **beams)
    )


def test_greedy_equals_argmax_of_full_forwards():
    """The reference without transformers' generation loop: one full forward per new token, argmax of the last."""
    model = make_model("ours")
    ids = torch.randint(1, 99, (1, 5))
    expected = ids
    for _ in range(NEW_TOKENS):
        next_token = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_token], dim=1)
    torch.testing.assert_close(greedy(model, ids, torch.ones_like(ids)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ours", "control"])
def test_continue_from_returned_cache(kind):
    model = make_model(kind)
    ids, mask = left_padded_batch()
    full = greedy(model, ids, mask)
    first = greedy(model, ids, mask, max_new_tokens=5, return_dict_in_generate=True)
    cache = getattr(first, CACHE_ARG)
    assert cache is not None and cache.get_seq_length() == 7 + 5 - 1  # the last token is not in the cache yet
    mask2 = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], dim=1)
    rest = model.generate(
        first.sequences, attention_mask=mask2, max_new_tokens=NEW_TOKENS - 5, do_sample=False, pad_token_id=0,
        **{CACHE_ARG: cache},
    )  # fmt: skip
    torch.testing.assert_close(rest, full, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ours", "control"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_from_inputs_embeds(kind, use_cache):
    model = make_model(kind)
    ids, mask = left_padded_batch()
    embeds = model.get_input_embeddings()(ids)
    from_ids = greedy(model, ids, mask, use_cache=use_cache)
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        use_cache=use_cache,
    )  # fmt: skip
    torch.testing.assert_close(from_embeds, from_ids[:, 7:], rtol=0, atol=0)  # only the new tokens come back


@pytest.mark.parametrize("kind", ["ours", "control"])
def test_continue_from_inputs_embeds_and_cache(kind):
    """transformers' `test_generate_continue_from_inputs_embeds`: prompt as embeddings, then continue with the
    returned cache and the embeddings of the whole sequence so far."""
    model = make_model(kind)
    ids = torch.randint(1, 99, (2, 6))
    embed = model.get_input_embeddings()
    full = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    first = model.generate(
        inputs_embeds=embed(ids), max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    so_far = torch.cat([ids, first.sequences], dim=1)
    rest = model.generate(
        inputs_embeds=embed(so_far), max_new_tokens=5, do_sample=False, pad_token_id=0,
        **{CACHE_ARG: getattr(first, CACHE_ARG)},
    )  # fmt: skip
    torch.testing.assert_close(torch.cat([so_far, rest], dim=1), full, rtol=0, atol=0)


def test_compiled_static_cache_generation_equals_eager():
    """`generate` with a static cache compiles the decoding forward (full graph: `_can_compile_fullgraph`); forced on
    CPU here, which transformers otherwise compiles only on accelerators."""
    assert QwenMoeGBForCausalLM._can_compile_fullgraph
    model = make_model("ours", "sdpa")
    ids, mask = left_padded_batch()
    eager = greedy(model, ids, mask, use_cache=False)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    compiled = greedy(model, ids, mask, cache_implementation="static", compile_config=compile_config)
    assert model._compiled_call is not None  # the compiled forward really ran
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_forward_and_generate_raise_no_transformers_deprecation(caplog):
    """No FutureWarning / DeprecationWarning (or transformers' logged deprecation) caused by our calls: forward with
    and without cache, training forward with labels, generation."""
    model = make_model("ours")
    ids, mask = left_padded_batch()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("always")
        model(ids, attention_mask=mask, use_cache=True)
        model.train()(ids, attention_mask=mask, labels=ids).loss.backward()
        model.eval()
        greedy(model, ids, mask)
        greedy(model, ids, mask, num_beams=2)
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()], caplog.text


def test_cache_accepted_under_both_names():
    """`cache=` (transformers >= 5.24) and `past_key_values=` (earlier) give the same cached step; both at once is an
    error naming the fields."""
    model = make_model("ours")
    ids = torch.randint(1, 99, (1, 6))
    full = model(ids, use_cache=False).logits[:, -1]
    for name in ("cache", "past_key_values"):
        prefix = model(ids[:, :5], use_cache=True)
        step = model(ids[:, 5:], use_cache=True, **{name: getattr(prefix, CACHE_ARG)})
        torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)
    prefix = getattr(model(ids[:, :5], use_cache=True), CACHE_ARG)
    with pytest.raises(ValueError, match="(cache.*past_key_values|past_key_values.*cache)"):
        model(ids[:, 5:], cache=prefix, past_key_values=prefix)


@pytest.mark.parametrize("kind", ["ours", "control"])
@pytest.mark.parametrize("base", [False, True], ids=["causal_lm", "base_model"])
def test_bc_cache_name_forward(kind, base):
    """transformers' `test_bc_cache_name_forward` (5.24 `test_modeling_common.py`), run as transformers runs it on its
    Qwen2-MoE (the control): on transformers >= 5.24 a forward given the old name `past_key_values` warns
    "`past_key_values` is deprecated" and still works (the same cache and logits as `cache=`); before 5.24 that name
    is the current one and nothing warns."""
    from transformers.cache_utils import DynamicCache

    model = make_model(kind)
    model = model.model if base else model
    ids = torch.randint(1, 99, (2, 6))
    assert type(getattr(model(ids, use_cache=True), CACHE_ARG)) is DynamicCache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = model(ids, use_cache=True, past_key_values=DynamicCache(config=model.config))
    warned = any("`past_key_values` is deprecated" in str(w.message) for w in caught)
    assert warned is (CACHE_ARG == "cache"), [str(w.message) for w in caught]
    new = model(ids, use_cache=True, **{CACHE_ARG: DynamicCache(config=model.config)})
    old_cache, new_cache = getattr(old, CACHE_ARG), getattr(new, CACHE_ARG)
    assert old_cache.get_seq_length() == new_cache.get_seq_length() == 6
    for a, b in zip(old_cache.layers, new_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
    out = "last_hidden_state" if base else "logits"
    torch.testing.assert_close(getattr(old, out), getattr(new, out), rtol=0, atol=0)
