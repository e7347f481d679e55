"""Data: the synthetic corpus, local and Hub sources, packing at read time, the mixture (quota method) and the
domain-pure, seekable batch sampler."""

import json
import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard

from modeling_qwenmoe_gb.data import (
    SYNTHETIC_DOMAINS,
    ByteTokenizer,
    DomainBatchSampler,
    Encoder,
    TokenDomains,
    load_corpus,
    load_tokenizer,
    parse_weights,
    synthetic_corpus,
)
from modeling_qwenmoe_gb.data.sampler import QuotaSchedule, integer_weights, permutation, quota_sequence


def test_synthetic_corpus_is_deterministic_and_domains_differ():
    a, b = synthetic_corpus(20, 5, seed=3), synthetic_corpus(20, 5, seed=3)
    assert a == b and set(a) == set(SYNTHETIC_DOMAINS)
    assert synthetic_corpus(20, 5, seed=4) != a
    histograms = {}
    for domain, splits in a.items():
        counts = Counter("".join(splits["train"]))
        total = sum(counts.values())
        histograms[domain] = {ch: n / total for ch, n in counts.items()}
    for x in SYNTHETIC_DOMAINS:  # byte distributions are far apart (total variation > 0.4)
        for y in SYNTHETIC_DOMAINS:
            if x < y:
                keys = set(histograms[x]) | set(histograms[y])
                tv = 0.5 * sum(abs(histograms[x].get(k, 0) - histograms[y].get(k, 0)) for k in keys)
                assert tv > 0.4, (x, y, tv)


def test_packing_joins_documents_with_eos_and_cuts_at_read_time():
    flat, lengths = Encoder.of(ByteTokenizer(), "byte").encode_batch(None, ["ab", "cde"])
    assert flat.tolist() == [97, 98, 258, 99, 100, 101, 258] and lengths.tolist() == [3, 4]
    packed = TokenDomains.from_arrays({"d": flat}, seq_len=3)
    assert packed.sequences("d").tolist() == [[97, 98, 258], [99, 100, 101]]  # the tail (one EOS) is dropped
    assert TokenDomains.from_arrays({"d": flat}, seq_len=2).sizes == [3]  # another seq_len: the same tokens


def _domain_of(sampler):
    return lambda index: int(np.searchsorted(sampler.offsets, index, side="right")) - 1


def test_sampler_micro_batches_are_domain_pure_per_rank_and_follow_the_weights():
    sizes = [50, 80, 60, 40]
    weights = [1.0, 2.0, 1.0, 0.0]
    sampler = DomainBatchSampler(sizes, batch_size=4, weights=weights, num_batches=4000, seed=1)
    domain_of = _domain_of(sampler)
    batches = list(sampler)
    assert batches == list(DomainBatchSampler(sizes, 4, weights, 4000, seed=1))  # deterministic
    domains = []
    for batch in batches:
        ds = {domain_of(i) for i in batch}
        assert len(ds) == 1 and len(set(batch)) == 4
        domains.append(ds.pop())
    counts = np.zeros(4, dtype=int)
    for n, d in enumerate(domains, start=1):  # exact at every prefix: floor(n w) <= count <= ceil(n w)
        counts[d] += 1
        for e, w in enumerate(weights):
            assert math.floor(n * w / 4) <= counts[e] <= math.ceil(n * w / 4), (n, e, counts)
    ranks = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in range(2)]
    assert ranks[0] == batches[0::2] and ranks[1] == batches[1::2]  # each rank gets its own micro-batches
    same_step = sum(domain_of(a[0]) == domain_of(b[0]) for a, b in zip(*ranks)) / len(ranks[0])
    assert same_step < 0.5  # ranks mostly see different domains in the same micro-step


def test_each_pass_over_a_domain_takes_every_sequence_once_in_a_new_order():
    sampler = DomainBatchSampler([37, 64], batch_size=4, weights=[1, 1], num_batches=200, seed=3)
    per_domain = {0: [], 1: []}
    for batch in sampler:
        per_domain[_domain_of(sampler)(batch[0])].extend(batch)
    passes = [per_domain[0][i : i + 36] for i in range(0, 36 * 5, 36)]  # 37 sequences: 9 batches of 4 per pass
    for taken in passes:
        assert len(set(taken)) == 36 and set(taken) <= set(range(37))  # one sequence left out, a different one
    assert len({tuple(p) for p in passes}) == 5 and len({frozenset(p) for p in passes}) > 1
    first = per_domain[1][:64]
    assert sorted(first) == list(range(37, 101))  # a pass of the second domain: all 64, shuffled
    assert first != sorted(first)


def _quota_reference(weights: list[float], length: int) -> list[int]:
    """Balinski & Young's quota method in exact rational arithmetic, written from its definition: among the parties
    that stay within their upper quota, the one with the largest w / (count + 1) (lowest index on ties)."""
    total = sum(Fraction(str(w)) for w in weights)
    shares = [Fraction(str(w)) / total for w in weights]
    counts, out = [0] * len(weights), []
    for t in range(1, length + 1):
        eligible = [d for d, q in enumerate(shares) if q > 0 and counts[d] + 1 <= math.ceil(t * q)]
        best = max(eligible, key=lambda d: (shares[d] / (counts[d] + 1), -d))
        counts[best] += 1
        out.append(best)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_quota_schedule_equals_the_rational_reference_and_is_exact_at_every_prefix(seed):
    rng = random.Random(seed)
    weights = [round(rng.random() * 3, 2) for _ in range(rng.randint(2, 7))]
    weights[0] = weights[0] or 0.5
    length = 3 * sum(integer_weights(weights)) + 17  # over several periods
    schedule = QuotaSchedule(weights)
    domains, occurrence = schedule.at(np.arange(length))
    assert domains.tolist() == _quota_reference(weights, length) == quota_sequence(schedule.weights, length).tolist()
    shares = [Fraction(str(w)) / sum(Fraction(str(v)) for v in weights) for w in weights]
    counts = [0] * len(weights)
    for n, (d, k) in enumerate(zip(domains.tolist(), occurrence.tolist()), start=1):
        assert k == counts[d]  # the O(1) occurrence index equals counting
        counts[d] += 1
        assert all(math.floor(n * q) <= c <= math.ceil(n * q) for c, q in zip(counts, shares))


def test_integer_weights_keep_the_ratios():
    assert integer_weights([0.3, 0.7]) == [3, 7]
    assert integer_weights([2, 1, 1]) == [2, 1, 1]
    assert integer_weights([1.0, 0.0, 3.0]) == [1, 0, 3]
    with pytest.warns(UserWarning, match="rounded to multiples of 1/65536"):
        odd = integer_weights([0.1234567, 0.7654321])  # a period of 8,888,888 units, rounded
    assert sum(odd) <= 65536 and odd[0] / sum(odd) == pytest.approx(1234567 / 8888888, abs=1e-4)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_permutation_is_a_bijection_that_depends_on_the_seed(n):
    index = np.arange(n)
    first = permutation(index, n, seed=11)
    assert sorted(first.tolist()) == list(range(n))
    if n > 3:
        assert not np.array_equal(first, permutation(index, n, seed=12))
        assert not np.array_equal(first, index)


def test_sampler_started_at_any_micro_batch_equals_the_tail_and_computes_nothing_before_it(monkeypatch):
    sampler = DomainBatchSampler([40, 30, 50], batch_size=4, weights=[2, 1, 1], num_batches=300, seed=7, chunk_size=2)
    full = list(sampler)
    calls = []
    original = DomainBatchSampler.batch
    monkeypatch.setattr(DomainBatchSampler, "batch", lambda self, j: calls.append(j) or original(self, j))
    for start in (1, 150, 299):
        calls.clear()
        sampler.start = start
        assert list(sampler) == full[start:]
        assert calls == list(range(start, 300))  # nothing before the start is computed: O(1) in the start
    assert [original(sampler, j) for j in (0, 42)] == [full[0], full[42]]  # a pure function of the position


def test_parse_weights_errors():
    assert parse_weights("b=2", ["a", "b"]) == [0.0, 2.0]
    with pytest.raises(ValueError, match="domain_weights names domain 'c'"):
        parse_weights("c=1", ["a", "b"])
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        parse_weights("a=-1", ["a", "b"])
    with pytest.raises(ValueError, match="at least one weight"):
        parse_weights("a=0", ["a", "b"])


def write_domains(root, with_txt=False):
    for domain, word in (("alpha", "aaa bbb "), ("beta", "123 456 ")):
        folder = root / domain
        folder.mkdir(parents=True)
        for split, n in (("train", 12), ("test", 3)):
            rows = [{"text": word * (5 + i), "domain": domain} for i in range(n)]
            (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    if with_txt:
        (root / "gamma" / "train").mkdir(parents=True)
        for i in range(3):
            (root / "gamma" / "train" / f"{i}.txt").write_text(f"line one {i}\nline two {i}\n")


def test_local_jsonl_and_text_folders(tmp_path):
    write_domains(tmp_path, with_txt=True)
    corpus = load_corpus(str(tmp_path))
    assert sorted(corpus) == ["alpha", "beta", "gamma"]
    assert len(corpus["alpha"]["train"]) == 12 and len(corpus["alpha"]["test"]) == 3
    assert corpus["alpha"]["train"][1] == "aaa bbb " * 6
    assert corpus["gamma"]["train"][0] == "line one 0\nline two 0\n"  # a file is a document
    assert load_corpus(str(tmp_path), max_docs=4)["beta"]["train"] == corpus["beta"]["train"][:4]
    assert load_corpus(str(tmp_path), unit_bytes=64) == corpus  # the same documents cut into many units


def test_hub_sources_by_name_with_a_domain_column_and_per_domain(tmp_path):
    """No document cap: 2,500 documents per domain (the old loader stopped at 2,000); the test split is the
    documents whose hash falls under test_fraction, whatever the order."""
    repo = tmp_path / "mixed"
    repo.mkdir()
    rows = [{"text": f"{d} document {i}", "domain": d} for i in range(2500) for d in ("alpha", "beta")]
    (repo / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(f"hub:{repo}", domain_column="domain", test_fraction=0.1)
    assert sorted(corpus) == ["alpha", "beta"]
    alpha = corpus["alpha"]
    assert len(alpha["train"]) + len(alpha["test"]) == 2500 and 150 < len(alpha["test"]) < 350
    assert sorted(alpha["train"] + alpha["test"]) == sorted(f"alpha document {i}" for i in range(2500))
    write_domains(tmp_path / "src")
    per_domain = load_corpus(f"hub:a={tmp_path / 'src' / 'alpha'},b={tmp_path / 'src' / 'beta'}")
    assert sorted(per_domain) == ["a", "b"]
    assert per_domain["a"]["test"] == ["aaa bbb " * (5 + i) for i in range(3)]  # the dataset's own test split
    with pytest.raises(
        ValueError, match=r"has no column 'topic' \(--domain_column\): allowed one of \['domain', 'text'\]"
    ):
        load_corpus(f"hub:{repo}", domain_column="topic")


def test_bad_data_folders_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="has no domains"):
        load_corpus(str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "d").mkdir()
    train = tmp_path / "d" / "train.jsonl"
    train.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match=r"train.jsonl: line 2 has no text field 'text' \(a string\): got \['body'\]"):
        load_corpus(str(tmp_path))
    train.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"train.jsonl: not UTF-8 at line 3 \(byte 29"):
        load_corpus(str(tmp_path))
    train.write_text('{"text": "ok"}\n{"text": "unterminated}\n')
    with pytest.raises(ValueError, match="train.jsonl: line 2 is not JSON"):
        load_corpus(str(tmp_path))
    train.unlink()
    (tmp_path / "d" / "train").mkdir()
    (tmp_path / "d" / "train" / "a.txt").write_bytes(b"fine\nbad \xff\n")
    with pytest.raises(ValueError, match=r"a.txt: not UTF-8 at line 2"):
        load_corpus(str(tmp_path))


def test_a_tokenizer_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ValueError, match="tokenizer='/nonexistent': no such file or folder"):
        load_tokenizer("/nonexistent")
    with pytest.raises(ValueError, match="no such file or folder"):
        load_tokenizer(str(tmp_path / "nope" / "tok"))


def test_sampler_rejects_small_domains():
    with pytest.raises(ValueError, match="domain 'b' has 3 sequences: every weighted domain needs >= 8 sequences"):
        DomainBatchSampler([10, 3], 8, [1.0, 1.0], 10, domains=["a", "b"])
    assert len(DomainBatchSampler([10, 3], 8, [1.0, 0.0], 10)) == 10


def test_sampler_chunks_are_domain_pure():
    sampler = DomainBatchSampler([30, 30, 30], batch_size=8, weights=[1, 1, 1], num_batches=200, seed=0, chunk_size=2)
    mixed = 0
    for batch in sampler:
        domains = [i // 30 for i in batch]
        assert all(domains[j] == domains[j + 1] for j in range(0, 8, 2))
        mixed += len(set(domains)) > 1
    assert mixed > 150  # micro-batches mix domains chunk by chunk
    with pytest.raises(ValueError, match="domain_chunk=3 must divide the micro-batch size 8"):
        DomainBatchSampler([30], 8, [1.0], 10, chunk_size=3)


def test_specialization_evaluate_metric_matches_the_analysis(tmp_path, monkeypatch):
    import evaluate
    import torch

    from modeling_qwenmoe_gb.analysis import SPECIALIZATION_METRIC, specialization_stats

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path))
    counts = {"a": torch.tensor([[10.0, 0, 0, 10], [5, 5, 5, 5]]), "b": torch.tensor([[0.0, 10, 10, 0], [5, 5, 5, 5]])}
    metric = evaluate.load(SPECIALIZATION_METRIC)
    result = metric.compute(domains=list(counts), counts=[c.tolist() for c in counts.values()], top_k=2)
    expected = specialization_stats(counts, 2)
    assert result["specialization_kl"] == pytest.approx(expected["specialization_kl"])
    assert result["kl_per_layer"] == pytest.approx([math.log(2), 0.0])  # disjoint halves of the experts: log 2
    assert result["max_expert_frequency"] == {"a": 0.75, "b": 0.75}


def test_byte_tokenizer_as_a_transformers_tokenizer_has_identical_ids(tmp_path):
    tok = ByteTokenizer()
    hf = tok.to_hf()
    for text in ["hello world", "def f(x):\n    return 2 * x\n", "床前明月光，疑是地上霜。", " a  b\t"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text) and hf.decode(ids) == text
    assert (len(hf), hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (259, 256, 257, 258)
    hf.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("ab")["input_ids"] == [97, 98]


def test_dead_experts_of_the_analysis_are_those_no_domain_selected(tmp_path):
    import torch

    from modeling_qwenmoe_gb.analysis import plot_heatmaps, specialization_stats

    counts = {"a": torch.tensor([[10.0, 0, 0, 10], [5, 5, 0, 5]]), "b": torch.tensor([[0.0, 10, 0, 0], [5, 5, 0, 0]])}
    report = specialization_stats(counts, 2)
    assert report["dead_experts"] == [[2], [2]]  # expert 1 of layer 0 and 3 of layer 1 serve one domain: alive
    assert plot_heatmaps(report, tmp_path / "h.png").stat().st_size > 0


def test_jsonl_rows_may_hold_unicode_line_separators_and_crlf(tmp_path):
    """JSON lines are split at newlines only: U+2028 / U+0085 inside a string (real GSM8K rows have them) and \\r\\n
    endings load as they are."""
    from modeling_qwenmoe_gb.data import read_jsonl

    texts = ["one\u2028two", "three\x85four", "plain"]
    path = tmp_path / "train.jsonl"
    path.write_bytes("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts).encode() + b"\r\n")
    assert read_jsonl(path) == texts
    gz = tmp_path / "train.jsonl.gz"
    import gzip

    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_jsonl(gz) == texts
