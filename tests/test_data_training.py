"""Training from token folders: `pretrain` on Megatron pairs written by megatron-core and on a tokenized HF dataset;
token ids beyond the vocabulary and a resume on changed data refused, naming what; on 2 ranks, the micro-batches
after two consecutive resumes are hash-identical to the uninterrupted run's; memory per rank that does not grow with
the corpus."""

import json
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from modeling_qwenmoe_gb.cli import pretrain
from modeling_qwenmoe_gb.data import ByteTokenizer, Encoder, TokenDomains, open_token_folder, synthetic_corpus
from modeling_qwenmoe_gb.data.formats import IndexWriter

from .dist_common import torchrun
from .test_crash_resume import ENV, ROOT, RUN

TINY = [
    "--max_steps", "2", "--warmup_steps", "0", "--per_device_train_batch_size", "2", "--seq_len", "32",
    "--eval_max_sequences", "2", "--disable_tqdm", "true", "--use_cpu", "true", "--save_steps", "2",
    "--config_overrides", '{"num_hidden_layers": 1}',
]  # fmt: skip


def megatron_folder(root: Path, corpus: dict, with_megatron_core: bool = True) -> Path:
    """Byte tokens of `corpus` as `<domain>/<split>.bin|idx`, written by megatron-core's own builder."""
    encoder = Encoder.of(ByteTokenizer(), "byte")
    for domain, splits in corpus.items():
        (root / domain).mkdir(parents=True)
        for split, docs in splits.items():
            flat, lengths = encoder.encode_batch(None, docs)
            if with_megatron_core:
                import torch
                from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

                builder = IndexedDatasetBuilder(str(root / domain / f"{split}.bin"), dtype=np.uint16)
                for doc in np.split(flat, np.cumsum(lengths)[:-1]):
                    builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
                builder.finalize(str(root / domain / f"{split}.idx"))
            else:
                writer = IndexWriter(root / domain / split, np.uint16)
                writer.add(flat, lengths)
                writer.close()
    return root


def test_pretrain_on_megatron_pairs_written_by_megatron_core(tmp_path):
    pytest.importorskip("megatron.core")
    data = megatron_folder(tmp_path / "megatron", synthetic_corpus(20, 4))
    result = pretrain([*TINY, "--data", str(data), "--output_dir", str(tmp_path / "run")])
    info = json.loads((tmp_path / "run" / "data_info.json").read_text())
    assert info["format"] == "megatron" and info["tokenizer"] == "byte" and info["seq_len"] == 32
    assert set(result["eval"]["domains"]) == {"arithmetic", "code", "dna", "prose"}
    assert info["token_folder"] == str(data)  # read as it is, not prepared again


def test_pretrain_on_a_tokenized_hf_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    corpus = synthetic_corpus(20, 4)
    encoder = Encoder.of(ByteTokenizer(), "byte")
    for domain, splits in corpus.items():
        rows = {}
        for split, docs in splits.items():
            flat, lengths = encoder.encode_batch(None, docs)
            rows[split] = Dataset.from_dict(
                {"input_ids": [d.tolist() for d in np.split(flat, np.cumsum(lengths)[:-1])]}
            )
        DatasetDict(rows).save_to_disk(tmp_path / "hf" / domain)
    result = pretrain([*TINY, "--data", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "data_info.json").read_text())["format"] == "hf"
    assert set(result["eval"]["domains"]) == {"arithmetic", "code", "dna", "prose"}


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(tmp_path):
    data = megatron_folder(tmp_path / "m", synthetic_corpus(20, 2), with_megatron_core=False)
    writer = IndexWriter(data / "dna" / "train", np.uint16)  # a domain tokenized with a larger vocabulary
    writer.add(np.full(400, 301, dtype=np.uint16), np.array([400]))
    writer.close()
    with pytest.raises(
        ValueError, match=r"domain 'dna' \(train\) holds token id 301 but the model's vocab_size is 260"
    ):
        pretrain([*TINY, "--data", str(data), "--output_dir", str(tmp_path / "run"), "--preset", "tiny"])
    assert not (tmp_path / "run" / "checkpoint-2").exists()


def test_a_resume_on_other_data_is_refused_naming_what_changed(tmp_path):
    out = tmp_path / "run"
    pretrain([*TINY, "--synthetic_docs", "20", "--output_dir", str(out)])
    state = json.loads((out / "checkpoint-2" / "data_state.json").read_text())
    assert state["consumed_micro_batches"] == 2 * 8  # steps × accumulation (8)
    assert state["seq_len"] == 32 and state["micro_batch_size"] == 2
    more = [*TINY, "--synthetic_docs", "20", "--output_dir", str(out), "--max_steps", "3"]
    with pytest.raises(
        ValueError, match=r"differs from .*checkpoint-2's \(seq_len: 32 in .*, now 16\).*--allow_data_change"
    ):
        pretrain([*more, "--seq_len", "16"])
    with pytest.raises(ValueError, match=r"\(data: '[0-9a-f]{16}…' in .*; domain_weights: .*dna"):
        pretrain([*more, "--synthetic_docs", "21", "--domain_weights", "dna=2,code=1,prose=1,arithmetic=1"])
    pretrain([*more, "--seq_len", "16", "--allow_data_change", "true"])
    assert json.loads((out / "checkpoint-3" / "data_state.json").read_text())["consumed_micro_batches"] == 3 * 8


def _records(folder: Path, rank: int) -> list[tuple[int, str]]:
    lines = (folder / f"rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["sha256"]) for r in map(json.loads, lines)]


def _torchrun(out: Path, record: Path, mode: str = "none", step: int = 0) -> subprocess.CompletedProcess:
    record.mkdir(parents=True, exist_ok=True)
    cmd = [*torchrun(), str(ROOT / "tests" / "crash_launcher.py"), mode, str(step), "--", "pretrain", *RUN,
           "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", "--aux_free", "false"]  # fmt: skip
    return subprocess.run(cmd, env=dict(ENV, RECORD_BATCHES=str(record)), capture_output=True, text=True, timeout=600)


@pytest.mark.distributed
def test_two_ranks_see_the_uninterrupted_batches_after_two_consecutive_resumes(tmp_path):
    """Killed at step 3 (resumes from checkpoint-2), killed again at step 5 (resumes from checkpoint-4): every
    micro-batch each rank trains on equals the uninterrupted run's at the same step, by SHA-256 of its token ids."""
    done = _torchrun(tmp_path / "a", tmp_path / "ra")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [
        _torchrun(tmp_path / "b", tmp_path / f"rb{i}", *kill)
        for i, kill in enumerate((("step", 3), ("step", 5), ("none", 0)))
    ]
    assert [r.returncode for r in runs[:2]] != [0, 0] and runs[2].returncode == 0, runs[2].stderr[-3000:]
    for rank in range(2):
        reference = _records(tmp_path / "ra", rank)
        assert len(reference) == 6 * 2 and len(set(reference)) == 12  # 6 steps × 2 micro-batches, all different
        by_step = {}
        for step, sha in reference:
            by_step.setdefault(step, []).append(sha)
        for i, first_step in enumerate((1, 3, 5)):  # each run starts where its checkpoint left the stream
            got = _records(tmp_path / f"rb{i}", rank)
            assert got[0][0] == first_step
            assert got == [(s, sha) for s in sorted({s for s, _ in got}) for sha in by_step[s]][: len(got)], (rank, i)
    state = json.loads((tmp_path / "b" / "checkpoint-4" / "data_state.json").read_text())
    assert state["consumed_micro_batches"] == 4 * 2 * 2 and state["global_step"] == 4  # steps × accumulation × ranks


def test_what_a_rank_holds_does_not_grow_with_the_corpus(tmp_path):
    """The dataset a rank (and each DataLoader worker) holds: paths and a few numbers, not tokens or per-sequence
    objects — the same pickled size for 10k and 1M tokens (the benchmark measures RSS; this cannot grow unseen)."""
    sizes = {}
    for tokens in (10_000, 1_000_000):
        root = tmp_path / str(tokens)
        for domain in ("a", "b"):
            (root / domain).mkdir(parents=True)
            writer = IndexWriter(root / domain / "train", np.uint16)
            writer.add(np.arange(tokens, dtype=np.uint16) % 250, np.full(tokens // 100, 100))
            writer.close()
        dataset = TokenDomains(open_token_folder(root).split("train"), seq_len=64)
        assert dataset[len(dataset) - 1]["input_ids"].shape == (64,)  # the maps are open and read
        sizes[tokens] = len(pickle.dumps(dataset))
    assert sizes[1_000_000] - sizes[10_000] < 64 and sizes[1_000_000] < 2048, sizes
