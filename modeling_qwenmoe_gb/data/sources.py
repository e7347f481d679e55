"""Document sources: where each domain's text comes from, cut into units that processes read on their own.

Features
- Local folders, one sub-folder per domain; per split (`train`, `test`): one file `<split>.jsonl`, `.jsonl.gz`,
  `.jsonl.zst` or `.parquet` (a `text_field` per row), or a folder `<split>/` of such files or of `.txt` files (a file
  per document), read in name order.
- Hub datasets by name, streamed through `datasets` with no document cap: `hub:org/name` with a `domain_column`, or
  one dataset per domain (`hub:code=org/a,math=org/b`; a bare name is the domain named after its last path part).
  The dataset's `test` (or `validation`) split is the test split; without one, a document is held out when a hash of
  its text falls below `test_fraction` (the same documents whatever the sharding).
- `synthetic`: the embedded corpus (`synthetic.py`).
- `plan_units(...)`: the sources as an ordered list of units (a byte range of a JSON-lines file cut at line ends, a run
  of parquet row groups, a run of text files, a compressed file, a Hub stream shard, a synthetic domain), each read by
  `unit.documents()` in any process, and a fingerprint of the sources (paths, sizes, modification times, Hub
  revisions) that identifies prepared data.
- A row that is not UTF-8, not JSON, not an object or without the text field is a `ValueError` naming the file and
  the line; a Hub dataset without the domain column names the columns it has.
- `load_corpus(...)`: a small corpus as Python lists, `{domain: {"train": [...], "test": [...]}}`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .formats import SPLITS, json_sha256
from .synthetic import SYNTHETIC_DOMAINS, synthetic_documents

UNIT_BYTES = 16 << 20  # text per unit: enough to keep a process busy ~1 s, small enough to balance N processes
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
HUB_TEST_SPLITS = ("test", "validation")

# ----------------------------------------------------------------------------------------- checked reading


def check_utf8(path: Path, data: bytes | None = None, start: int = 0) -> str:
    """`data` (the file's bytes from byte `start`; default the whole file) as text; `ValueError` naming the file, the
    line and the byte where it is not UTF-8."""
    data = path.read_bytes() if data is None else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = _lines_before(path, start + error.start) + 1
        raise ValueError(
            f"{path}: not UTF-8 at line {line} (byte {start + error.start}: "
            f"{data[error.start : error.start + 1]!r}); allowed UTF-8 text"
        ) from None


def _lines_before(path: Path, offset: int) -> int:
    """Newlines in the file before byte `offset` (only computed for an error message)."""
    count = 0
    with _open_binary(path) as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def _row_text(path: Path, number: int, line: str, text_field: str) -> str | None:
    """The text of one JSON line (None for a blank line); `ValueError` naming the file and the line."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {number} is not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{path}: line {number} has no text field {text_field!r} (a string): got {fields}")
    return row[text_field]


def read_jsonl(path: Path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """The `text_field` of the first `max_docs` rows of a JSON-lines file (plain, .gz or .zst; blank lines skipped)."""
    texts = []
    unit = JsonlFile if str(path).endswith((".gz", ".zst")) else JsonlRange
    for text in unit("", "train", str(path), text_field=text_field).documents_only():
        if max_docs is not None and len(texts) >= max_docs:
            break
        texts.append(text)
    return texts


def _open_binary(path: Path):
    """The file's (decompressed) bytes as a raw stream."""
    name = str(path)
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


# ----------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """Documents one process reads on its own; `documents()` yields `(domain, split, text)` in source order."""

    domain: str
    split: str

    def documents(self) -> Iterator[tuple[str, str, str]]:
        for text in self.documents_only():
            yield self.domain, self.split, text

    def documents_only(self) -> Iterator[str]:
        raise NotImplementedError

    @property
    def size(self) -> int | None:
        """Bytes of source text, for the progress bar (None: unknown)."""
        return None


@dataclass(frozen=True)
class JsonlRange(Unit):
    """Lines of a plain JSON-lines file in bytes [start, stop) (both at line starts; stop -1: the end)."""

    path: str
    start: int = 0
    stop: int = -1
    text_field: str = "text"

    def documents_only(self) -> Iterator[str]:
        path = Path(self.path)
        with open(path, "rb") as f:
            f.seek(self.start)
            text = check_utf8(path, f.read(self.stop - self.start if self.stop >= 0 else -1), self.start)
        first_line = None
        for index, line in enumerate(text.split("\n")):  # not splitlines(): U+2028 etc. may sit inside a string
            if not line.strip():
                continue
            try:
                yield _row_text(path, 0, line, self.text_field)
            except ValueError:  # name the line of the file, counted only now
                first_line = _lines_before(path, self.start) + 1 if first_line is None else first_line
                _row_text(path, first_line + index, line, self.text_field)
                raise

    @property
    def size(self) -> int:
        return (self.stop if self.stop >= 0 else os.path.getsize(self.path)) - self.start


@dataclass(frozen=True)
class JsonlFile(Unit):
    """A whole compressed JSON-lines file (.gz, .zst), read as a stream."""

    path: str
    text_field: str = "text"

    def documents_only(self) -> Iterator[str]:
        path = Path(self.path)
        with _open_binary(path) as raw:
            for number, line in enumerate(io.BufferedReader(raw, 1 << 20), start=1):  # lines end at b"\n" only
                try:
                    text = _row_text(path, number, line.decode("utf-8"), self.text_field)
                except UnicodeDecodeError:
                    raise ValueError(f"{path}: not UTF-8 at line {number} (decompressed); allowed UTF-8 text") from None
                if text is not None:
                    yield text

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)


@dataclass(frozen=True)
class ParquetRowGroups(Unit):
    """Row groups [first, last) of a parquet file, the `text_field` column."""

    path: str
    first: int
    last: int
    text_field: str = "text"
    nbytes: int = 0

    def documents_only(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(self.path)
        for batch in reader.iter_batches(row_groups=range(self.first, self.last), columns=[self.text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)

    @property
    def size(self) -> int:
        return self.nbytes


@dataclass(frozen=True)
class TextFiles(Unit):
    """A run of text files, each one document."""

    paths: tuple[str, ...]

    def documents_only(self) -> Iterator[str]:
        for path in self.paths:
            yield check_utf8(Path(path))

    @property
    def size(self) -> int:
        return sum(os.path.getsize(p) for p in self.paths)


@dataclass(frozen=True)
class SyntheticUnit(Unit):
    num_docs: int
    seed: int = 0

    def documents_only(self) -> Iterator[str]:
        yield from synthetic_documents(self.domain, self.split, self.num_docs, self.seed)


@dataclass(frozen=True)
class HubShard(Unit):
    """Shard `shard` of `num_shards` of a streamed Hub dataset split. `domain_column` set: each row's domain is that
    column (`domain` unused); `hash_split`: the split is decided per document (`test_fraction` of them to test)."""

    name: str
    hub_split: str
    shard: int
    num_shards: int
    text_field: str = "text"
    domain_column: str | None = None
    hash_split: bool = False
    test_fraction: float = 0.01

    def documents(self) -> Iterator[tuple[str, str, str]]:
        stream = _hub_stream(self.name, self.hub_split).shard(num_shards=self.num_shards, index=self.shard)
        for row in stream:
            text = row.get(self.text_field)
            if not isinstance(text, str):
                continue
            domain = str(row[self.domain_column]) if self.domain_column else self.domain
            split = self.split
            if self.hash_split:
                split = "test" if held_out(text, self.test_fraction) else "train"
            yield domain, split, text


def held_out(text: str, fraction: float) -> bool:
    """Whether a document goes to the test split: a hash of its text below `fraction` (deterministic, independent
    of the order and sharding of the stream)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _hub_stream(name: str, split: str):
    from datasets import load_dataset

    return load_dataset(name, split=split, streaming=True)


# ----------------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """The sources as ordered units, with what identifies them."""

    units: list[Unit]
    identity: list = field(default_factory=list)  # JSON-able facts that change when the sources change

    @property
    def fingerprint(self) -> str:
        return json_sha256(self.identity)


def plan_units(
    data: str,
    text_field: str = "text",
    domain_column: str | None = None,
    synthetic_docs: int = 300,
    synthetic_test_docs: int = 30,
    test_fraction: float = 0.01,
    unit_bytes: int = UNIT_BYTES,
) -> Plan:
    """`"synthetic"`, a local folder of domains, or `"hub:name1,name2"` as a `Plan`."""
    if data == "synthetic":
        units = [
            SyntheticUnit(d, s, n)
            for d in SYNTHETIC_DOMAINS
            for s, n in (("train", synthetic_docs), ("test", synthetic_test_docs))
        ]
        return Plan(units, ["synthetic", "v1", synthetic_docs, synthetic_test_docs])
    if data.startswith("hub:"):
        return _plan_hub([n for n in data[4:].split(",") if n], text_field, domain_column, test_fraction)
    return _plan_local(Path(data), text_field, unit_bytes)


def _plan_local(root: Path, text_field: str, unit_bytes: int) -> Plan:
    if not root.is_dir():
        raise ValueError(f"data={str(root)!r} is not a folder: allowed 'synthetic', a folder or 'hub:<name>'")
    units: list[Unit] = []
    identity: list = ["local", text_field, unit_bytes]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {split: _split_files(sub, split) for split in SPLITS}
        if not files["train"]:
            continue
        for split in SPLITS:
            for path in files[split]:
                stat = path.stat()
                identity.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
            units.extend(_file_units(sub.name, split, files[split], text_field, unit_bytes))
    if not units:
        raise ValueError(
            f"data={str(root)!r} has no domains: allowed sub-folders with train.jsonl (+ test.jsonl; also .jsonl.gz, "
            ".jsonl.zst, .parquet) or train/*.txt (+ test/*.txt)"
        )
    return Plan(units, identity)


def _split_files(domain_dir: Path, split: str) -> list[Path]:
    """The files of one split of a domain folder: `<split>.<suffix>`, or the files of `<split>/` in name order."""
    for suffix in FILE_SUFFIXES:
        if (domain_dir / f"{split}{suffix}").is_file():
            return [domain_dir / f"{split}{suffix}"]
    folder = domain_dir / split
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.name.endswith(FILE_SUFFIXES) or p.suffix == ".txt"))


def _file_units(domain: str, split: str, files: list[Path], text_field: str, unit_bytes: int) -> list[Unit]:
    units: list[Unit] = []
    texts: list[str] = []
    for path in files:
        name = path.name
        if name.endswith(".txt"):
            texts.append(str(path))
            if sum(os.path.getsize(p) for p in texts) >= unit_bytes:
                units.append(TextFiles(domain, split, tuple(texts)))
                texts = []
        elif name.endswith(".jsonl"):
            units.extend(
                JsonlRange(domain, split, str(path), a, b, text_field) for a, b in _line_ranges(path, unit_bytes)
            )
        elif name.endswith((".jsonl.gz", ".jsonl.zst")):
            units.append(JsonlFile(domain, split, str(path), text_field))
        else:
            units.extend(_parquet_units(domain, split, path, text_field, unit_bytes))
    if texts:
        units.append(TextFiles(domain, split, tuple(texts)))
    return units


def _line_ranges(path: Path, unit_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `unit_bytes` covering the file, each starting at a line start."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + unit_bytes < size:
            f.seek(cuts[-1] + unit_bytes)
            rest = f.readline()  # to the end of the line the cut falls in
            cut = cuts[-1] + unit_bytes + len(rest)
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _parquet_units(domain: str, split: str, path: Path, text_field: str, unit_bytes: int) -> list[Unit]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    columns = meta.schema.names
    if text_field not in columns:
        raise ValueError(f"{path}: no text column {text_field!r}: allowed one of {columns} (--text_field)")
    units, first, nbytes = [], 0, 0
    for group in range(meta.num_row_groups):
        nbytes += meta.row_group(group).total_byte_size
        if nbytes >= unit_bytes or group == meta.num_row_groups - 1:
            units.append(ParquetRowGroups(domain, split, str(path), first, group + 1, text_field, nbytes))
            first, nbytes = group + 1, 0
    return units


def _plan_hub(specs: list[str], text_field: str, domain_column: str | None, test_fraction: float) -> Plan:
    from datasets import get_dataset_split_names

    units: list[Unit] = []
    identity: list = ["hub", text_field, domain_column, test_fraction]
    for spec in specs:
        domain, _, name = spec.rpartition("=")
        domain = domain or name.rstrip("/").split("/")[-1]
        splits = get_dataset_split_names(name)
        if "train" not in splits:
            raise ValueError(f"data=hub:{name} has no train split: it has {splits}")
        test = next((s for s in HUB_TEST_SPLITS if s in splits), None)
        identity.append([name, _hub_revision(name), splits])
        for split, hub_split in (("train", "train"), ("test", test)):
            if hub_split is None:
                continue
            stream = _hub_stream(name, hub_split)
            _check_columns(name, stream, text_field, domain_column)
            n = stream.num_shards
            units.extend(
                HubShard(domain, split, name, hub_split, i, n, text_field, domain_column, test is None, test_fraction)
                for i in range(n)
            )
    return Plan(units, identity)


def _check_columns(name: str, stream, text_field: str, domain_column: str | None) -> None:
    columns = stream.column_names
    if columns is None:  # no features declared: read them off the first row
        columns = list(next(iter(stream), {}))
    for flag, column in (("text_field", text_field), ("domain_column", domain_column)):
        if column is not None and column not in columns:
            raise ValueError(f"data=hub:{name} has no column {column!r} (--{flag}): allowed one of {sorted(columns)}")


def _hub_revision(name: str) -> list | str:
    """What identifies a Hub dataset's content: the sizes and times of a local folder's files, or the Hub commit."""
    path = Path(name)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name).sha or name
    except Exception:  # offline: the name (and the cache's content) stands for it
        return name


# ----------------------------------------------------------------------------------------- small corpora in memory


def load_corpus(data: str, max_docs: int | None = None, **options) -> dict[str, dict[str, list[str]]]:
    """`{domain: {"train": [doc, ...], "test": [doc, ...]}}` of `data` (as `plan_units` takes it; at most `max_docs`
    per domain and split), for small corpora: training reads prepared token files instead (`prepare.py`)."""
    corpus: dict[str, dict[str, list[str]]] = {}
    for unit in plan_units(data, **options).units:
        for domain, split, text in unit.documents():
            docs = corpus.setdefault(domain, {"train": [], "test": []})[split]
            if max_docs is None or len(docs) < max_docs:
                docs.append(text)
    return corpus


__all__ = [
    "HubShard",
    "JsonlFile",
    "JsonlRange",
    "ParquetRowGroups",
    "Plan",
    "SyntheticUnit",
    "TextFiles",
    "Unit",
    "check_utf8",
    "held_out",
    "load_corpus",
    "plan_units",
    "read_jsonl",
]
