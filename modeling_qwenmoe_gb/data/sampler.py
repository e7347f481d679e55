"""Training batches from token streams: packing at read time, an exact domain mixture, domain-pure micro-batches and a
resume that jumps to its position.

Features
- `TokenDomains`: a map-style dataset over each domain's token stream cut into `seq_len` windows at read time (a new
  `seq_len` needs no new prepare); no Python object per sequence or token — per-rank memory is flat in corpus size.
- `quota_sequence`: the domain of every unit of the run by Balinski & Young's quota method (the next unit goes to the
  domain with the earliest deadline among those below their upper quota), so after any n units each domain d has
  floor(n·w_d) or ceil(n·w_d) of them — the mixture is exact at every prefix. It is periodic (period = the sum of the
  integer weights), so the domain of unit u and how many of its domain came before are O(1) to compute.
- `permutation`: a seeded bijection of [0, n) (a Feistel network with cycle walking) evaluated per index: each
  domain is walked pass after pass in a fresh order with no index list in memory.
- `DomainBatchSampler`: micro-batches of one domain each (or of domain-pure chunks: `chunk_size`), a pure function of
  (seed, position): `start` jumps to any micro-batch in O(1) (a resume at step k costs the same for every k); under
  accelerate the stream is dealt round-robin to the ranks (micro-batch j to rank j % world) and each rank reads only
  its own micro-batches' tokens.
- `data_state` / `check_data_state`: what a checkpoint records of the stream (data and tokenizer fingerprints,
  seq_len, weights, seed, batch shape) and the position; a resume on changed data is refused naming what changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .formats import ArrayTokens, TokenStream

MAX_PERIOD = 1 << 16  # weights are rounded to a common denominator at most this (a warning says so)

# ----------------------------------------------------------------------------------------- dataset


class TokenDomains(Dataset):
    """The sequences of each domain (its stream cut into `seq_len` windows; the tail is dropped), indexed as the
    concatenation of the domains in `domains` order. Item: `{"input_ids": LongTensor (seq_len,)}`."""

    def __init__(self, streams: dict[str, TokenStream], seq_len: int):
        self.streams, self.seq_len = streams, seq_len
        self.domains = sorted(streams)
        self.sizes = [len(streams[d]) // seq_len for d in self.domains]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._ends = np.cumsum(self.sizes)  # (D,)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], seq_len: int) -> TokenDomains:
        """From token arrays held in memory (small corpora, tests)."""
        return cls({d: TokenStream([ArrayTokens(np.asarray(a))]) for d, a in arrays.items()}, seq_len)

    def __len__(self) -> int:
        return int(self._ends[-1]) if self.sizes else 0

    def locate(self, index: int) -> tuple[str, int]:
        """(domain, sequence within the domain) of a dataset index."""
        d = int(np.searchsorted(self._ends, index, side="right"))
        return self.domains[d], index - self.offsets[d]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        domain, local = self.locate(index)
        ids = self.streams[domain].read(local * self.seq_len, (local + 1) * self.seq_len)
        return {"input_ids": torch.from_numpy(ids.astype(np.int64))}

    def sequences(self, domain: str, count: int | None = None, start: int = 0) -> torch.Tensor:
        """(N, seq_len) LongTensor of `count` sequences of a domain from `start` (evaluation)."""
        size = self.sizes[self.domains.index(domain)]
        stop = size if count is None else min(size, start + count)
        ids = self.streams[domain].read(start * self.seq_len, stop * self.seq_len)
        return torch.from_numpy(ids.astype(np.int64)).view(-1, self.seq_len)  # (N, S)


def collate_causal_lm(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([r["input_ids"] for r in rows])  # (B, S)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------- mixture


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


def integer_weights(weights: list[float]) -> list[int]:
    """The weights as coprime integers in the same ratios (`0.3, 0.7` -> `3, 7`); a ratio that needs a common
    denominator above `MAX_PERIOD` is rounded to one (largest remainders)."""
    exact = [Fraction(str(w)) for w in weights]  # the decimal as written ("0.3" is 3/10)
    fractions = [w / sum(exact) for w in exact]
    denominator = math.lcm(*(f.denominator for f in fractions))
    if denominator > MAX_PERIOD:
        import warnings

        warnings.warn(f"domain weights {weights} rounded to multiples of 1/{MAX_PERIOD}", stacklevel=2)
        scaled = [f * MAX_PERIOD for f in fractions]
        ints = [math.floor(x) for x in scaled]
        for i in sorted(range(len(ints)), key=lambda i: ints[i] - scaled[i])[: MAX_PERIOD - sum(ints)]:
            ints[i] += 1
    else:
        ints = [int(f * denominator) for f in fractions]
    divisor = math.gcd(*ints)
    return [i // divisor for i in ints]


def quota_sequence(weights: list[int], length: int) -> np.ndarray:
    """The domain of each of `length` units by the quota method, in exact integer arithmetic: unit t (1-based) goes,
    among the domains d with count_d < t·w_d / W (below their upper quota after taking it), to the one whose next
    unit is due first ((count_d + 1) / w_d smallest; ties: the lower index)."""
    total = sum(weights)
    counts = [0] * len(weights)
    out = np.empty(length, dtype=np.int32)
    for t in range(1, length + 1):
        best = -1
        for d, w in enumerate(weights):
            if w and counts[d] * total < t * w:  # eligible
                if best < 0 or (counts[d] + 1) * weights[best] < (counts[best] + 1) * w:
                    best = d
        counts[best] += 1
        out[t - 1] = best
    return out


class QuotaSchedule:
    """`quota_sequence` over one period (it repeats: after W = sum of the integer weights units each domain has
    exactly its weight), with the occurrence index of each unit within its domain: O(1) per unit, O(W) memory."""

    def __init__(self, weights: list[float]):
        self.weights = integer_weights(weights)
        self.period = quota_sequence(self.weights, sum(self.weights))  # (W,)
        occurrence = np.zeros(len(self.period), dtype=np.int64)
        seen = [0] * len(self.weights)
        for r, d in enumerate(self.period):
            occurrence[r], seen[d] = seen[d], seen[d] + 1
        self.occurrence = occurrence  # (W,): how many units of the same domain come before it in the period

    def at(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(domain, index among its domain's units) of each unit position."""
        cycle, r = np.divmod(units, len(self.period))
        domain = self.period[r]
        return domain, cycle * np.asarray(self.weights, dtype=np.int64)[domain] + self.occurrence[r]


# ----------------------------------------------------------------------------------------- permutation


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit hash of each value (splitmix64's finaliser of x + key); uint64 arithmetic wraps."""
    with np.errstate(over="ignore"):
        z = (x + key * np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def permutation(index: np.ndarray, n: int, seed: int, rounds: int = 6) -> np.ndarray:
    """`index` (values in [0, n)) mapped through a seeded random permutation of [0, n): a balanced Feistel network on
    2h bits (2^(2h) >= n) and cycle walking (re-apply until the value falls below n, < 4 rounds expected)."""
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64((seed * 1_000_003 + r * 7919 + 1) & 0xFFFFFFFFFFFFFFFF) for r in range(rounds)]
    out = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(len(out), dtype=bool)
    while todo.any():
        x = out[todo]
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        x = (left << np.uint64(half)) | right
        out[todo] = x
        todo[todo] = x >= np.uint64(n)
    return out.astype(np.int64)


# ----------------------------------------------------------------------------------------- batches


class DomainBatchSampler(Sampler[list[int]]):
    """Yields `num_batches` micro-batches of `batch_size` indices into the concatenation of the domains (sizes
    `sizes`); each micro-batch is made of domain-pure units of `chunk_size` sequences (default: the whole micro-batch).
    Unit u's domain follows `QuotaSchedule(weights)`; the k-th unit of a domain takes slots of pass k // P of that
    domain in a seeded order (`permutation`), P = sequences // chunk units per pass (no sequence twice in a pass).
    Every batch is a pure function of (seed, position), so `start` (the first micro-batch to yield) costs nothing.

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
        start: int = 0,
        domains: list[str] | None = None,
    ):
        chunk = batch_size if chunk_size is None else chunk_size
        names = domains or [str(i) for i in range(len(sizes))]
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} domains but {len(weights)} weights")
        if chunk < 1 or batch_size % chunk:
            raise ValueError(f"domain_chunk={chunk_size} must divide the micro-batch size {batch_size}")
        small = [(n, s) for n, s, w in zip(names, sizes, weights) if w > 0 and s < chunk]
        if small:
            raise ValueError(
                f"domain {small[0][0]!r} has {small[0][1]} sequences: every weighted domain needs >= {chunk} sequences "
                f"(one micro-batch or chunk), got sizes {sizes}; allowed: more data, a shorter seq_len, or weight 0"
            )
        self.sizes, self.batch_size, self.weights, self.chunk = sizes, batch_size, weights, chunk
        self.num_batches, self.seed, self.start = num_batches, seed, start
        self.offsets = np.array([sum(sizes[:i]) for i in range(len(sizes))], dtype=np.int64)
        self.schedule = QuotaSchedule(weights)
        self.units_per_pass = np.array([max(s // chunk, 1) for s in sizes], dtype=np.int64)

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, j: int) -> list[int]:
        """The indices of micro-batch j."""
        per_batch = self.batch_size // self.chunk
        units = np.arange(j * per_batch, (j + 1) * per_batch, dtype=np.int64)  # (U,)
        domain, k = self.schedule.at(units)
        passes, slot = np.divmod(k, self.units_per_pass[domain])
        out = []
        for d, p, s in zip(domain.tolist(), passes.tolist(), slot.tolist()):
            positions = np.arange(s * self.chunk, (s + 1) * self.chunk, dtype=np.int64)
            order = permutation(positions, self.sizes[d], _pass_seed(self.seed, d, p))
            out.extend((self.offsets[d] + order).tolist())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for j in range(self.start, self.num_batches):
            yield self.batch(j)


def _pass_seed(seed: int, domain: int, epoch: int) -> int:
    return (seed * 0x1F3D5B79 + domain * 0x2545F491 + epoch * 0x9E3779B1) & 0xFFFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------------------- checkpointed state

DATA_STATE_FILE = "data_state.json"
STREAM_FIELDS = ("data", "tokenizer", "seq_len", "domain_weights", "seed", "micro_batch_size", "domain_chunk")


def stream_identity(
    data_fingerprint: str, tokenizer_sha256: str, seq_len: int, domains: list[str], weights: list[float],
    seed: int, batch_size: int, chunk_size: int | None,
) -> dict:  # fmt: skip
    """What decides the batch stream (and what a resume must find unchanged)."""
    return {
        "data": data_fingerprint, "tokenizer": tokenizer_sha256, "seq_len": seq_len,
        "domain_weights": dict(zip(domains, weights)), "seed": seed, "micro_batch_size": batch_size,
        "domain_chunk": chunk_size or batch_size,
    }  # fmt: skip


def check_data_state(saved: dict, current: dict, allow_change: bool = False, where: str = "the checkpoint") -> None:
    """`ValueError` naming each field of the stream that differs from `saved`'s (unless `allow_change`)."""
    changed = [f for f in STREAM_FIELDS if f in saved and saved.get(f) != current.get(f)]
    if changed and not allow_change:
        details = "; ".join(f"{f}: {_short(saved.get(f))} in {where}, now {_short(current.get(f))}" for f in changed)
        raise ValueError(
            f"the data of this resume differs from {where}'s ({details}): allowed a resume on the same data, or "
            "--allow_data_change true (continue at the same position of the new stream)"
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 or not isinstance(value, str) else repr(value[:16] + "…")


__all__ = [
    "DATA_STATE_FILE",
    "DomainBatchSampler",
    "QuotaSchedule",
    "TokenDomains",
    "check_data_state",
    "collate_causal_lm",
    "integer_weights",
    "parse_weights",
    "permutation",
    "quota_sequence",
    "stream_identity",
]
