"""Expert pruning (`modeling_qwenmoe_gb.prune`, `qwenmoe-gb prune`).

References: the pruned model against the unpruned one on the tokens whose routing never selects a dropped expert
(per family, transformers' own classes); `frequency` against the counts the balancer reads (the model's own
`RouterStats`, `any_moe.StockMoE`); `gate_sum` and `reap` against a float64 re-derivation from the weights
(the router's softmax and top-k, the experts' SwiGLU); llm-compressor's REAPPruningModifier in its own venv is
`tests/test_prune_llmcompressor.py` (`make test-llmcompressor`).
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.any_moe import StockMoE
from modeling_qwenmoe_gb.cli import main
from modeling_qwenmoe_gb.prune import (
    calibrate,
    check_keep,
    choose_experts,
    keep_count,
    pool,
    prune_sites,
    pruned_model,
    routing_groups,
    scores_of,
)

from .conftest import tiny_config
from .stock_models import NAMED, available, tiny_model
from .test_any_moe import FAMILIES as ANY_MOE
from .test_any_moe import family_params

FAMILIES = ("qwenmoe_gb", *NAMED)


def make(family: str, seed: int = 0, **overrides):
    if family == "qwenmoe_gb":  # aux-free bias set, group-limited routing, sigmoid scores: every per-expert tensor
        torch.manual_seed(seed)
        config = tiny_config(aux_free=True, n_group=2, topk_group=1, router_scoring_func="sigmoid",
                             norm_topk_prob=True, initializer_range=0.02, **overrides)  # fmt: skip
        model = QwenMoeGBForCausalLM(config)
        for layer in model.model.moe_routers():
            layer.expert_bias.copy_(torch.randn_like(layer.expert_bias) * 0.01)
        return model.eval()
    over = {"norm_topk_prob": True} if family in ("qwen2_moe", "qwen3_moe", "olmoe") else {}
    return tiny_model(family, seed, initializer_range=0.02, **{**over, **overrides}).eval()


def routing(model, ids: torch.Tensor):
    """Logits and each MoE layer's selected experts (T, K), read at the experts' input."""
    selected = []

    def hook(module, args, kwargs):
        selected.append(kwargs.get("top_k_index", args[1] if len(args) > 1 else None).clone())

    handles = [s.experts.register_forward_pre_hook(hook, with_kwargs=True) for s in prune_sites(model)]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    for handle in handles:
        handle.remove()
    return logits, selected


def untouched_prefix(selected: list[torch.Tensor], kept: list[list[int]], shape) -> torch.Tensor:
    """(B, S) True where no MoE layer selected a dropped expert for this token or any token before it (attention
    reads the earlier tokens)."""
    clean = torch.ones(shape, dtype=torch.bool)
    for layer, index in enumerate(selected):
        dropped = torch.tensor([e for e in range(int(index.max()) + 1 + 16) if e not in kept[layer]])
        clean &= ~torch.isin(index, dropped).any(-1).view(shape)
    return clean.int().cumprod(-1).bool()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f == "qwenmoe_gb" or available(f)])
def test_pruned_model_equals_the_original_on_tokens_never_routed_to_dropped_experts(family, tmp_path):
    model = make(family)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (48, 6), generator=torch.Generator().manual_seed(1))
    stats = calibrate(model, {"mix": ids})
    groups = getattr(model.config, "n_group", 1) or 1
    kept = choose_experts(scores_of(pool(stats, ["mix"]), "frequency"), 6, groups)
    pruned = pruned_model(model, kept)
    pruned.save_pretrained(tmp_path)
    loaded = (QwenMoeGBForCausalLM if family == "qwenmoe_gb" else AutoModelForCausalLM).from_pretrained(tmp_path)
    assert type(loaded) is type(model)  # its own class: a stock model stays stock
    assert prune_sites(loaded)[0].num_experts == 6
    before, selected = routing(model, ids)
    after, _ = routing(loaded.eval(), ids)
    clean = untouched_prefix(selected, kept, ids.shape)
    assert clean.sum() >= 20, "too few tokens untouched by the dropped experts to test"
    diff = (before - after).abs().amax(-1)  # (B, S)
    assert diff[clean].max() <= 1e-6
    assert diff[~clean].max() > 1e-4  # where a dropped expert was selected, the model changes: the test can fail
    out = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_a_softmax_over_all_experts_without_renormalisation_is_not_exact():
    """OLMoE as released (`norm_topk_prob=False`): the dropped experts' share of the softmax moves to the kept ones."""
    model = make("olmoe", norm_topk_prob=False)
    ids = torch.randint(1, 96, (48, 6), generator=torch.Generator().manual_seed(1))
    kept = choose_experts(scores_of(calibrate(model, {"a": ids})["a"], "frequency"), 6)
    before, selected = routing(model, ids)
    after, _ = routing(pruned_model(model, kept), ids)
    clean = untouched_prefix(selected, kept, ids.shape)
    assert (before - after).abs().amax(-1)[clean].max() > 1e-5


def test_frequency_is_what_the_balancer_counts():
    ids = torch.randint(1, 99, (4, 16), generator=torch.Generator().manual_seed(2))
    model = make("qwenmoe_gb")
    with torch.no_grad():
        own = model(input_ids=ids, output_router_logits=True).router_stats.counts.sum(1)  # (L, E)
    assert torch.equal(calibrate(model, {"a": ids})["a"]["counts"], own.double())
    stock = make("deepseek_v3")
    view = StockMoE(stock)
    ids = ids % 96
    with view.analysis(), torch.no_grad():
        stock(input_ids=ids)
    counted = view.router_stats().counts.sum(1).double()  # (L, E)
    view.remove()
    assert torch.equal(calibrate(stock, {"a": ids})["a"]["counts"], counted)


def _float64_scores(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """gate_sum and reap of a Qwen3-MoE model from its weights in float64: softmax, top-k, renormalised weights,
    SwiGLU experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)), at each MoE layer's input."""
    inputs = []
    blocks = [layer.mlp for layer in model.model.layers]
    handles = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    num_experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    gate_sum = torch.zeros(len(blocks), num_experts, dtype=torch.float64)
    reap_sum, counts = gate_sum.clone(), gate_sum.clone()
    for layer, (block, x) in enumerate(zip(blocks, inputs)):
        x = x.reshape(-1, x.shape[-1]).double()  # (T, H)
        probs = (x @ block.gate.weight.double().T).softmax(-1)  # (T, E)
        weights, index = probs.topk(top_k, dim=-1)  # (T, K)
        weights = weights / weights.sum(-1, keepdim=True)
        for t in range(len(x)):
            for k in range(top_k):
                j = int(index[t, k])
                gate, up = (block.experts.gate_up_proj[j].double() @ x[t]).chunk(2)  # (I,), (I,)
                f = block.experts.down_proj[j].double() @ (torch.nn.functional.silu(gate) * up)  # (H,)
                counts[layer, j] += 1
                gate_sum[layer, j] += weights[t, k]
                reap_sum[layer, j] += weights[t, k] * f.norm()
    return {"gate_sum": gate_sum, "reap": reap_sum / counts.clamp(min=1), "frequency": counts}


def test_gate_sum_and_reap_equal_a_float64_rederivation():
    model = make("qwen3_moe")
    ids = torch.randint(1, 96, (3, 10), generator=torch.Generator().manual_seed(3))
    stats = calibrate(model, {"a": ids[:2], "b": ids[2:]})
    pooled = pool(stats, ["a", "b"])
    reference = _float64_scores(model, ids)
    assert torch.equal(scores_of(pooled, "frequency"), reference["frequency"])
    for score in ("gate_sum", "reap"):
        torch.testing.assert_close(scores_of(pooled, score), reference[score], rtol=1e-5, atol=1e-7)


def test_choose_experts_keeps_the_highest_and_the_groups():
    scores = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0, 9.0, 2.0, 4.0]], dtype=torch.float64)
    assert choose_experts(scores, 4) == [[0, 2, 5, 7]]  # ties (3.0, 3.0): the lower index
    assert choose_experts(scores, 3) == [[0, 5, 7]]
    assert choose_experts(scores, 4, n_group=2) == [[0, 2, 5, 7]]  # two of each half
    assert choose_experts(scores, 2, n_group=2) == [[0, 5]]
    assert keep_count(64, None, 0.25) == 16 and keep_count(64, 40, None) == 40


def test_bad_keep_counts_name_the_field():
    model = make("qwenmoe_gb")
    with pytest.raises(ValueError, match="keep_experts=9 is not allowed: the model has num_experts=8"):
        check_keep(model, 9)
    with pytest.raises(ValueError, match="fewer than num_experts_per_tok=2"):
        check_keep(model, 1)
    with pytest.raises(ValueError, match="not a multiple of n_group=2"):
        check_keep(model, 5)
    with pytest.raises(ValueError, match="keep_fraction=1.5 is not allowed"):
        keep_count(8, None, 1.5)
    with pytest.raises(ValueError, match="exactly one of keep_experts / keep_fraction"):
        keep_count(8, 4, 0.5)
    dense = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    with pytest.raises(ValueError, match="Qwen2ForCausalLM: its MoE layers cannot be read for pruning"):
        prune_sites(dense)


@pytest.fixture
def corpus(tmp_path):
    """Two domains of jsonl text, train and test."""
    root = tmp_path / "corpus"
    texts = {"code": "def f(x):\n    return x * 2\n", "prose": "The river ran quietly past the mill. "}
    for domain, text in texts.items():
        (root / domain).mkdir(parents=True)
        for split, n in (("train", 40), ("test", 10)):
            rows = [json.dumps({"text": f"{text * 3} {i}"}) for i in range(n)]
            (root / domain / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    (root / "empty").mkdir()
    (root / "empty" / "train.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
    (root / "empty" / "test.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
    return root


def _saved(family: str, folder):
    model = make(family, vocab_size=320)  # the byte tokenizer's 259 ids fit
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", ["qwenmoe_gb", "qwen3_moe"])
def test_prune_command_writes_a_folder_that_loads_in_its_own_class(family, corpus, tmp_path):
    source, out = tmp_path / "model", tmp_path / "pruned"
    model = _saved(family, source)
    argv = ["prune", "--model", str(source), "--data", str(corpus), "--domains", "code", "--seq_len", "32",
            "--keep_fraction", "0.75", "--score", "reap", "--calibration_sequences", "8", "--eval_max_sequences", "4",
            "--output_dir", str(out), "--base_model", "someone/base-moe"]  # fmt: skip
    main(argv)
    loaded = (QwenMoeGBForCausalLM if family == "qwenmoe_gb" else AutoModelForCausalLM).from_pretrained(out)
    assert type(loaded) is type(model) and prune_sites(loaded)[0].num_experts == 6
    report = json.loads((out / "pruning.json").read_text())
    assert report["domains"] == ["code"] and report["keep_experts"] == 6 and len(report["kept"]) == 2
    assert set(report["eval"]["pruned"]["domains"]) == {"code", "prose"}
    assert (out / "pruning_scores.png").stat().st_size > 0
    card = (out / "README.md").read_text()
    assert "base_model: someone/base-moe" in card and "base_model_relation: quantized" in card
    assert "perplexity (code)" in card and 'has no "pruned"' in card


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep_experts", "99"], "keep_experts=99 is not allowed"),
        (["--keep_experts", "1"], "fewer than num_experts_per_tok=2"),
        (["--keep_experts", "6", "--domains", "code,poetry"], r"domains='code,poetry': unknown \['poetry'\]"),
        (["--keep_experts", "6", "--domains", "empty"], "'empty' has no calibration sequence"),
    ],
)
def test_prune_command_refuses_bad_input_before_writing(extra, message, corpus, tmp_path):
    source, out = tmp_path / "model", tmp_path / "pruned"
    _saved("qwen3_moe", source)
    with pytest.raises(ValueError, match=message):
        main(["prune", "--model", str(source), "--data", str(corpus), "--seq_len", "32", "--output_dir", str(out),
              *extra])  # fmt: skip
    assert not out.exists()


def test_prune_command_refuses_a_model_it_cannot_read(corpus, tmp_path):
    source, out = tmp_path / "dense", tmp_path / "pruned"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(source)  # fmt: skip
    with pytest.raises(ValueError, match="Qwen2ForCausalLM: its MoE layers cannot be read for pruning"):
        main(["prune", "--model", str(source), "--data", str(corpus), "--keep_experts", "2", "--output_dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("family", family_params([f for f in ANY_MOE if f not in NAMED]))  # NAMED: above, exact
def test_every_family_the_balancer_reads_prunes_to_a_folder_of_its_own_class(family, tmp_path):
    model = tiny_model(family).eval()
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    num_experts = prune_sites(model)[0].num_experts
    groups = routing_groups(model.config)
    keep = max(num_experts // 2, model.config.num_experts_per_tok)
    keep += -keep % groups
    kept = choose_experts(scores_of(calibrate(model, {"a": ids})["a"], "reap"), keep, groups)
    pruned_model(model, kept).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert [s.num_experts for s in prune_sites(loaded)] == [keep] * len(kept)
    assert loaded(input_ids=ids, use_cache=False).logits.isfinite().all()


def test_prune_study_summary_is_the_mean_ppl_increase_over_domains_per_seed():
    from modeling_qwenmoe_gb.prune_study import summarize

    def run(base_a, base_b, after_a, after_b):
        rows = [{"mode": "domain", "fraction": 0.5, "score": "reap", "domain": "a", "ppl": after_a},
                {"mode": "domain", "fraction": 0.5, "score": "reap", "domain": "b", "ppl": after_b}]  # fmt: skip
        return {"base": {"a": base_a, "b": base_b}, "rows": rows}

    summary = summarize({"global": {0: run(2.0, 4.0, 3.0, 4.4), 1: run(2.0, 2.0, 2.2, 2.6)}})
    cell = summary["global"]["cells"]["domain|0.5|reap"]
    assert cell == pytest.approx([(0.5 + 0.1) / 2, (0.1 + 0.3) / 2])
    assert summary["global"]["base"] == pytest.approx([3.0, 2.0])
