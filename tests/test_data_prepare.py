"""`prepare-data`: the token files equal a one-process reference tokenization (read by `datasets` / pyarrow, tokenized
by the transformers tokenizer), whatever the number of processes; megatron-core, datatrove and HF datasets files are
read as their own libraries write and read them; cache hits, an interrupted prepare continuing, caps, and every bad
input named."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeling_qwenmoe_gb.data import open_data, open_token_folder, prepare_data, read_index
from modeling_qwenmoe_gb.data import prepare as prepare_module
from modeling_qwenmoe_gb.data.formats import IndexWriter
from modeling_qwenmoe_gb.data_benchmark import bpe_tokenizer as train_bpe

WORDS = ["alpha", "beta", "γάμμα", "数据", "mixture", "expert", "router", "token", "\u2028", "naïve", "def f(x):"]


def _docs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 60)))) for _ in range(n)]


def bpe_tokenizer(folder: Path, texts: list[str]) -> str:
    """A byte-level BPE tokenizer trained here (no download), saved as a transformers tokenizer folder."""
    return str(train_bpe(texts, 420, folder))


def write_mixed_formats(root: Path) -> dict[tuple[str, str], list[Path]]:
    """Four domains in the four layouts; returns {(domain, split): files}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    files = {}
    (root / "alpha").mkdir(parents=True)
    for split, n in (("train", 300), ("test", 20)):
        path = root / "alpha" / f"{split}.jsonl"
        path.write_text(
            "\n".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(_docs(n, n)))
        )
        files["alpha", split] = [path]
    (root / "beta").mkdir()
    train = root / "beta" / "train.jsonl.gz"
    train.write_bytes(gzip.compress("\n".join(json.dumps({"text": t}) for t in _docs(1, 120)).encode()))
    test = root / "beta" / "test.jsonl.zst"
    test.write_bytes(
        zstandard.ZstdCompressor().compress("\n".join(json.dumps({"text": t}) for t in _docs(2, 9)).encode())
    )
    files["beta", "train"], files["beta", "test"] = [train], [test]
    (root / "gamma").mkdir()
    table = pa.table({"text": _docs(3, 200), "n": list(range(200))})
    pq.write_table(table, root / "gamma" / "train.parquet", row_group_size=25)  # 8 row groups
    files["gamma", "train"] = [root / "gamma" / "train.parquet"]
    for split, n in (("train", 30), ("test", 4)):
        (root / "delta" / split).mkdir(parents=True)
        for i, text in enumerate(_docs(10 + n, n)):
            (root / "delta" / split / f"doc{i:03d}.txt").write_text(text)
        files["delta", split] = sorted((root / "delta" / split).glob("*.txt"))
    return files


def reference_documents(paths: list[Path]) -> list[str]:
    """The documents of a split read by `datasets` / pyarrow / plain Python: independent of our readers."""
    from datasets import load_dataset

    if paths[0].suffix == ".txt":
        return [p.read_text() for p in paths]
    if paths[0].suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(paths[0]).column("text").to_pylist()
    return load_dataset("json", data_files=[str(p) for p in paths], split="train")["text"]


def reference_tokens(tokenizer, docs: list[str]) -> np.ndarray:
    return np.array(
        [i for d in docs for i in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    )


def test_prepare_equals_a_one_process_reference_whatever_the_processes(tmp_path):
    from transformers import AutoTokenizer

    files = write_mixed_formats(tmp_path / "raw")
    tok_dir = bpe_tokenizer(tmp_path / "tok", _docs(99, 300))
    one = prepare_data(str(tmp_path / "raw"), tok_dir, tmp_path / "one", num_proc=1, unit_bytes=4096, progress=False)
    two = prepare_data(str(tmp_path / "raw"), tok_dir, tmp_path / "two", num_proc=2, unit_bytes=4096, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    folder = open_token_folder(one)
    manifest = json.loads((one / "manifest.json").read_text())
    assert folder.kind == "prepared" and folder.domains == ["alpha", "beta", "delta", "gamma"]
    assert manifest["sources"]["units"] > 8  # alpha and the parquet file were cut into several units
    for (domain, split), paths in files.items():
        expected = reference_tokens(tokenizer, reference_documents(paths))
        assert np.array_equal(folder.streams[domain][split].read(0, len(expected)), expected), (domain, split)
        assert len(folder.streams[domain][split]) == len(expected)
        stats = manifest["domains"][domain][split]
        assert stats["documents"] == len(reference_documents(paths)) and stats["max_token_id"] == expected.max()
        for ext in (".bin", ".idx"):  # byte-identical files with 1 and 2 processes
            assert (one / domain / f"{split}{ext}").read_bytes() == (two / domain / f"{split}{ext}").read_bytes()
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer) and manifest["dtype"] == "uint16"


def test_megatron_core_writes_the_same_files_and_reads_ours(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    docs = [np.arange(n, dtype=np.uint16) * 7 % 500 for n in (5, 1, 12, 3)]
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    ours = IndexWriter(tmp_path / "ours", np.uint16)
    ours.add(np.concatenate(docs[:2]), np.array([5, 1]))
    ours.add(np.concatenate(docs[2:]), np.array([12, 3]))
    assert ours.close() == {"tokens": 21, "documents": 4, "max_token_id": int(max(d.max() for d in docs))}
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    read = IndexedDataset(str(tmp_path / "ours"))
    assert len(read) == 4 and all(np.array_equal(read[i], d) for i, d in enumerate(docs))
    index = read_index(tmp_path / "theirs")
    assert (index.num_sequences, index.num_documents, index.tokens, index.dtype) == (4, 4, 21, "uint16")


def test_prepared_folders_are_megatron_datasets(tmp_path):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = prepare_data("synthetic", "byte", tmp_path / "p", synthetic_docs=5, progress=False)
    read = IndexedDataset(str(out / "dna" / "train"))
    stream = open_token_folder(out).streams["dna"]["train"]
    assert len(read) == 5 and np.array_equal(np.concatenate([read[i] for i in range(5)]), stream.read(0, len(stream)))


def test_datatrove_shards_are_read_as_datatrove_writes_them(tmp_path):
    pytest.importorskip("datatrove")
    from datatrove.pipeline.tokens.tokenizer import TokenizedFile

    docs = {"code": [[5, 6, 7], [8, 9]], "prose": [[70000, 1], [2, 3, 4, 5]]}
    expected = {}
    for domain, token_size in (("code", 2), ("prose", 4)):
        for shard in range(2):
            out = TokenizedFile(str(tmp_path / domain), f"{shard:05d}.ds", token_size=token_size,
                                save_final_metadata=True, tokenizer_name_or_path="gpt2")  # fmt: skip
            for doc in docs[domain]:
                doc = [t + shard for t in doc]
                out.write(doc, None)
                expected.setdefault(domain, []).extend(doc)
            out.close()
    folder = open_token_folder(tmp_path)
    assert folder.kind == "datatrove" and folder.tokenizer == {"name": "gpt2"}
    for domain, tokens in expected.items():
        stream = folder.streams[domain]["train"]
        assert stream.read(0, len(stream)).tolist() == tokens
    assert folder.max_token_ids() == {"code": {"train": 10}, "prose": {"train": 70001}}


def test_tokenized_hf_datasets_are_read_from_save_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"input_ids": [[1, 2, 3], [4], [5, 6]], "text": ["a", "b", "c"]}
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict({"input_ids": [[9, 9]]})}).save_to_disk(
        tmp_path / "math"
    )
    Dataset.from_dict({"input_ids": [[7, 8]] * 5}).save_to_disk(tmp_path / "code", max_shard_size=8)  # several files
    folder = open_token_folder(tmp_path)
    assert folder.kind == "hf" and folder.domains == ["code", "math"]
    math_train = folder.streams["math"]["train"]
    assert math_train.read(0, len(math_train)).tolist() == [1, 2, 3, 4, 5, 6]
    assert folder.streams["math"]["test"].read(0, 2).tolist() == [9, 9]
    code = folder.streams["code"]["train"]
    assert code.read(1, 9).tolist() == [8, 7, 8, 7, 8, 7, 8, 7]  # across Arrow chunks
    Dataset.from_dict({"text": ["x"]}).save_to_disk(tmp_path / "raw_text")
    with pytest.raises(ValueError, match=r"raw_text: a saved dataset without an 'input_ids' column: it has \['text'\]"):
        open_token_folder(tmp_path)


def test_a_rerun_is_a_cache_hit_and_an_interrupted_prepare_continues(tmp_path, monkeypatch, capsys):
    write_mixed_formats(tmp_path / "raw")
    kwargs = {"num_proc": 1, "unit_bytes": 2048, "progress": False}
    reference = prepare_data(str(tmp_path / "raw"), "byte", tmp_path / "ref", **kwargs)
    calls = []
    original = prepare_module._tokenize_unit

    def crash_after_three(unit, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill between units
        calls.append(unit)
        return original(unit, *args)

    monkeypatch.setattr(prepare_module, "_tokenize_unit", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(tmp_path / "raw"), "byte", tmp_path / "out", **kwargs)
    assert (
        not (tmp_path / "out" / "manifest.json").exists()
        and len(list((tmp_path / "out" / ".prepare").glob("unit-*"))) == 3
    )
    counted = []
    monkeypatch.setattr(prepare_module, "_tokenize_unit", lambda unit, *a: counted.append(unit) or original(unit, *a))
    prepare_data(str(tmp_path / "raw"), "byte", tmp_path / "out", **kwargs)
    units = json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"]["units"]
    assert "3 of" in capsys.readouterr().out and len(counted) == units - 3  # only the unfinished units
    for path in reference.rglob("*.bin"):
        assert path.read_bytes() == (tmp_path / "out" / path.relative_to(reference)).read_bytes()
    assert not (tmp_path / "out" / ".prepare").exists()
    counted.clear()
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    prepare_data(str(tmp_path / "raw"), "byte", tmp_path / "out", **kwargs)
    assert counted == [] and (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp  # cache hit
    assert "cache hit" in capsys.readouterr().out


def test_a_prepare_killed_by_sigkill_continues_from_its_finished_units(tmp_path):
    """A real SIGKILL of the whole process tree (2 worker processes) in the middle of a prepare."""
    write_mixed_formats(tmp_path / "raw")
    for i in range(10):  # more units (~200), so that the kill lands mid-way
        shutil.copytree(tmp_path / "raw" / "alpha", tmp_path / "raw" / f"extra{i:02d}")
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    script = (
        f"from modeling_qwenmoe_gb.data import *\nprepare_data({raw!r}, 'byte', {out!r}, num_proc=2, unit_bytes=4096)"
    )
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    work = tmp_path / "out" / ".prepare"
    import os
    import signal
    import time

    deadline = time.time() + 120
    while len(list(work.glob("unit-*[0-9]"))) < 20 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len([p for p in work.glob("unit-*[0-9]") if (p / "done.json").is_file()])
    assert finished >= 20 and not (tmp_path / "out" / "manifest.json").exists()
    out = prepare_data(str(tmp_path / "raw"), "byte", tmp_path / "out", num_proc=2, unit_bytes=4096, progress=False)
    reference = prepare_data(
        str(tmp_path / "raw"), "byte", tmp_path / "ref", num_proc=1, unit_bytes=4096, progress=False
    )
    for path in reference.rglob("*.bin"):
        assert path.read_bytes() == (out / path.relative_to(reference)).read_bytes()


def test_caps_keep_the_first_whole_documents(tmp_path):
    write_mixed_formats(tmp_path / "raw")
    full = open_token_folder(prepare_data(str(tmp_path / "raw"), "byte", tmp_path / "full", progress=False))
    capped = prepare_data(str(tmp_path / "raw"), "byte", tmp_path / "cap", unit_bytes=1024, max_tokens_per_domain=3000,
                          max_docs_per_domain=150, num_proc=2, progress=False)  # fmt: skip
    folder = open_token_folder(capped)
    for domain in folder.domains:
        lengths = read_index(tmp_path / "full" / domain / "train").lengths()
        ends = np.cumsum(lengths[:150])
        keep = int(np.searchsorted(ends, 3000, side="right"))  # whole documents within both caps
        stream = folder.streams[domain]["train"]
        assert len(stream) == ends[keep - 1] <= 3000
        assert np.array_equal(stream.read(0, len(stream)), full.streams[domain]["train"].read(0, len(stream)))
        if "test" in full.streams[domain]:  # the token cap is for training data; the document cap for both
            assert read_index(capped / domain / "test").num_documents == min(
                150, read_index(tmp_path / "full" / domain / "test").num_documents
            )


def test_bad_token_files_and_sources_are_named(tmp_path):
    out = prepare_data("synthetic", "byte", tmp_path / "p", synthetic_docs=4, progress=False)
    bin_, idx = out / "dna" / "train.bin", out / "dna" / "train.idx"
    size = bin_.stat().st_size
    with open(bin_, "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(
        ValueError,
        match=rf"train.bin: truncated or corrupt: expected {size} bytes \(from train.idx\), found {size - 2}",
    ):
        open_token_folder(out)
    data = idx.read_bytes()
    idx.write_bytes(data[:-8])
    with pytest.raises(
        ValueError,
        match=rf"train.idx: truncated or corrupt: expected {len(data)} bytes for 4 sequences, found {len(data) - 8}",
    ):
        open_token_folder(out)
    idx.write_bytes(b"NOTANIDX" + data[8:])
    with pytest.raises(ValueError, match="train.idx: not a Megatron index"):
        open_token_folder(out)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "train.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="domain 'a' has no training documents"):
        prepare_data(str(tmp_path / "empty"), "byte", tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="max_tokens_per_domain=0 is not allowed"):
        prepare_data("synthetic", "byte", tmp_path / "x", max_tokens_per_domain=0)
    with pytest.raises(ValueError, match="is inside data="):
        prepare_data(str(tmp_path / "empty"), "byte", tmp_path / "empty" / "out")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(json.dumps({"text": "x", "kind": "a/b"}))
    with pytest.raises(ValueError, match="domain 'a/b' cannot name a folder"):
        prepare_data(f"hub:{tmp_path / 'hub'}", "byte", tmp_path / "h", domain_column="kind", progress=False)


def test_a_folder_prepared_otherwise_is_refused_and_the_tokenizer_must_match(tmp_path):
    tok_dir = bpe_tokenizer(tmp_path / "tok", _docs(5, 100))
    out = prepare_data("synthetic", tok_dir, tmp_path / "p", synthetic_docs=4, progress=False)
    with pytest.raises(ValueError, match=r"holds data prepared with other tokenizer .*allowed --overwrite true"):
        prepare_data("synthetic", "byte", out, synthetic_docs=4, progress=False)
    with pytest.raises(ValueError, match=r"holds data prepared with other sources, synthetic_docs=4 \(now 5\)"):
        prepare_data("synthetic", tok_dir, out, synthetic_docs=5, progress=False)
    assert open_data(str(out)).tokenizer_name == tok_dir  # the recorded tokenizer by default
    with pytest.raises(ValueError, match=r"was prepared with tokenizer .* but tokenizer='byte' is another"):
        open_data(str(out), "byte")
    prepare_data("synthetic", "byte", out, synthetic_docs=4, overwrite=True, progress=False)
    assert open_data(str(out)).tokenizer_name == "byte"


def test_the_prepare_data_command(tmp_path):
    from modeling_qwenmoe_gb.cli import main

    main(["prepare-data", "--data", "synthetic", "--output_dir", str(tmp_path / "p"), "--synthetic_docs", "3",
          "--num_proc", "2"])  # fmt: skip
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert sorted(manifest["domains"]) == ["arithmetic", "code", "dna", "prose"]
    assert manifest["domains"]["dna"]["train"]["documents"] == 3 and manifest["prepare"]["num_proc"] == 2
    with pytest.raises(ValueError, match="output_dir='' is not allowed"):
        main(["prepare-data", "--data", "synthetic"])
