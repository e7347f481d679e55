"""Tokenizers: the byte-level tokenizer that needs no download, any transformers tokenizer by path or Hub name, and
the picklable `Encoder` that worker processes tokenize with.

Features
- `ByteTokenizer`: UTF-8 bytes 0..255 + pad / bos / eos, also as a `PreTrainedTokenizerFast` with identical ids.
- `load_tokenizer("byte" | PATH | HUB_NAME)`; a path that does not exist is named, not looked up on the Hub.
- `Encoder.of(tokenizer, name)`: what a worker needs to tokenize exactly as the tokenizer does — the Rust tokenizer's
  JSON (no transformers import in the worker), or the name for a slow tokenizer — plus the EOS id, the vocabulary
  size, the on-disk dtype and a SHA-256 of the tokenizer (`tokenizer.json` of a fast tokenizer) that prepared data
  and checkpoints record.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np


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


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk token dtype, Megatron's rule (`DType.optimal_dtype`): uint16 below 65,500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


@dataclass(frozen=True)
class Encoder:
    """A tokenizer as worker processes use it (picklable): `encode_batch(texts)` gives the documents' ids, each
    followed by EOS, as one flat array and the per-document lengths."""

    name: str
    sha256: str
    vocab_size: int
    eos_token_id: int
    tokenizer_json: str | None = None  # a fast tokenizer's Rust tokenizer; None: "byte" or a slow tokenizer by name

    @classmethod
    def of(cls, tokenizer, name: str) -> Encoder:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                f"tokenizer={name!r} has no eos_token: allowed tokenizers with an EOS token (documents are joined "
                "with it)"
            )
        if isinstance(tokenizer, ByteTokenizer):
            return cls("byte", hashlib.sha256(b"qwenmoe-gb byte tokenizer v1").hexdigest(), len(tokenizer), eos)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else _slow_tokenizer_identity(tokenizer)
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return cls(name, sha, len(tokenizer), eos, text if backend is not None else None)

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def build(self):
        """The callable that tokenizes a list of texts into a list of id lists (in this process: single-threaded)."""
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core: no thread pool inside each
        if self.name == "byte":
            return None
        if self.tokenizer_json is not None:
            from tokenizers import Tokenizer

            rust = Tokenizer.from_str(self.tokenizer_json)
            encode = getattr(rust, "encode_batch_fast", rust.encode_batch)  # fast: no character offsets
            return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
        slow = load_tokenizer(self.name)
        return lambda texts: slow(texts, add_special_tokens=False)["input_ids"]

    def encode_batch(self, built, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids with EOS after each document, lengths) of `texts`, with `built` = `self.build()`."""
        if built is None:  # bytes: no Python list per token
            data = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
            lengths = np.array([len(d) + 1 for d in data], dtype=np.int64)
            flat = np.full(int(lengths.sum()), self.eos_token_id, dtype=self.dtype)
            ends = np.cumsum(lengths)
            for d, end in zip(data, ends):
                flat[end - 1 - len(d) : end - 1] = d
            return flat, lengths
        ids = built(texts)
        lengths = np.array([len(i) + 1 for i in ids], dtype=np.int64)
        eos = (self.eos_token_id,)
        flat = np.fromiter(chain.from_iterable(chain(i, eos) for i in ids), dtype=self.dtype, count=int(lengths.sum()))
        return flat, lengths

    def describe(self) -> dict:
        fields = ("name", "sha256", "vocab_size", "eos_token_id")
        return {name: getattr(self, name) for name in fields}


def _slow_tokenizer_identity(tokenizer) -> str:
    """What identifies a tokenizer without a Rust backend: its class, vocabulary and special tokens."""
    return json.dumps(
        {"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab(), "special": tokenizer.all_special_tokens},
        sort_keys=True,
    )


__all__ = ["ByteTokenizer", "Encoder", "load_tokenizer", "token_dtype", "tokenizer_vocab_size"]
