"""`qwenmoe-gb prepare-data`: tokenize once, in parallel, into token files per domain and split.

Features
- Any source `sources.plan_units` reads (local folders of .jsonl / .jsonl.gz / .jsonl.zst / .parquet / .txt, Hub
  datasets streamed with no document cap, `synthetic`), cut into units of ~16 MB that `num_proc` processes (default:
  the cores) tokenize with the fast tokenizer's batch API (`Encoder`), documents joined with EOS.
- Output: Megatron indexed datasets `<domain>/train.bin|idx` (+ `test.bin|idx`) — what Megatron-Core, NeMo and
  LLaMA-Factory read too — and `manifest.json` (written last): tokenizer name, SHA-256 and vocabulary size, dtype,
  per-domain tokens, documents and largest id, the sources' fingerprint, and the fingerprint of it all.
- The same files whatever `num_proc` (units are merged in source order).
- A rerun on the same sources, tokenizer and options is a cache hit; an interrupted prepare (a crash, a kill)
  continues from its finished units (`<output_dir>/.prepare/`); a folder prepared from something else is never
  overwritten without `overwrite=True`. A lock file lets concurrent preparers (ranks, nodes) wait for one another.
- `--max_tokens_per_domain` / `--max_docs_per_domain`: the first documents of each domain in source order (whole
  documents), and no unit past the cap is read.
- A progress bar with tokens/s.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_module
import shutil
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .formats import (
    MANIFEST,
    IndexWriter,
    TokenFolder,
    json_sha256,
    open_token_folder,
    read_index,
    write_index,
    write_json_atomic,
)
from .sources import UNIT_BYTES, Plan, Unit, plan_units
from .tokenizer import Encoder, load_tokenizer

FORMAT = "qwenmoe-gb-prepared-v1"
WORK_DIR = ".prepare"
DONE = "done.json"
BATCH_CHARS = 1 << 20  # text per encode_batch call


@dataclass
class PrepareArguments:
    """The flags of `qwenmoe-gb prepare-data`."""

    data: str = field(default="synthetic", metadata={"help": "'synthetic', a folder of domains, or 'hub:name1,...'"})
    tokenizer: str = field(default="byte", metadata={"help": "'byte' or a tokenizer path / Hub name"})
    output_dir: str = field(default="", metadata={"help": "where the token files and manifest.json go"})
    num_proc: int | None = field(default=None, metadata={"help": "tokenizing processes (default: the cores)"})
    max_tokens_per_domain: int | None = field(default=None, metadata={"help": "cap training tokens per domain"})
    max_docs_per_domain: int | None = field(default=None, metadata={"help": "cap documents per domain and split"})
    text_field: str = field(default="text", metadata={"help": "text field of jsonl / parquet rows / Hub datasets"})
    domain_column: str | None = field(default=None, metadata={"help": "domain column of a mixed Hub dataset"})
    synthetic_docs: int = field(default=300, metadata={"help": "synthetic training documents per domain"})
    test_fraction: float = field(
        default=0.01, metadata={"help": "held-out share of a Hub dataset without a test split"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a folder prepared from other sources"})


def default_cache_dir() -> Path:
    """Where raw data is prepared when no folder is given: `$QWENMOE_GB_DATA_CACHE`, else
    `$XDG_CACHE_HOME/qwenmoe_gb/data` (`~/.cache/qwenmoe_gb/data`), one sub-folder per fingerprint — shared by runs,
    `compare` arms and `evaluate`, as `datasets` shares its cache."""
    if os.environ.get("QWENMOE_GB_DATA_CACHE"):
        return Path(os.environ["QWENMOE_GB_DATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwenmoe_gb" / "data"


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_data(
    data: str,
    tokenizer: str = "byte",
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    max_tokens_per_domain: int | None = None,
    max_docs_per_domain: int | None = None,
    text_field: str = "text",
    domain_column: str | None = None,
    synthetic_docs: int = 300,
    test_fraction: float = 0.01,
    overwrite: bool = False,
    progress: bool = True,
    unit_bytes: int = UNIT_BYTES,
    loaded_tokenizer=None,
) -> Path:
    """Prepare `data` with `tokenizer` into `output_dir` (or `<cache_dir>/<fingerprint>`, by default in
    `default_cache_dir()`) and return the folder.
    `unit_bytes`: source text per unit (a process's share at a time; part of what identifies the work in progress).
    `loaded_tokenizer`: `tokenizer` already loaded by the caller (not loaded again)."""
    for name, value in (("max_tokens_per_domain", max_tokens_per_domain), ("max_docs_per_domain", max_docs_per_domain),
                        ("num_proc", num_proc)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} is not allowed: an integer >= 1 is required")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is not allowed: a number in [0, 1) is required")
    encoder = Encoder.of(loaded_tokenizer or load_tokenizer(tokenizer), tokenizer)
    plan = plan_units(
        data, text_field, domain_column, synthetic_docs, test_fraction=test_fraction, unit_bytes=unit_bytes
    )
    options = {"text_field": text_field, "domain_column": domain_column, "synthetic_docs": synthetic_docs,
               "test_fraction": test_fraction, "max_tokens_per_domain": max_tokens_per_domain,
               "max_docs_per_domain": max_docs_per_domain}  # fmt: skip
    fingerprint = json_sha256([FORMAT, plan.fingerprint, encoder.sha256, options])
    if output_dir is None:
        output_dir = Path(cache_dir or default_cache_dir()) / fingerprint[:16]
    out = Path(output_dir)
    if not data.startswith("hub:") and data != "synthetic" and out.resolve().is_relative_to(Path(data).resolve()):
        raise ValueError(f"output_dir={str(out)!r} is inside data={data!r}: allowed a folder outside the sources")
    if _cached(out, fingerprint) is not None:
        print(f"prepared data: {out} (cache hit: same sources, tokenizer and options)")
        return out
    out.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(out / ".lock")):
        if _cached(out, fingerprint) is not None:  # another process prepared it while this one waited
            return out
        _claim(out, fingerprint, plan, encoder, options, overwrite)
        start = time.time()
        caps = {"tokens": max_tokens_per_domain, "docs": max_docs_per_domain}
        done = _tokenize(plan.units, encoder, out / WORK_DIR, num_proc or default_num_proc(), caps, progress)
        domains = _merge(plan.units, done, out, encoder.dtype, caps)
        seconds = time.time() - start
        tokens = sum(s["tokens"] for splits in domains.values() for s in splits.values())
        manifest = {
            "format": FORMAT, "fingerprint": fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sources": {"data": data, "fingerprint": plan.fingerprint, "units": len(plan.units)},
            "tokenizer": encoder.describe(), "dtype": encoder.dtype.name, "options": options, "domains": domains,
            "prepare": {"num_proc": num_proc or default_num_proc(), "seconds": round(seconds, 3),
                        "tokens_per_second": round(tokens / max(seconds, 1e-9))},
        }  # fmt: skip
        write_json_atomic(out / MANIFEST, manifest)
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    print(f"prepared data: {out} ({tokens:,} tokens in {seconds:.1f} s, {tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return out


def _cached(out: Path, fingerprint: str) -> TokenFolder | None:
    """The prepared folder when it holds exactly this preparation (its files checked), else None."""
    manifest = out / MANIFEST
    if not manifest.is_file() or json.loads(manifest.read_text()).get("fingerprint") != fingerprint:
        return None
    return open_token_folder(out)


def _claim(out: Path, fingerprint: str, plan: Plan, encoder: Encoder, options: dict, overwrite: bool) -> None:
    """Make `out` this preparation's: keep its finished units, refuse (or with `overwrite` clear) anything else."""
    manifest = out / MANIFEST
    work = out / WORK_DIR
    earlier = json.loads(manifest.read_text()) if manifest.is_file() else None
    if earlier is None and (work / "plan.json").is_file():
        earlier = json.loads((work / "plan.json").read_text())
    if earlier is not None and earlier.get("fingerprint") != fingerprint:
        changed = _changes(earlier, plan, encoder, options)
        if not overwrite:
            raise ValueError(
                f"output_dir={str(out)!r} holds data prepared with other {changed}: allowed --overwrite true (replace "
                "it) or another --output_dir"
            )
        for path in [manifest, work, *(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    record = {"fingerprint": fingerprint, "sources": {"fingerprint": plan.fingerprint},
              "tokenizer": encoder.describe(), "options": options}  # fmt: skip
    write_json_atomic(work / "plan.json", record)


def _changes(earlier: dict, plan: Plan, encoder: Encoder, options: dict) -> str:
    parts = []
    if earlier.get("sources", {}).get("fingerprint") != plan.fingerprint:
        parts.append("sources")
    if earlier.get("tokenizer", {}).get("sha256") != encoder.sha256:
        parts.append(f"tokenizer ({earlier.get('tokenizer', {}).get('name')!r}, now {encoder.name!r})")
    before = earlier.get("options", {})
    parts += [f"{k}={before.get(k)!r} (now {v!r})" for k, v in options.items() if before.get(k) != v]
    return ", ".join(parts) or "settings"


# ----------------------------------------------------------------------------------------- tokenizing units


def _unit_dir(work: Path, index: int) -> Path:
    return work / f"unit-{index:06d}"


def _tokenize(units: list[Unit], encoder: Encoder, work: Path, num_proc: int, caps: dict, progress: bool) -> dict:
    """{unit index: its done record} for every unit needed, tokenizing the ones an earlier run did not finish."""
    done = {}
    for i in range(len(units)):
        if (_unit_dir(work, i) / DONE).is_file():
            done[i] = json.loads((_unit_dir(work, i) / DONE).read_text())
    todo = deque(i for i in range(len(units)) if i not in done)
    if done:
        print(f"prepare: {len(done)} of {len(units)} units finished by an earlier run, kept")
    sizes = [u.size for u in units]
    progress_bar = _Progress(sizes, done, progress)
    if num_proc == 1 or len(todo) <= 1:  # in this process
        for i in todo:
            if not _past_cap(i, units, done, caps):
                done[i] = _tokenize_unit(units[i], encoder, str(_unit_dir(work, i)), caps)
                progress_bar.tokens_done(done[i]["tokens"])
                progress_bar.unit_done(sizes[i])
        progress_bar.close()
        return done
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    reports = context.Queue()
    with ProcessPoolExecutor(num_proc, context, initializer=_init_worker, initargs=(reports,)) as pool:
        running: dict[Future, int] = {}
        try:
            while todo or running:
                while todo and len(running) < 2 * num_proc:
                    i = todo.popleft()
                    if not _past_cap(i, units, done, caps):
                        running[pool.submit(_tokenize_unit, units[i], encoder, str(_unit_dir(work, i)), caps)] = i
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                progress_bar.drain(reports)
                for future in finished:
                    i = running.pop(future)
                    done[i] = future.result()  # a worker's error (a bad row, ...) is raised here
                    progress_bar.unit_done(sizes[i])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # finished units stay on disk for the next run
            raise
    progress_bar.drain(reports)
    progress_bar.close()
    return done


_REPORTS = None  # the progress queue of a worker process (set by the pool's initializer)


def _init_worker(reports) -> None:
    global _REPORTS
    _REPORTS = reports


class _Progress:
    """A tqdm bar over the sources' bytes (or tokens, when a source's size is unknown) with tokens and tokens/s."""

    def __init__(self, sizes: list[int | None], done: dict, enabled: bool):
        from tqdm.auto import tqdm

        self.by_bytes = all(s is not None for s in sizes)
        total = sum(sizes) if self.by_bytes else None
        self.bar = tqdm(total=total, unit="B" if self.by_bytes else "tok", unit_scale=True, desc="prepare",
                        disable=not enabled)  # fmt: skip
        self.tokens, self.start = 0, time.time()
        for i in done:
            self.unit_done(sizes[i])

    def unit_done(self, size: int | None) -> None:
        if self.by_bytes:
            self.bar.update(size)

    def tokens_done(self, tokens: int) -> None:
        self.tokens += tokens
        if not self.by_bytes:
            self.bar.update(tokens)
        rate = self.tokens / max(time.time() - self.start, 1e-9)
        self.bar.set_postfix(tokens=f"{self.tokens:,}", tok_s=f"{rate:,.0f}")

    def drain(self, reports) -> None:
        while True:
            try:
                self.tokens_done(reports.get_nowait())
            except queue_module.Empty:
                return

    def close(self) -> None:
        self.bar.close()


def _past_cap(i: int, units: list[Unit], done: dict, caps: dict) -> bool:
    """Whether the documents before unit i already fill its domain and split's cap (then it is not read). Only for a
    unit of one domain whose earlier units of that domain and split are all finished."""
    unit = units[i]
    if getattr(unit, "domain_column", None) or not (caps["docs"] or (caps["tokens"] and unit.split == "train")):
        return False
    earlier = [j for j in range(i) if units[j].domain == unit.domain and units[j].split == unit.split]
    if any(j not in done for j in earlier):
        return False
    key = f"{unit.domain}/{unit.split}"
    stats = [done[j]["parts"][key] for j in earlier if key in done[j]["parts"]]
    docs, tokens = sum(s["documents"] for s in stats), sum(s["tokens"] for s in stats)
    return bool(caps["docs"] and docs >= caps["docs"]) or bool(
        unit.split == "train" and caps["tokens"] and tokens >= caps["tokens"]
    )


def _tokenize_unit(unit: Unit, encoder: Encoder, folder: str, caps: dict) -> dict:
    """Tokenize one unit into `folder` (a Megatron pair per domain and split it holds, then `done.json`)."""
    out = Path(folder)
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted attempt left
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    built = encoder.build()
    writers: dict[str, IndexWriter] = {}
    pending: dict[str, list[str]] = {}
    chars: dict[str, int] = {}
    for domain, split, text in unit.documents():
        key = f"{domain}/{split}"
        if key not in writers:
            if not domain or "/" in domain or "\\" in domain or domain.startswith("."):
                raise ValueError(
                    f"domain {domain!r} cannot name a folder: allowed names without '/' that do not start with '.'"
                )
            writers[key] = IndexWriter(tmp / f"part-{len(writers)}", encoder.dtype)
            pending[key], chars[key] = [], 0
        if _full(writers[key], len(pending[key]), split, caps):
            continue
        pending[key].append(text)
        chars[key] += len(text)
        if chars[key] >= BATCH_CHARS:
            _flush(writers[key], pending[key], encoder, built)
            pending[key], chars[key] = [], 0
    for key, writer in writers.items():
        _flush(writer, pending[key], encoder, built)
    parts = {}
    for index, (key, writer) in enumerate(writers.items()):
        parts[key] = {"part": f"part-{index}", **writer.close()}
    record = {"parts": parts, "tokens": sum(p["tokens"] for p in parts.values())}
    write_json_atomic(tmp / DONE, record)
    tmp.rename(out)
    return record


def _full(writer: IndexWriter, pending: int, split: str, caps: dict) -> bool:
    """Whether this unit already holds its cap of a domain and split (the merge cuts the exact prefix)."""
    if caps["docs"] and writer.documents + pending >= caps["docs"]:
        return True
    return bool(split == "train" and caps["tokens"] and writer.tokens >= caps["tokens"])


def _flush(writer: IndexWriter, texts: list[str], encoder: Encoder, built) -> None:
    if not texts:
        return
    flat, lengths = encoder.encode_batch(built, texts)
    writer.add(flat, lengths)
    if _REPORTS is not None:
        _REPORTS.put(len(flat))


# ----------------------------------------------------------------------------------------- merging


def _merge(units: list[Unit], done: dict, out: Path, dtype, caps: dict) -> dict:
    """Each domain and split's parts, in unit order and cut to the caps, as `<domain>/<split>.bin|idx`; returns
    {domain: {split: {"tokens", "documents", "max_token_id"}}}."""
    parts: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for i in sorted(done):
        for key, stats in done[i]["parts"].items():
            domain, _, split = key.rpartition("/")
            parts.setdefault((domain, split), []).append((_unit_dir(out / WORK_DIR, i) / stats["part"], stats))
    domains: dict[str, dict] = {}
    for (domain, split), pieces in sorted(parts.items()):
        kept = _cut(pieces, split, caps)
        if kept:
            domains.setdefault(domain, {})[split] = _write_split(out / domain, split, kept, dtype)
    empty = sorted({u.domain for u in units if not getattr(u, "domain_column", None)} - set(domains))
    empty += sorted(d for d, s in domains.items() if "train" not in s)
    if empty:
        raise ValueError(f"domain {empty[0]!r} has no training documents: allowed domains with at least one")
    return domains


def _cut(pieces: list[tuple[Path, dict]], split: str, caps: dict) -> list[tuple[Path, int, int, dict]]:
    """[(part prefix, documents kept, tokens kept, part stats)] of the parts in order: whole documents within the
    caps."""
    kept, docs, tokens = [], 0, 0
    token_cap = caps["tokens"] if split == "train" else None
    for prefix, stats in pieces:
        n = stats["documents"]
        if caps["docs"]:
            n = min(n, caps["docs"] - docs)
        lengths = read_index(prefix).lengths()
        if token_cap:
            ends = np.cumsum(lengths[:n], dtype=np.int64)  # (n,)
            n = int(np.searchsorted(ends, token_cap - tokens, side="right"))
        count = int(np.sum(lengths[:n], dtype=np.int64))
        if n > 0:
            kept.append((prefix, n, count, stats))
        docs, tokens = docs + n, tokens + count
        if n < stats["documents"]:
            break
    return kept


def _write_split(folder: Path, split: str, kept: list[tuple[Path, int, int, dict]], dtype) -> dict:
    """The kept parts back to back as `<folder>/<split>.bin|idx` (one whole part: hard links, no copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / split
    if len(kept) == 1 and kept[0][1] == kept[0][3]["documents"]:
        for ext in (".bin", ".idx"):
            Path(f"{final}{ext}").unlink(missing_ok=True)
            _link_or_copy(Path(f"{kept[0][0]}{ext}"), Path(f"{final}{ext}"))
    else:
        with open(f"{final}.bin", "wb") as f:
            for prefix, _, count, _ in kept:
                with open(f"{prefix}.bin", "rb") as part:
                    _copy(part, f, count * np.dtype(dtype).itemsize)
        lengths = lambda: (read_index(prefix).lengths()[:n] for prefix, n, _, _ in kept)  # noqa: E731
        write_index(Path(f"{final}.idx"), dtype, lengths, sum(n for _, n, _, _ in kept))
    index = read_index(final)
    largest = -1
    for prefix, n, count, stats in kept:  # a whole part's largest id is recorded; a cut one's is read
        whole = n == stats["documents"]
        cut = read_index(prefix).tokens_segment()
        largest = max(largest, stats["max_token_id"] if whole else int(cut.read(0, count).max()))
    return {"tokens": index.tokens, "documents": index.num_documents, "max_token_id": largest}


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _copy(source, target, nbytes: int) -> None:
    while nbytes > 0:
        chunk = source.read(min(nbytes, 1 << 24))
        if not chunk:
            raise ValueError(f"{source.name}: shorter than its index")
        target.write(chunk)
        nbytes -= len(chunk)


def prepare_cmd(argv: list[str]) -> Path:
    from ..cli import command_parser

    (args,) = command_parser("prepare-data").parse_args_into_dataclasses(args=argv)
    if not args.output_dir:
        raise ValueError("output_dir='' is not allowed: give --output_dir DIR")
    options = {k: v for k, v in vars(args).items() if k not in ("data", "tokenizer", "output_dir")}
    return prepare_data(args.data, args.tokenizer, args.output_dir, **options)


__all__ = ["FORMAT", "PrepareArguments", "default_cache_dir", "default_num_proc", "prepare_cmd", "prepare_data"]
