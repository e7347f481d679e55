"""Multi-domain pretraining data: sources, tokenizers, per-domain packing and a domain-pure batch sampler.

Features
- Sources: the embedded synthetic corpus (4 domains with clearly different statistics, generated deterministically by
  this module, no network); a local folder of per-domain `train.jsonl` / `test.jsonl` or text files read through
  `datasets`; Hub datasets by name through `datasets` (a domain column, or one dataset per domain; streaming).
- Tokenizers: a byte-level tokenizer that needs no download, or any tokenizer by path or name (`AutoTokenizer`).
- Packing per domain into fixed-length sequences (documents joined with EOS), as LLM pretraining does.
- `DomainBatchSampler`: every micro-batch holds sequences of one domain; domains are drawn per micro-batch by recipe
  weights, so a global batch mixes domains while each micro-batch does not. Under accelerate (DDP) the stream of
  micro-batches is dealt round-robin to the ranks, so each rank gets its own domains. With `chunk_size`, a micro-batch
  is made of domain-pure chunks (one device emulating several: the balance-BSZ sweep).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Sampler

SYNTHETIC_DOMAINS = ("arithmetic", "dna", "prose", "code")

# ----------------------------------------------------------------------------------------- synthetic corpus

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "vo",
    "si",
    "pe",
    "du",
    "ra",
    "ko",
    "li",
    "mo",
    "fa",
    "ze",
    "nu",
    "ba",
]


def _arithmetic_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(15, 40)):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {value}")
    return "\n".join(lines)


def _dna_doc(rng: random.Random) -> str:
    motifs = ["".join(rng.choice("ACGT") for _ in range(rng.randint(4, 9))) for _ in range(4)]
    seq = []
    while len(seq) < rng.randint(400, 900):
        seq.extend(rng.choice(motifs) if rng.random() < 0.4 else rng.choice("ACGT"))
    text = "".join(seq)
    return ">seq\n" + "\n".join(text[i : i + 60] for i in range(0, len(text), 60))


def _prose_doc(rng: random.Random) -> str:
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(60)]
    sentences = []
    for _ in range(rng.randint(6, 16)):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        sentences.append(sentence.capitalize() + rng.choice([".", ".", ".", "!", "?"]))
    return " ".join(sentences)


def _code_doc(rng: random.Random) -> str:
    blocks = []
    for _ in range(rng.randint(2, 6)):
        name = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 7)))
        args = ", ".join(rng.sample(["x", "y", "n", "items", "key"], rng.randint(1, 3)))
        body = [f"def {name}({args}):"]
        for _ in range(rng.randint(2, 5)):
            var = rng.choice(["total", "i", "acc", "out"])
            body.append(f"    {var} = {rng.choice(['x', 'n', 'len(items)'])} {rng.choice('+-*')} {rng.randint(1, 9)}")
            if rng.random() < 0.3:
                body.append(f"    if {var} > {rng.randint(0, 50)}:\n        return [{var}, {{'k': {var}}}]")
        body.append(f"    return {var}")
        blocks.append("\n".join(body))
    return "\n\n".join(blocks)


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic_doc,
    "dna": _dna_doc,
    "prose": _prose_doc,
    "code": _code_doc,
}


def synthetic_corpus(num_docs: int = 300, num_test_docs: int = 30, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": [doc, ...], "test": [doc, ...]}}, identical for identical arguments."""
    corpus = {}
    for domain in SYNTHETIC_DOMAINS:
        splits = {}
        for split, n in (("train", num_docs), ("test", num_test_docs)):  # the test split does not depend on num_docs
            rng = random.Random(f"{seed}-{domain}-{split}")
            splits[split] = [_GENERATORS[domain](rng) for _ in range(n)]
        corpus[domain] = splits
    return corpus


# ----------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus pad 256, bos 257, eos 258: no vocabulary file, no download."""

    vocab_size = 259
    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    name_or_path = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def to_hf(self):
        """The same tokenizer as a `PreTrainedTokenizerFast` (identical ids: byte b -> b, pad 256, bos 257, eos 258),
        for libraries that need one (TRL) and to save next to a model."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
        vocab.update({"<pad>": 256, "<s>": 257, "</s>": 258})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def load_tokenizer(name: str = "byte"):
    """`"byte"` for `ByteTokenizer`, otherwise `AutoTokenizer.from_pretrained(name)` (a path or a Hub name). A name
    that can only be a path (absolute, relative with `.` / `~`, or with more than one `/`) and does not exist is a
    `ValueError` naming it, not a Hub lookup."""
    if name == "byte":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if not path.exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name):
        raise ValueError(
            f"tokenizer={name!r}: no such file or folder; allowed 'byte', a tokenizer folder, or a Hub name (org/name)"
        )
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else name)


def tokenizer_vocab_size(tokenizer) -> int:
    return len(tokenizer)


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------- loading


def load_local_corpus(folder: str | Path, text_field: str = "text", max_docs: int | None = None):
    """Per-domain sub-folders, each with `train.jsonl` / `test.jsonl` (a `text_field` per line) or `train/*.txt` /
    `test/*.txt` (a file per document), read through `datasets`."""
    from datasets import load_dataset

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"data={str(folder)!r} is not a folder: allowed 'synthetic', a folder or 'hub:<name>'")
    corpus = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        splits = {}
        for split in ("train", "test"):
            if (sub / f"{split}.jsonl").is_file():
                splits[split] = read_jsonl(sub / f"{split}.jsonl", text_field, max_docs)
            elif (sub / split).is_dir() and any((sub / split).glob("*.txt")):
                files = sorted(str(p) for p in (sub / split).glob("*.txt"))
                for file in files:
                    check_utf8(Path(file))
                ds = load_dataset("text", data_files=files, sample_by="document", split="train")
                splits[split] = ds["text"][:max_docs]
        if "train" in splits:
            corpus[sub.name] = {"train": splits["train"], "test": splits.get("test", [])}
    if not corpus:
        raise ValueError(
            f"data={str(folder)!r} has no domains: allowed sub-folders with train.jsonl (+ test.jsonl) "
            "or train/*.txt (+ test/*.txt)"
        )
    return corpus


def check_utf8(path: Path) -> bytes:
    """The file's bytes; `ValueError` naming the file, the line and the byte where it is not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}: not UTF-8 at line {line} (byte {error.start}: {data[error.start : error.start + 1]!r}); "
            "allowed UTF-8 text"
        ) from None
    return data


def read_jsonl(path: Path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """The `text_field` of the first `max_docs` rows of a JSON-lines file (blank lines skipped); `ValueError` naming
    the file and the line of a row that is not UTF-8, not JSON, not an object or without the field."""
    texts = []
    lines = check_utf8(path).decode("utf-8").split("\n")  # not splitlines(): U+2028 etc. may sit inside a string
    for number, line in enumerate(lines, start=1):
        if max_docs is not None and len(texts) >= max_docs:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}: line {number} has no text field {text_field!r} (a string): got {fields}")
        texts.append(row[text_field])
    return texts


def load_hub_corpus(
    names: list[str],
    domain_column: str | None = None,
    text_column: str = "text",
    max_docs: int = 2000,
    streaming: bool = True,
    test_fraction: float = 0.05,
):
    """Hub datasets by name through `datasets` (streaming): one dataset with a `domain_column`, or one per domain
    (`domain=name` or `name`, the domain being the last path part). At most `max_docs` documents per domain (a mixed
    dataset is read for at most 50 × `max_docs` rows). Test split: the first `test_fraction` of each domain."""
    from datasets import load_dataset

    per_domain: dict[str, list[str]] = {}
    for spec in names:
        domain, _, name = spec.rpartition("=")
        ds = load_dataset(name, split="train", streaming=streaming)
        for i, row in enumerate(ds):
            key = str(row[domain_column]) if domain_column else (domain or name.rstrip("/").split("/")[-1])
            docs = per_domain.setdefault(key, [])
            if len(docs) < max_docs:
                docs.append(row[text_column])
            if not domain_column and len(docs) >= max_docs:
                break
            if i >= max_docs * 50:
                break
    corpus = {}
    for domain, docs in sorted(per_domain.items()):
        n_test = max(1, int(len(docs) * test_fraction))
        corpus[domain] = {"train": docs[n_test:], "test": docs[:n_test]}
    return corpus


def load_corpus(data: str, **kwargs) -> dict[str, dict[str, list[str]]]:
    """`"synthetic"`, a local folder, or `"hub:name1,name2"` (kwargs go to the matching loader)."""
    if data == "synthetic":
        return synthetic_corpus(**{k: v for k, v in kwargs.items() if k in ("num_docs", "num_test_docs", "seed")})
    if data.startswith("hub:"):
        names = [n for n in data[4:].split(",") if n]
        hub_keys = ("domain_column", "text_column", "max_docs", "streaming")
        return load_hub_corpus(names, **{k: v for k, v in kwargs.items() if k in hub_keys and v is not None})
    return load_local_corpus(data, **{k: v for k, v in kwargs.items() if k in ("text_field", "max_docs")})


# ----------------------------------------------------------------------------------------- packing


def pack_documents(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Documents joined with EOS and cut into (N, seq_len) sequences; the remainder is dropped."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(_encode(tokenizer, doc))
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, seq_len)


@dataclass
class PackedDomains:
    """Packed sequences per domain for one split; `dataset` concatenates them in `domains` order."""

    domains: list[str]
    sequences: dict[str, torch.Tensor]  # domain -> (N_d, seq_len)

    @property
    def sizes(self) -> list[int]:
        return [len(self.sequences[d]) for d in self.domains]

    def dataset(self) -> list[dict[str, torch.Tensor]]:
        return [{"input_ids": row} for d in self.domains for row in self.sequences[d]]

    def offsets(self) -> list[int]:
        out, total = [], 0
        for size in self.sizes:
            out.append(total)
            total += size
        return out


def pack_corpus(corpus, tokenizer, seq_len: int, split: str) -> PackedDomains:
    sequences = {d: pack_documents(c[split], tokenizer, seq_len) for d, c in corpus.items() if c.get(split)}
    domains = [d for d, s in sequences.items() if len(s) > 0]
    if not domains:
        raise ValueError(f"no {split} sequences of seq_len={seq_len}: the corpus is too small or empty")
    return PackedDomains(domains, {d: sequences[d] for d in domains})


def collate_causal_lm(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([r["input_ids"] for r in rows])  # (B, S)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------- sampler


def parse_weights(spec: str | None, domains: list[str]) -> list[float]:
    """`"a=2,b=1"` -> weights in `domains` order (unnamed domains get 0); None -> uniform."""
    if not spec:
        return [1.0] * len(domains)
    weights = dict.fromkeys(domains, 0.0)
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name not in weights:
            raise ValueError(f"domain_weights names domain {name!r}: allowed {domains}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"domain_weights={spec!r}: weight {value!r} of {name!r} is not a number") from None
        if weights[name] < 0 or not math.isfinite(weights[name]):
            raise ValueError(f"domain_weights={spec!r}: weight of {name!r} must be finite and >= 0")
    if sum(weights.values()) <= 0:
        raise ValueError(f"domain_weights={spec!r}: at least one weight must be > 0")
    return [weights[d] for d in domains]


class DomainBatchSampler(Sampler[list[int]]):
    """Yields micro-batches of `batch_size` indices of one domain each; the domain of each micro-batch is drawn by
    `weights`. Indices point into the concatenation of the domains (`PackedDomains.dataset()`); each domain is
    walked in a fresh permutation per pass (no index twice in a micro-batch). Deterministic in `seed`.

    Under accelerate the batch stream is dealt to the ranks round-robin (micro-batch j goes to rank j % world), so
    consecutive micro-batches — each one domain — land on different ranks: each rank gets its own domains.
    """

    def __init__(
        self,
        sizes: list[int],
        batch_size: int,
        weights: list[float],
        num_batches: int,
        seed: int = 0,
        chunk_size: int | None = None,
    ):
        chunk = batch_size if chunk_size is None else chunk_size
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} domains but {len(weights)} weights")
        if chunk < 1 or batch_size % chunk:
            raise ValueError(f"domain_chunk={chunk_size} must divide the micro-batch size {batch_size}")
        if any(size < chunk for size, w in zip(sizes, weights) if w > 0):
            raise ValueError(f"every weighted domain needs >= {chunk} sequences, got sizes {sizes}")
        self.sizes, self.batch_size, self.weights, self.chunk = sizes, batch_size, weights, chunk
        self.num_batches, self.seed = num_batches, seed
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed)
        streams: list[list[int]] = [[] for _ in self.sizes]
        for _ in range(self.num_batches):
            batch = []
            for _ in range(self.batch_size // self.chunk):  # one chunk (by default the whole micro-batch) per domain
                d = rng.choices(range(len(self.sizes)), weights=self.weights)[0]
                if len(streams[d]) < self.chunk:  # a new pass; the short tail of the last one is dropped
                    streams[d] = list(range(self.sizes[d]))
                    rng.shuffle(streams[d])
                take, streams[d] = streams[d][: self.chunk], streams[d][self.chunk :]
                batch.extend(self.offsets[d] + i for i in take)
            yield batch


def save_data_info(
    path: Path, corpus, packed: PackedDomains, tokenizer_name: str, data: str, world_size: int = 1
) -> None:
    info = {
        "data": data,
        "world_size": world_size,
        "tokenizer": tokenizer_name,
        "domains": packed.domains,
        "train_sequences": dict(zip(packed.domains, packed.sizes)),
        "documents": {d: len(c["train"]) for d, c in corpus.items()},
    }
    path.write_text(json.dumps(info, indent=2))
