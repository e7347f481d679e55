"""Routing replay on the model: `forward(routed_experts=...)`, `output_routed_experts`, `generate(...,
output_routed_experts=True)`, the fp32 router linear, and what the balance statistics count under replay.

References: the model's own routing replayed (identical logits), a manual decoding loop with a KV cache (the routing
generation records), a float64 re-derivation of the gate weights at replayed experts, `torch.bincount` of the replayed
experts (the counts), an fp64 product (the fp32 router linear)."""

import pytest
import torch

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.balance import GlobalBalancer
from modeling_qwenmoe_gb.modeling_qwenmoe_gb import CACHE_ARG

from .conftest import tiny_config

CONFIGS = {
    "shared": {},
    "qwen3_shape": dict(shared_expert_intermediate_size=0, use_qk_norm=True, norm_topk_prob=True),
    "sigmoid_no_norm": dict(router_scoring_func="sigmoid", norm_topk_prob=False),
    "dense_layer": dict(num_hidden_layers=3, mlp_only_layers=[1]),
}


def model_for(name: str, **overrides) -> QwenMoeGBForCausalLM:
    return QwenMoeGBForCausalLM(tiny_config(**{**CONFIGS[name], **overrides})).eval()


def padded_batch(vocab: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_replaying_own_routing_changes_nothing(name):
    model = model_for(name)
    ids, mask = padded_batch()
    free = model(ids, attention_mask=mask, output_routed_experts=True)
    num_moe = len(model.config.moe_layer_indices())
    assert free.routed_experts.shape == (3, 9, num_moe, model.config.num_experts_per_tok)
    assert free.routed_experts.dtype == torch.long
    replayed = model(ids, attention_mask=mask, routed_experts=free.routed_experts, output_routed_experts=True)
    assert torch.equal(replayed.logits, free.logits)
    assert torch.equal(replayed.routed_experts, free.routed_experts)
    for field in ("counts", "prob_sums", "num_tokens"):
        assert torch.equal(getattr(replayed.router_stats, field), getattr(free.router_stats, field))


def test_aux_free_bias_is_replayed_not_reapplied():
    """With a nonzero aux-free bias the selection differs from the plain top-k; replaying the biased selection on a
    model whose bias was reset gives the biased model's output (the bias moves the selection only)."""
    biased = model_for("shared", aux_free=True)
    for router in biased.model.moe_routers():
        router.expert_bias.copy_(torch.randn_like(router.expert_bias))
    plain = model_for("shared", aux_free=True)
    plain.load_state_dict(biased.state_dict())
    for router in plain.model.moe_routers():
        router.expert_bias.zero_()
    ids, mask = padded_batch()
    out = biased(ids, attention_mask=mask, output_routed_experts=True)
    assert not torch.equal(plain(ids, attention_mask=mask).logits, out.logits)
    assert torch.equal(plain(ids, attention_mask=mask, routed_experts=out.routed_experts).logits, out.logits)


@pytest.mark.parametrize("norm", [True, False])
def test_gate_weights_are_current_scores_at_replayed_experts(norm):
    """float64 re-derivation: weights = softmax(h Wᵀ) at the given experts (normalised with norm_topk_prob), and the
    router's weight gets a gradient through them."""
    model = model_for("shared", norm_topk_prob=norm).train()
    router = model.model.moe_routers()[0]
    hidden = torch.randn(10, 32, requires_grad=True)
    replay = torch.stack([torch.randperm(8)[:2] for _ in range(10)])  # (T, K) arbitrary, distinct per row
    replay[3] = -1  # routed as usual
    _, weights, index, _ = router(hidden, replay)
    probs = (hidden.double() @ router.weight.double().T).softmax(-1)  # (T, E)
    expected_index = replay.clone()
    expected_index[3] = probs[3].topk(2).indices
    expected = probs.gather(-1, expected_index)
    if norm:
        expected = expected / expected.sum(-1, keepdim=True)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-7)
    weights.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_rows_of_minus_one_route_as_usual_and_other_rows_follow_the_replay():
    model = model_for("qwen3_shape")
    ids, mask = padded_batch()
    free = model(ids, attention_mask=mask, output_routed_experts=True).routed_experts
    other = (free + 1) % model.config.num_experts  # every token to other experts
    other[:, ::2] = -1  # even positions: route as usual
    out = model(ids, attention_mask=mask, routed_experts=other, output_routed_experts=True)
    assert torch.equal(out.routed_experts[:, 1::2], other[:, 1::2])
    # the first position's hidden states do not depend on later positions: its free routing is the same
    assert torch.equal(out.routed_experts[:, 0], free[:, 0])
    assert not torch.equal(out.logits, model(ids, attention_mask=mask).logits)


def test_balance_counts_the_replayed_experts():
    """The statistics and the step buffer count the experts used: torch.bincount of the replayed indices over the
    real (non-padding) tokens, per layer; the aux-free update moves the bias from those counts."""
    model = model_for("shared", aux_free=True, balance_scope="global").train()
    ids, mask = padded_batch()
    num_moe = len(model.config.moe_layer_indices())
    replay = torch.stack([torch.randperm(8)[:2] for _ in range(3 * 9 * num_moe)]).view(3, 9, num_moe, 2)
    balancer = GlobalBalancer(model)
    out = model(ids, attention_mask=mask, labels=ids, routed_experts=replay, add_balance_loss=False)
    loss, _ = balancer(out.router_stats)
    (out.loss + loss).backward()
    real = mask.bool()
    for layer in range(num_moe):
        expected = torch.bincount(replay[:, :, layer][real].flatten(), minlength=8)
        assert torch.equal(out.router_stats.counts[layer].sum(0).long(), expected)
        assert torch.equal(balancer.step_counts[layer], expected)
    balancer.step()
    bias = model.model.moe_routers()[0].expert_bias
    counts = torch.bincount(replay[:, :, 0][real].flatten(), minlength=8).double()
    rate = model.config.aux_free_bias_update_rate
    torch.testing.assert_close(bias.double(), rate * torch.sign(counts.mean() - counts), rtol=0, atol=1e-9)


@pytest.mark.parametrize("bad, message", [
    (lambda r: r[:, :-1], "has shape"),
    (lambda r: r[..., :1], "has shape"),
    (lambda r: r.float(), "dtype"),
    (lambda r: torch.where(r == r.max(), torch.full_like(r, 8), r), "outside 0..7"),
    (lambda r: torch.cat([r[..., :1], torch.full_like(r[..., 1:], -1)], -1), "outside 0..7"),
    (lambda r: r[..., :1].expand(r.shape).clone(), "twice"),
])  # fmt: skip
def test_bad_routed_experts_are_refused(bad, message):
    model = model_for("shared")
    ids, _ = padded_batch()
    routed = model(ids, output_routed_experts=True).routed_experts
    with pytest.raises(ValueError, match=message):
        model(ids, routed_experts=bad(routed))


def manual_decode(model, prompt: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor):
    """Feed `tokens` (B, N) one by one after the prompt with a KV cache, as generation does: the routing of every
    position run (B, P + N - 1, L, K) and the log-probs of `tokens` (B, N)."""
    out = model(prompt, attention_mask=mask, use_cache=True, output_routed_experts=True)
    routing, logps = [out.routed_experts], []
    logits = out.logits[:, -1]
    for step in range(tokens.shape[1]):
        logps.append(torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, step : step + 1])[:, 0])
        if step == tokens.shape[1] - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(tokens[:, step : step + 1], attention_mask=mask, use_cache=True, output_routed_experts=True,
                    **{CACHE_ARG: getattr(out, CACHE_ARG)})  # fmt: skip
        routing.append(out.routed_experts)
        logits = out.logits[:, -1]
    return torch.cat(routing, 1), torch.stack(logps, 1)


@pytest.mark.parametrize("name", ["shared", "qwen3_shape", "dense_layer"])
def test_generate_records_the_routing_and_replay_reproduces_the_rollout(name):
    model = model_for(name)
    prompt, mask = padded_batch()
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=7, do_sample=True, output_routed_experts=True,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0)  # fmt: skip
    seq = out.sequences
    assert out.routed_experts.shape == (*seq.shape, len(model.config.moe_layer_indices()), 2)
    assert (out.routed_experts[:, -1] == -1).all() and (out.routed_experts[:, :-1] >= 0).all()
    # the reference: a manual decoding loop with a KV cache over the same tokens
    new = seq[:, prompt.shape[1] :]
    routing, manual_logps = manual_decode(model, prompt, mask, new)
    assert torch.equal(out.routed_experts[:, :-1], routing)
    rollout_logps = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1).gather(-1, new[..., None])
    torch.testing.assert_close(rollout_logps[..., 0], manual_logps, rtol=0, atol=1e-6)
    # a training forward over the whole sequence replays it: the same experts, the rollout's log-probs
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    train = model(seq, attention_mask=full_mask, routed_experts=out.routed_experts, output_routed_experts=True)
    real = full_mask.bool()[:, :-1]
    assert torch.equal(train.routed_experts[:, :-1][real], out.routed_experts[:, :-1][real])
    train_logps = torch.log_softmax(train.logits[:, prompt.shape[1] - 1 : -1].float(), -1).gather(-1, new[..., None])
    torch.testing.assert_close(train_logps, rollout_logps, rtol=0, atol=1e-5)


def test_generate_refuses_what_it_cannot_record():
    model = model_for("shared")
    prompt, _ = padded_batch()
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(prompt, max_new_tokens=2, output_routed_experts=True, pad_token_id=0)
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(prompt, max_new_tokens=2, num_beams=2, output_routed_experts=True,
                       return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(prompt, max_new_tokens=2, use_cache=False, output_routed_experts=True,
                       return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    plain = model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # unchanged without the flag
    assert plain.shape == (3, 11)


def test_fp32_router_linear():
    """`router_dtype="float32"`: the router logits of a bf16 model are the fp32 product of the upcast operands (an
    fp64 reference within fp32 rounding), and stay so under bf16 autocast; `"auto"` computes them in bf16."""
    hidden = torch.randn(16, 32).bfloat16()
    logits = {}
    for dtype in ("auto", "float32"):
        model = model_for("shared", router_dtype=dtype)
        model.load_state_dict(model_for("shared").state_dict())
        router = model.to(torch.bfloat16).model.moe_routers()[0]
        logits[dtype] = router(hidden)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits[f"{dtype}_autocast"] = router(hidden.float())[0]
    reference = hidden.double() @ router.weight.double().T
    assert logits["float32"].dtype == torch.float32 and logits["float32_autocast"].dtype == torch.float32
    torch.testing.assert_close(logits["float32"].double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits["float32_autocast"].double(), reference, rtol=1e-6, atol=1e-6)
    assert logits["auto"].dtype == torch.bfloat16 and logits["auto_autocast"].dtype == torch.bfloat16
    assert (logits["auto"].double() - reference).abs().max() > 1e-4  # bf16 rounding is visible


def test_router_dtype_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match=r"router_dtype='fp16' is unknown: allowed \['auto', 'float32'\]"):
        tiny_config(router_dtype="fp16")
    model = model_for("shared", router_dtype="float32")
    model.save_pretrained(tmp_path)
    again = QwenMoeGBForCausalLM.from_pretrained(tmp_path)
    assert again.config.router_dtype == "float32" and again.model.moe_routers()[0].fp32_logits
