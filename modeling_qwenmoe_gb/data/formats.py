"""Token files on disk, read in place: what `prepare-data` writes and what training reads.

Features
- Megatron-Core's indexed dataset (`<prefix>.bin` tokens back to back + `<prefix>.idx`: header, int32 lengths, int64
  byte pointers, int64 document indices), written byte-identically to megatron-core's `IndexedDatasetBuilder`
  (`IndexWriter`) and checked on open: the header, the index's size from its counts, the `.bin`'s size from the last
  pointer — a truncated or corrupt pair is a `ValueError` naming the file with the expected and actual sizes.
- `TokenStream`: one domain split's tokens as one sequence over segments (token files read with `pread`, the Arrow
  buffers of a saved dataset, or arrays): `read(start, stop)` reads only that window; picklable (DataLoader workers
  reopen the files).
- `open_token_folder(path)`: a folder of domains in any of
  - prepared by `prepare-data` (Megatron pairs + `manifest.json`: tokenizer, counts, the largest ids, fingerprint);
  - Megatron pairs `<domain>/train.bin|idx` (+ `test.bin|idx`), e.g. from Megatron's `tools/preprocess_data.py`;
  - datatrove's tokenized shards `<domain>/*.ds` or `<domain>/train/*.ds` (+ `test/*.ds`), with `.ds.index`;
  - tokenized HF datasets saved with `save_to_disk` (`<domain>/` a Dataset, or a DatasetDict with train / test)
    holding an `input_ids` column;
  as a `TokenFolder` (streams per domain and split, a content fingerprint, the tokenizer when recorded), or None for a
  folder of raw text.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document-index count
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
SCAN_CHUNK = 1 << 22  # tokens per read of a scan for the largest id (8 MiB of uint16: flat memory)

# ----------------------------------------------------------------------------------------- Megatron indexed files


def dtype_code(dtype) -> int:
    return next(code for code, d in DTYPE_CODES.items() if np.dtype(d) == np.dtype(dtype))


def write_index(path: Path, dtype, lengths: Callable[[], Iterable[np.ndarray]], num_sequences: int) -> None:
    """`<prefix>.idx` for `num_sequences` documents of one sequence each; `lengths()` yields their token counts in
    chunks (called twice: lengths, then pointers), so the index is written in flat memory."""
    itemsize = np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", num_sequences) + struct.pack("<Q", num_sequences + 1))
        for chunk in lengths():
            f.write(np.asarray(chunk, dtype=np.int32).tobytes())
        position = 0
        for chunk in lengths():  # pointers: the byte offset of each sequence
            if len(chunk):
                ends = position + np.cumsum(np.asarray(chunk, dtype=np.int64)) * itemsize  # (n,)
                f.write(np.concatenate([[position], ends[:-1]]).astype(np.int64).tobytes())
                position = int(ends[-1])
        for start in range(0, num_sequences + 1, 1 << 20):  # document indices 0..n: one sequence per document
            f.write(np.arange(start, min(start + (1 << 20), num_sequences + 1), dtype=np.int64).tobytes())


class IndexWriter:
    """Appends documents to `<prefix>.bin` and writes `<prefix>.idx` on `close()`: the files megatron-core's
    `IndexedDatasetBuilder(bin, dtype)` + `add_document(ids, [len])` + `finalize(idx)` write."""

    def __init__(self, prefix: str | Path, dtype):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self._bin = open(f"{self.prefix}.bin", "wb")
        self._lengths: list[np.ndarray] = []
        self.tokens = self.documents = 0
        self.max_id = -1

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents back to back (`flat`, their `lengths`)."""
        self._bin.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.tokens += len(flat)
        self.documents += len(lengths)
        if len(flat):
            self.max_id = max(self.max_id, int(flat.max()))

    def close(self) -> dict:
        self._bin.close()
        write_index(Path(f"{self.prefix}.idx"), self.dtype, lambda: self._lengths, self.documents)
        return {"tokens": self.tokens, "documents": self.documents, "max_token_id": self.max_id}


@dataclass(frozen=True)
class IndexedFile:
    """A checked Megatron pair: its dtype, counts and the `.bin`'s tokens."""

    prefix: str
    dtype: str
    num_sequences: int
    num_documents: int
    tokens: int

    def lengths(self) -> np.ndarray:
        """The int32 sequence lengths, memory-mapped."""
        return np.memmap(f"{self.prefix}.idx", np.int32, "r", HEADER_BYTES, (self.num_sequences,))

    def tokens_segment(self) -> FileTokens:
        return FileTokens(f"{self.prefix}.bin", self.dtype, self.tokens)


def read_index(prefix: str | Path) -> IndexedFile:
    """The header of `<prefix>.idx`, checked against the sizes of both files; `ValueError` naming the file, with the
    expected and actual sizes, for a truncated or corrupt pair."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise ValueError(f"{path}: missing (a Megatron indexed dataset is a .bin and an .idx of one prefix)")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{idx}: not a Megatron index (header {head[:9]!r}, expected {MAGIC!r}; {size} bytes)")
    version, code = struct.unpack("<Q", head[9:17])[0], head[17]
    sequences, doc_entries = struct.unpack("<Q", head[18:26])[0], struct.unpack("<Q", head[26:34])[0]
    if version != VERSION or code not in DTYPE_CODES:
        raise ValueError(f"{idx}: unsupported Megatron index (version {version}, dtype code {code})")
    expected = HEADER_BYTES + sequences * (4 + 8) + doc_entries * 8
    if size != expected:
        raise ValueError(
            f"{idx}: truncated or corrupt: expected {expected} bytes for {sequences} sequences, found {size}"
        )
    dtype = np.dtype(DTYPE_CODES[code])
    bin_size = bin_.stat().st_size
    end = 0
    if sequences:
        last_length = np.memmap(idx, np.int32, "r", HEADER_BYTES + (sequences - 1) * 4, (1,))[0]
        last_pointer = np.memmap(idx, np.int64, "r", HEADER_BYTES + sequences * 4 + (sequences - 1) * 8, (1,))[0]
        end = int(last_pointer) + int(last_length) * dtype.itemsize
    if bin_size != end:
        raise ValueError(f"{bin_}: truncated or corrupt: expected {end} bytes (from {idx.name}), found {bin_size}")
    return IndexedFile(str(prefix), dtype.name, sequences, max(doc_entries - 1, 0), bin_size // dtype.itemsize)


# ----------------------------------------------------------------------------------------- token streams


def _read_across(starts: np.ndarray, read_part, start: int, stop: int, dtype) -> np.ndarray:
    """Tokens [start, stop) of parts back to back: `starts` their cumulative offsets (parts + 1,), `read_part(i, a,
    b)` tokens [a, b) of part i."""
    pieces, position = [], start
    part = int(np.searchsorted(starts, start, side="right")) - 1
    while position < stop:
        base, end = int(starts[part]), min(stop, int(starts[part + 1]))
        pieces.append(read_part(part, position - base, end - base))
        position, part = end, part + 1
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0, dtype)


class FileTokens:
    """A flat binary file of `count` tokens (a Megatron `.bin`, a datatrove `.ds`), read with `pread`: no page of it
    is mapped into the process. (A mapped page counts in the process's RSS, and the kernel maps large folios around
    each fault — about 1.5 MB per random read here — so reading through a memory map grows RSS with the corpus; the
    page cache behind `pread` is the kernel's.)"""

    def __init__(self, path: str, dtype: str, count: int):
        self.path, self.dtype, self.count = path, np.dtype(dtype), count
        self._file = None  # opened at the first read (closed with the object)

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        size, offset = (stop - start) * self.dtype.itemsize, start * self.dtype.itemsize
        data = os.pread(self._file.fileno(), size, offset)
        while len(data) < size:  # a short read (large windows on some filesystems)
            more = os.pread(self._file.fileno(), size - len(data), offset + len(data))
            if not more:
                raise ValueError(f"{self.path}: shorter than its {self.count} tokens")
            data += more
        return np.frombuffer(data, self.dtype)

    def max_id(self) -> int:
        """The largest token, read through one reused buffer (flat memory)."""
        buffer = np.empty(min(self.count, SCAN_CHUNK), dtype=self.dtype)
        best = -1
        with open(self.path, "rb") as f:
            while (n := f.readinto(memoryview(buffer).cast("B")) // buffer.itemsize) > 0:
                best = max(best, int(buffer[:n].max()))
        return best

    def __getstate__(self) -> dict:  # a DataLoader worker opens its own file
        return {**self.__dict__, "_file": None}


class ArrowTokens:
    """The `column` (lists of ids) of a dataset saved with `save_to_disk`: each Arrow chunk's flat values, read out of
    the memory map `datasets` opens (zero-copy)."""

    def __init__(self, path: str, column: str = "input_ids"):
        self.path, self.column = path, column
        self._arrays: list[np.ndarray] | None = None
        self._starts = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays], dtype=np.int64)])

    @property
    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:
            from datasets import load_from_disk

            table = load_from_disk(self.path).data
            self._arrays = [c.flatten().to_numpy(zero_copy_only=True) for c in table.column(self.column).chunks]
        return self._arrays

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        return _read_across(self._starts, lambda i, a, b: self.arrays[i][a:b], start, stop, np.int64)

    def identity(self) -> list:
        state = json.loads((Path(self.path) / "state.json").read_text())
        return [state.get("_fingerprint"), [f["filename"] for f in state.get("_data_files", [])]]

    def max_id(self) -> int:
        """The largest token, read record batch by record batch from the Arrow files (not mapped)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        state = json.loads((Path(self.path) / "state.json").read_text())
        best = -1
        for data_file in state.get("_data_files", []):
            with pa.OSFile(str(Path(self.path) / data_file["filename"])) as f:
                for batch in pa.ipc.open_stream(f):
                    values = batch.column(self.column).flatten()
                    if len(values):
                        best = max(best, pc.max(values).as_py())
        return best

    def __getstate__(self) -> dict:  # a DataLoader worker maps the files itself
        return {**self.__dict__, "_arrays": None}


class ArrayTokens:
    """Tokens held in memory (small corpora, tests)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)

    def __len__(self) -> int:
        return len(self.array)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]

    def max_id(self) -> int:
        return int(self.array.max()) if len(self.array) else -1


class TokenStream:
    """The segments' tokens back to back as one sequence; `read` copies a window out of them."""

    def __init__(self, segments: list):
        self.segments = segments
        self._starts = np.concatenate([[0], np.cumsum([len(s) for s in segments], dtype=np.int64)])  # (S + 1,)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) out of range of a stream of {len(self)}")
        return _read_across(self._starts, lambda i, a, b: self.segments[i].read(a, b), start, stop, np.int64)

    def max_token_id(self) -> int:
        """The largest id (each segment read in chunks, flat memory); -1 when empty."""
        return max((s.max_id() for s in self.segments), default=-1)


# ----------------------------------------------------------------------------------------- token folders


@dataclass
class TokenFolder:
    """Token streams per domain and split, what identifies them, and what is recorded about them."""

    path: str
    kind: str  # prepared | megatron | datatrove | hf
    streams: dict[str, dict[str, TokenStream]]
    fingerprint: str
    tokenizer: dict | None = None  # name, sha256, vocab_size, eos_token_id (prepared folders)
    max_ids: dict[str, dict[str, int]] | None = None  # recorded largest ids (prepared folders)
    manifest: dict = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return sorted(self.streams)

    def split(self, name: str) -> dict[str, TokenStream]:
        return {d: s[name] for d, s in sorted(self.streams.items()) if name in s}

    def max_token_ids(self, cache_dir: str | Path | None = None) -> dict[str, dict[str, int]]:
        """{domain: {split: largest id}}: recorded, or scanned once and cached under `cache_dir` by fingerprint."""
        if self.max_ids is not None:
            return self.max_ids
        cache = Path(cache_dir) / f"token-stats-{self.fingerprint[:16]}.json" if cache_dir else None
        if cache is not None and cache.is_file():
            self.max_ids = json.loads(cache.read_text())
            return self.max_ids
        self.max_ids = {
            d: {s: stream.max_token_id() for s, stream in splits.items()} for d, splits in self.streams.items()
        }
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache, self.max_ids)
        return self.max_ids


def file_sha256(path: Path) -> str:
    """SHA-256 of a file read in chunks (flat memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, value) -> None:
    """`value` as JSON at `path`, written whole or not at all (a temporary file renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def json_sha256(value) -> str:
    """SHA-256 of a JSON-able value (keys sorted): the fingerprints of sources, options and folders."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _domain_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def open_token_folder(path: str | Path) -> TokenFolder | None:
    """The folder as token streams, or None when it holds raw text (or is not a folder)."""
    root = Path(path)
    if not root.is_dir():
        return None
    if (root / MANIFEST).is_file():
        return _open_prepared(root)
    domains = _domain_dirs(root)
    if any((d / "train.idx").is_file() for d in domains):
        streams, identity = _megatron_streams(root, with_identity=True)
        return TokenFolder(str(root), "megatron", streams, json_sha256(["megatron", identity]))
    if any(_datatrove_files(d, "train") for d in domains):
        return _open_datatrove(root)
    if any(_is_saved_dataset(d) for d in domains):
        return _open_hf(root)
    return None


def _megatron_streams(root: Path, with_identity: bool = False) -> tuple[dict, list]:
    """{domain: {split: stream}} of the Megatron pairs under `root`, and (with_identity) what identifies them: each
    pair's token count, dtype and a hash of its index (the document structure)."""
    streams, identity = {}, []
    for d in _domain_dirs(root):
        if not (d / "train.idx").is_file():
            continue
        streams[d.name] = {}
        for split in SPLITS:
            if (d / f"{split}.idx").is_file() or (d / f"{split}.bin").is_file():
                index = read_index(d / split)
                streams[d.name][split] = TokenStream([index.tokens_segment()])
                if with_identity:
                    identity.append(
                        [d.name, split, index.tokens, index.dtype, file_sha256(Path(f"{index.prefix}.idx"))]
                    )
    return streams, identity


def _open_prepared(root: Path) -> TokenFolder:
    manifest = json.loads((root / MANIFEST).read_text())
    streams, _ = _megatron_streams(root)
    max_ids = {}
    for domain, splits in manifest["domains"].items():
        for split, stats in splits.items():
            stream = streams.get(domain, {}).get(split)
            if stream is None:
                raise ValueError(f"{root / domain / split}.bin: missing (listed in {root / MANIFEST})")
            if len(stream) != stats["tokens"]:
                raise ValueError(
                    f"{root / domain / split}.bin: {len(stream)} tokens, {root / MANIFEST} records {stats['tokens']}"
                )
            max_ids.setdefault(domain, {})[split] = stats["max_token_id"]
    tokenizer = manifest["tokenizer"]
    return TokenFolder(str(root), "prepared", streams, manifest["fingerprint"], tokenizer, max_ids, manifest)


def _datatrove_files(domain_dir: Path, split: str) -> list[Path]:
    folder = domain_dir / split
    if split == "train" and not folder.is_dir():
        folder = domain_dir  # shards directly in the domain folder are its training split
    return sorted(folder.glob("*.ds")) if folder.is_dir() else []


def _datatrove_segment(path: Path) -> FileTokens:
    """One `.ds` shard, its token size read off its `.ds.index` (document ends in tokens: the last is the count)."""
    index = Path(f"{path}.index")
    size, index_size = path.stat().st_size, index.stat().st_size if index.is_file() else -1
    if index_size < 8 or index_size % 8:
        raise ValueError(
            f"{index}: missing or corrupt (a datatrove .ds.index of uint64 document ends; {index_size} bytes)"
        )
    count = int(np.memmap(index, np.uint64, "r", index_size - 8, (1,))[0])
    if count == 0 or size % count or size // count not in (2, 4):
        raise ValueError(f"{path}: truncated or corrupt: {size} bytes for {count} tokens (from {index.name})")
    return FileTokens(str(path), "uint16" if size // count == 2 else "uint32", count)


def _open_datatrove(root: Path) -> TokenFolder:
    streams, identity = {}, []
    for d in _domain_dirs(root):
        for split in SPLITS:
            files = _datatrove_files(d, split)
            if files:
                segments = [_datatrove_segment(f) for f in files]
                streams.setdefault(d.name, {})[split] = TokenStream(segments)
                for f, s in zip(files, segments):
                    identity.append(
                        [d.name, split, f.name, s.count, hashlib.sha256(Path(f"{f}.index").read_bytes()).hexdigest()]
                    )
    names = {_datatrove_tokenizer(f) for d in _domain_dirs(root) for s in SPLITS for f in _datatrove_files(d, s)}
    tokenizer = {"name": names.pop()} if len(names) == 1 and None not in names else None
    return TokenFolder(str(root), "datatrove", streams, json_sha256(["datatrove", identity]), tokenizer)


def _datatrove_tokenizer(path: Path) -> str | None:
    """The tokenizer a `.ds.metadata` names (`name|token_size` on its first line), or None."""
    meta = Path(f"{path}.metadata")
    if not meta.is_file():
        return None
    name = meta.read_text().splitlines()[0].rpartition("|")[0]
    return None if name.startswith("Unknown Tokenizer") else name


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _open_hf(root: Path) -> TokenFolder:
    streams, identity = {}, []
    for d in _domain_dirs(root):
        if (d / "dataset_dict.json").is_file():
            splits = {s: d / s for s in json.loads((d / "dataset_dict.json").read_text())["splits"] if s in SPLITS}
        elif (d / "state.json").is_file():
            splits = {"train": d}
        else:
            continue
        for split, folder in splits.items():
            columns = json.loads((folder / "dataset_info.json").read_text()).get("features", {})
            if "input_ids" not in columns:
                raise ValueError(
                    f"{folder}: a saved dataset without an 'input_ids' column: it has {sorted(columns)} "
                    "(tokenize it first, e.g. dataset.map(lambda b: tokenizer(b['text']), batched=True))"
                )
            segment = ArrowTokens(str(folder))
            streams.setdefault(d.name, {})[split] = TokenStream([segment])
            identity.append([d.name, split, segment.identity()])
    return TokenFolder(str(root), "hf", streams, json_sha256(["hf", identity]))


__all__ = [
    "MANIFEST",
    "ArrayTokens",
    "ArrowTokens",
    "FileTokens",
    "IndexWriter",
    "IndexedFile",
    "TokenFolder",
    "TokenStream",
    "open_token_folder",
    "read_index",
    "write_index",
]
