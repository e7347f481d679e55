"""Multi-domain pretraining data at scale: sources, a parallel prepare step, token files read in place (flat memory)
and a domain-pure batch sampler with an exact mixture and an O(1) resume.

Modules
- `sources`: where each domain's text comes from (local jsonl / jsonl.gz / jsonl.zst / parquet / txt folders, Hub
  datasets streamed, the synthetic corpus), cut into units processes read on their own.
- `tokenizer`: `ByteTokenizer`, `load_tokenizer`, the `Encoder` worker processes tokenize with.
- `prepare`: `qwenmoe-gb prepare-data` — tokenize once, in parallel, into Megatron `.bin/.idx` per domain and split
  plus a manifest; cached, resumable.
- `formats`: the files (Megatron indexed datasets written and checked; datatrove shards and tokenized HF datasets
  read) as `TokenStream`s over memory maps; `open_token_folder`.
- `sampler`: `TokenDomains` (packing to `seq_len` at read time), `DomainBatchSampler` (domain-pure micro-batches, the
  quota-method mixture exact at every prefix, a pure function of the position), the checkpointed data state.
- `synthetic`: the embedded 4-domain corpus.

`open_data` is what `pretrain`, `compare`, `evaluate` and `analyze` call: a token folder is read as it is, raw text
is prepared into a cache first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .formats import TokenFolder, TokenStream, open_token_folder, read_index
from .prepare import PrepareArguments, default_cache_dir, default_num_proc, prepare_data
from .sampler import (
    DATA_STATE_FILE,
    DomainBatchSampler,
    TokenDomains,
    check_data_state,
    collate_causal_lm,
    parse_weights,
    stream_identity,
)
from .sources import check_utf8, load_corpus, plan_units, read_jsonl
from .synthetic import SYNTHETIC_DOMAINS, synthetic_corpus, synthetic_documents
from .tokenizer import ByteTokenizer, Encoder, load_tokenizer, tokenizer_vocab_size


@dataclass
class OpenedData:
    """A token folder with the tokenizer that reads it."""

    folder: TokenFolder
    tokenizer: object
    tokenizer_name: str
    tokenizer_sha256: str

    def domains(self, split: str, seq_len: int) -> TokenDomains:
        return TokenDomains(self.folder.split(split), seq_len)

    def check_vocab(self, vocab_size: int, cache_dir: str | Path | None = None) -> None:
        """`ValueError` naming the domain, the split and the largest id when a token id is >= `vocab_size` (the ids
        recorded, or scanned once and cached in `cache_dir`, default `default_cache_dir()`)."""
        for domain, splits in sorted(self.folder.max_token_ids(cache_dir or default_cache_dir()).items()):
            for split, largest in sorted(splits.items()):
                if largest >= vocab_size:
                    raise ValueError(
                        f"data={self.folder.path!r}: domain {domain!r} ({split}) holds token id {largest} but the "
                        f"model's vocab_size is {vocab_size}: allowed ids < {vocab_size} (tokenized with another "
                        f"tokenizer than {self.tokenizer_name!r}? give it as --tokenizer)"
                    )


def open_data(
    data: str,
    tokenizer: str | None = None,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    **prepare_options,
) -> OpenedData:
    """`data` as token streams: a token folder (prepared, Megatron, datatrove, tokenized HF datasets) as it is, raw
    text (`synthetic`, a folder of text, `hub:...`) prepared into `cache_dir` (default `default_cache_dir()`) first (a
    cache hit when done before).
    `tokenizer` None: the folder's recorded tokenizer, else `byte`; a prepared folder made with another tokenizer
    than `tokenizer` is refused."""
    folder = open_token_folder(data) if not data.startswith("hub:") and data != "synthetic" else None
    loaded = None
    if folder is None:
        loaded = load_tokenizer(tokenizer or "byte")
        path = prepare_data(data, tokenizer or "byte", cache_dir=cache_dir, num_proc=num_proc, loaded_tokenizer=loaded,
                            **prepare_options)  # fmt: skip
        folder = open_token_folder(path)
    recorded = (folder.tokenizer or {}).get("name")
    name = tokenizer or recorded or "byte"
    loaded = loaded or load_tokenizer(name)
    encoder = Encoder.of(loaded, name)
    expected = (folder.tokenizer or {}).get("sha256")
    if expected is not None and expected != encoder.sha256:
        raise ValueError(
            f"data={data!r} was prepared with tokenizer {recorded!r} (sha256 {expected[:12]}…) but tokenizer={name!r} "
            f"is another (sha256 {encoder.sha256[:12]}…): allowed the tokenizer it was prepared with (leave "
            "--tokenizer out to use it), or prepare the data again with this one"
        )
    return OpenedData(folder, loaded, name, encoder.sha256)


__all__ = [
    "DATA_STATE_FILE",
    "SYNTHETIC_DOMAINS",
    "ByteTokenizer",
    "DomainBatchSampler",
    "Encoder",
    "OpenedData",
    "PrepareArguments",
    "TokenDomains",
    "TokenFolder",
    "TokenStream",
    "check_data_state",
    "check_utf8",
    "default_cache_dir",
    "collate_causal_lm",
    "default_num_proc",
    "load_corpus",
    "load_tokenizer",
    "open_data",
    "open_token_folder",
    "parse_weights",
    "plan_units",
    "prepare_data",
    "read_index",
    "read_jsonl",
    "stream_identity",
    "synthetic_corpus",
    "synthetic_documents",
    "tokenizer_vocab_size",
]
