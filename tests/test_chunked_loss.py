"""The chunked LM-head + cross-entropy loss equals transformers' `ForCausalLMLoss` on full logits (value and every
gradient), in the model too, and no (T, V) tensor is kept for backward in a training step."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.modeling_qwenmoe_gb import chunked_linear_cross_entropy

from .conftest import tiny_config

V, D = 50, 16


def reference(hidden, weight, labels, **kwargs):
    """transformers' path: the LM head's full (B, S, V) logits, then its causal-LM loss."""
    return ForCausalLMLoss(hidden @ weight.t(), labels, V, **kwargs)


def grads(fn, hidden, weight, labels, **kwargs):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight, labels, **kwargs)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


def inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, D, generator=gen).to(dtype)
    weight = (torch.randn(V, D, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, V, (3, 11), generator=gen)
    labels[1, :4] = -100  # left padding
    labels[2, 7] = -100  # an ignored token inside a sequence
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 33, 1000])
@pytest.mark.parametrize("num_items", [None, 25])
def test_equals_transformers_loss_and_gradients_fp32(chunk_size, num_items):
    hidden, weight, labels = inputs()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    got = grads(chunked_linear_cross_entropy, hidden, weight, labels, chunk_size=chunk_size, **kwargs)
    expected = grads(reference, hidden, weight, labels, **kwargs)
    for a, b, name in zip(got, expected, ("loss", "d hidden", "d weight")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_shift_labels_and_ignore_index():
    hidden, weight, labels = inputs()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    sevens = labels.masked_fill(labels == -100, 7)  # another ignore index
    for case, kwargs in ((labels, {"shift_labels": shifted}), (sevens, {"ignore_index": 7})):
        got = grads(chunked_linear_cross_entropy, hidden, weight, case, chunk_size=5, **kwargs)
        expected = grads(reference, hidden, weight, case, **kwargs)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_within_bf16_tolerance():
    hidden, weight, labels = inputs(torch.bfloat16)
    got = grads(chunked_linear_cross_entropy, hidden, weight, labels, chunk_size=6)
    expected = grads(reference, hidden, weight, labels)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tied", [True, False])
def test_model_training_loss_equals_the_full_logits_path(tied):
    """In training with labels the model uses the chunked loss (no logits come back); with `return_logits=True` it
    takes transformers' path. Loss and every parameter gradient agree, tied or untied embeddings, padded batch."""
    cfg = tiny_config(tie_word_embeddings=tied, loss_chunk_size=5)
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(cfg).train()
    ids = torch.randint(1, 99, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for return_logits in (None, True):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=return_logits)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (chunked, chunked_grads), (full, full_grads) = results
    assert chunked.logits is None and full.logits.shape == (2, 9, 99)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert chunked_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    model.eval()  # evaluation and generation keep their logits
    assert model(input_ids=ids, labels=labels).logits.shape == (2, 9, 99)


def test_logits_to_keep_and_num_items_in_the_model():
    cfg = tiny_config(loss_chunk_size=3)
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(cfg).train()
    ids = torch.randint(1, 99, (2, 9))
    kwargs = {"labels": ids[:, -4:], "logits_to_keep": 4, "num_items_in_batch": torch.tensor(5)}
    chunked = model(input_ids=ids, add_balance_loss=False, **kwargs).loss
    full = model(input_ids=ids, add_balance_loss=False, return_logits=True, **kwargs).loss
    torch.testing.assert_close(chunked, full)
    full_config = QwenMoeGBForCausalLM(tiny_config(loss_implementation="full"))
    full_config.load_state_dict(model.state_dict())
    out = full_config.train()(input_ids=ids, labels=ids)
    assert out.logits is not None  # the switch: transformers' path in training too


def _saved_shapes(model, ids) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward during one training forward."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return shapes


def test_no_tokens_by_vocabulary_tensor_is_saved_for_backward():
    """Checked from what autograd saves, not from the code: the chunked path keeps nothing of T × V elements (the
    full path, run as a control, does)."""
    vocab, tokens = 4096, 2 * 64
    ids = torch.randint(0, vocab, (2, 64))
    for implementation, chunk, expect_full in (("chunked", 32, False), ("full", 32, True), ("chunked", 128, True)):
        torch.manual_seed(0)  # the last: the whole batch is one chunk, the plain path
        cfg = tiny_config(vocab_size=vocab, loss_implementation=implementation, loss_chunk_size=chunk)
        model = QwenMoeGBForCausalLM(cfg).train()
        largest = max(torch.Size(s).numel() for s in _saved_shapes(model, ids))
        assert (largest >= tokens * vocab) is expect_full, (implementation, largest)


def test_chunked_loss_compiles_as_one_graph_and_equals_eager():
    """`torch.compile(fullgraph=True)` of a training step through the chunked loss (several chunks) equals eager."""
    import copy

    cfg = tiny_config(loss_chunk_size=7)
    torch.manual_seed(0)
    eager = QwenMoeGBForCausalLM(cfg).train()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    ids = torch.randint(1, 99, (2, 16))
    losses = []
    for model in (eager, compiled):
        out = model(input_ids=ids, labels=ids, add_balance_loss=False)
        assert out.logits is None
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    params = dict(compiled.named_parameters())
    for name, param in eager.named_parameters():
        torch.testing.assert_close(params[f"_orig_mod.{name}"].grad, param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_recompiles_with_dynamic_shapes_and_another_config():
    """A second compile in the same process with another sequence length and z-loss coefficient (dynamo then treats
    sizes and config floats as symbolic): the chunked loss and the router statistics still trace as one graph."""
    torch._dynamo.reset()
    for coef, seq in ((0.01, 16), (0.0, 24)):
        torch.manual_seed(0)
        eager = QwenMoeGBForCausalLM(tiny_config(loss_chunk_size=7, router_z_loss_coef=coef)).train()
        compiled = torch.compile(eager, fullgraph=True)
        ids = torch.randint(1, 99, (2, seq))
        loss = compiled(input_ids=ids, labels=ids, add_balance_loss=False).loss
        torch.testing.assert_close(loss, eager(input_ids=ids, labels=ids, add_balance_loss=False).loss)
        loss.backward()


def test_liger_switch_falls_back_to_the_chunked_loss_where_liger_cannot_run(caplog):
    # CPU (and no liger_kernel here): the chunked loss, logits None, and one warning naming the reason
    cfg = tiny_config(loss_chunk_size=5, loss_implementation="liger")
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(cfg).train()
    chunked = QwenMoeGBForCausalLM(tiny_config(loss_chunk_size=5)).train()
    chunked.load_state_dict(model.state_dict())
    ids = torch.randint(1, 99, (2, 9))
    with caplog.at_level("WARNING"):
        out = model(input_ids=ids, labels=ids, add_balance_loss=False)
    assert out.logits is None
    torch.testing.assert_close(out.loss, chunked(input_ids=ids, labels=ids, add_balance_loss=False).loss)
    assert "loss_implementation='liger' needs the liger_kernel package and a CUDA device" in caplog.text


def test_liger_switch_calls_liger_causal_lm_loss_with_its_signature(monkeypatch):
    # Where Liger runs, the head hands it what `LigerForCausalLMLoss(hidden_states, lm_head_weight, labels,
    # hidden_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs)` takes; a stand-in with
    # that signature computes transformers' loss, so the model's loss must equal the full-logits path.
    import modeling_qwenmoe_gb.modeling_qwenmoe_gb as modeling

    calls = []

    def liger_stand_in(hidden_states, lm_head_weight, labels, hidden_size, num_items_in_batch=None,
                       ignore_index=-100, shift_labels=None, **kwargs):  # fmt: skip
        calls.append((tuple(hidden_states.shape), hidden_size, hidden_states.is_contiguous()))
        hidden = hidden_states.view(-1, hidden_size)  # what Liger does: fails unless contiguous
        logits = (hidden @ lm_head_weight.t()).view(*hidden_states.shape[:-1], -1)
        return ForCausalLMLoss(logits, labels, lm_head_weight.shape[0], num_items_in_batch, ignore_index,
                               shift_labels)  # fmt: skip

    monkeypatch.setattr(modeling, "liger_causal_lm_loss", lambda device: liger_stand_in)
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(tiny_config(loss_implementation="liger")).train()
    ids = torch.randint(1, 99, (2, 9))
    kwargs = {"labels": ids[:, -4:], "logits_to_keep": 4, "num_items_in_batch": torch.tensor(5)}
    liger = model(input_ids=ids, add_balance_loss=False, **kwargs)
    full = model(input_ids=ids, add_balance_loss=False, return_logits=True, **kwargs)
    assert liger.logits is None and calls == [((2, 4, 32), 32, True)]
    torch.testing.assert_close(liger.loss, full.loss)
