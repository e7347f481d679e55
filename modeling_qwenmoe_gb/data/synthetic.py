"""The embedded synthetic corpus: 4 domains with clearly different statistics (arithmetic, DNA, prose, code), generated
deterministically, no network. `synthetic_documents` gives one domain's split; `synthetic_corpus` all of them."""

from __future__ import annotations

import random
from collections.abc import Callable

SYNTHETIC_DOMAINS = ("arithmetic", "dna", "prose", "code")

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


def synthetic_documents(domain: str, split: str, num_docs: int, seed: int = 0) -> list[str]:
    """The `num_docs` documents of one domain and split, identical for identical arguments (the test split does not
    depend on the number of training documents)."""
    rng = random.Random(f"{seed}-{domain}-{split}")
    return [_GENERATORS[domain](rng) for _ in range(num_docs)]


def synthetic_corpus(num_docs: int = 300, num_test_docs: int = 30, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": [doc, ...], "test": [doc, ...]}}, identical for identical arguments."""
    return {
        domain: {
            split: synthetic_documents(domain, split, n, seed)
            for split, n in (("train", num_docs), ("test", num_test_docs))
        }
        for domain in SYNTHETIC_DOMAINS
    }
