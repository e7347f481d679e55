"""`qwenmoe-gb bench-data`: the data path measured. Numbers and commands go to BENCHMARKS.md.

    qwenmoe-gb bench-data --out runs/bench_data                          # every part, BENCHMARKS.md's sizes
    qwenmoe-gb bench-data --parts prepare --corpus ../shared/corpus --copies 6
    qwenmoe-gb bench-data --parts memory,loader --sizes 10M,100M,1B
    qwenmoe-gb bench-data --parts resume --resume_steps 10,10000

Parts
- `prepare`: `prepare-data` on the corpus repeated `copies` times with a byte-level BPE of `vocab_size` trained on it,
  against `tokenizers`' raw `encode_batch` (and `encode_batch_fast`) on the same texts, already in memory, with all
  cores (its thread pool); `prepare-data` with 1 process too.
- `memory`: `pretrain --max_steps 3` on Megatron folders of 10M / 100M / 1B byte tokens (4 domains), each in a fresh
  process: peak RSS (VmHWM), peak anonymous RSS (RssAnon, sampled every 20 ms: what the process allocated, without
  the mapped token files' pages) and the seconds from the start of the process to the end of its first step.
- `loader`: the DataLoader (token files, `TokenDomains`, `DomainBatchSampler`) alone: micro-batches/s and tokens/s,
  against the tokens/s a training step of the `memory` run consumes.
- `resume`: seconds from the start of a process to its first resumed step, from a checkpoint at step k, for each k;
  and what replaying k steps of batches through the sampler would cost (what `skip_first_batches` does).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SIZES = {"K": 10**3, "M": 10**6, "B": 10**9}


@dataclass
class BenchDataArguments:
    out: str = field(default="runs/bench_data", metadata={"help": "where the data, runs and bench_data.json go"})
    parts: str = field(default="prepare,memory,loader,resume", metadata={"help": "which measurements"})
    corpus: str = field(default="../shared/corpus", metadata={"help": "a folder of domains with train.jsonl"})
    copies: int = field(default=6, metadata={"help": "the corpus repeated this many times for `prepare`"})
    vocab_size: int = field(default=16000, metadata={"help": "the byte-level BPE trained for `prepare`"})
    num_proc: int | None = field(default=None, metadata={"help": "prepare processes (default: the cores)"})
    sizes: str = field(default="10M,100M,1B", metadata={"help": "Megatron byte-token folders for `memory`"})
    steps: int = field(default=3, metadata={"help": "pretrain steps of each `memory` run"})
    preset: str = field(default="demo", metadata={"help": "the model of the `memory` runs"})
    resume_steps: str = field(default="10,10000", metadata={"help": "checkpoint steps k of the `resume` part"})


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * SIZES[text[-1].upper()]) if text[-1].upper() in SIZES else int(text)


def corpus_documents(corpus: Path, split: str = "train") -> dict[str, list[str]]:
    from .data import read_jsonl

    return {
        d.name: read_jsonl(d / f"{split}.jsonl") for d in sorted(corpus.iterdir()) if (d / f"{split}.jsonl").is_file()
    }


# ----------------------------------------------------------------------------------------- prepare


def repeated_corpus(corpus: Path, out: Path, copies: int) -> Path:
    """The corpus with each domain's training file repeated `copies` times (the test split once)."""
    if (out / ".done").is_file():
        return out
    for domain in sorted(p for p in corpus.iterdir() if (p / "train.jsonl").is_file()):
        (out / domain.name).mkdir(parents=True, exist_ok=True)
        text = (domain / "train.jsonl").read_bytes().rstrip(b"\n") + b"\n"
        (out / domain.name / "train.jsonl").write_bytes(text * copies)
        shutil.copyfile(domain / "test.jsonl", out / domain.name / "test.jsonl")
    (out / ".done").write_text("")
    return out


def bpe_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> Path:
    """A byte-level BPE trained on `texts`, saved as a transformers tokenizer folder (kept for reruns)."""
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


RAW_ENCODE = """
import json, os, sys, time
from pathlib import Path
from tokenizers import Tokenizer
from modeling_qwenmoe_gb.data import read_jsonl
raw, tokenizer = Path(sys.argv[1]), sys.argv[2]
folders = [d for d in sorted(raw.iterdir()) if d.is_dir()]
texts = [t for d in folders for s in ("train", "test") for t in read_jsonl(d / f"{s}.jsonl")]
tok = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json"))
result = {"bytes": sum(len(t.encode()) for t in texts)}
for name in ("encode_batch", "encode_batch_fast"):
    encode, tokens, start = getattr(tok, name), 0, time.perf_counter()
    for i in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in encode(texts[i : i + 1000], add_special_tokens=False))
    result[name] = {"tokens": tokens, "seconds": time.perf_counter() - start}
print(json.dumps(result))
"""


def bench_prepare(args: BenchDataArguments, out: Path) -> dict:
    from .data import default_num_proc, prepare_data

    num_proc = args.num_proc or default_num_proc()
    raw = repeated_corpus(Path(args.corpus), out / f"raw-x{args.copies}", args.copies)
    texts = [t for docs in corpus_documents(Path(args.corpus)).values() for t in docs]
    tokenizer = bpe_tokenizer(texts, args.vocab_size, out / f"bpe-{args.vocab_size}")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", RAYON_NUM_THREADS=str(num_proc))
    done = subprocess.run([sys.executable, "-c", RAW_ENCODE, str(raw), str(tokenizer)], env=env, check=True,
                          capture_output=True, text=True)  # fmt: skip
    baseline = json.loads(done.stdout.strip().splitlines()[-1])
    result = {"bytes": baseline["bytes"], "num_proc": num_proc, "vocab_size": args.vocab_size}
    for name in ("encode_batch", "encode_batch_fast"):
        result[f"raw_{name}_tokens_per_s"] = baseline[name]["tokens"] / baseline[name]["seconds"]
    for procs in sorted({1, num_proc}):
        target = out / f"prepared-x{args.copies}-p{procs}"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        prepare_data(str(raw), str(tokenizer), target, num_proc=procs, progress=False)
        seconds = time.perf_counter() - start
        manifest = json.loads((target / "manifest.json").read_text())
        tokens = sum(s["tokens"] - s["documents"] for d in manifest["domains"].values() for s in d.values())  # no EOS
        result[f"prepare_{procs}proc_tokens_per_s"] = tokens / seconds
        result[f"prepare_{procs}proc_seconds"] = seconds
        result["tokens"] = tokens
    result["prepare_vs_raw_encode_batch"] = (
        result[f"prepare_{num_proc}proc_tokens_per_s"] / result["raw_encode_batch_tokens_per_s"]
    )
    return result


# ----------------------------------------------------------------------------------------- memory, start, loader


def megatron_byte_folder(corpus: Path, out: Path, tokens: int) -> Path:
    """`tokens` byte tokens in 4 domains (each domain's training documents repeated), as Megatron pairs."""
    from .data import ByteTokenizer, Encoder
    from .data.formats import IndexWriter

    if (out / ".done").is_file():
        return out
    encoder = Encoder.of(ByteTokenizer(), "byte")
    docs = corpus_documents(corpus)
    tests = corpus_documents(corpus, "test")
    for domain, texts in docs.items():
        (out / domain).mkdir(parents=True, exist_ok=True)
        flat, lengths = encoder.encode_batch(None, texts)
        writer, left = IndexWriter(out / domain / "train", np.uint16), tokens // len(docs)
        while left > 0:
            keep = min(len(lengths), int(np.searchsorted(np.cumsum(lengths), left, side="right")) or 1)
            writer.add(flat[: int(lengths[:keep].sum())], lengths[:keep])
            left -= int(lengths[:keep].sum())
        writer.close()
        writer = IndexWriter(out / domain / "test", np.uint16)
        writer.add(*encoder.encode_batch(None, tests[domain]))
        writer.close()
    (out / ".done").write_text("")
    return out


CHILD = """
import json, sys, time
from transformers import TrainerCallback
from modeling_qwenmoe_gb.pretraining import pretrain

class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if not getattr(self, "seen", False):
            self.seen = True
            print("BENCH_FIRST_STEP", json.dumps({"time": time.time(), "step": state.global_step}), flush=True)

pretrain(json.loads(sys.argv[1]), callbacks=[FirstStep()])
"""


def run_measured(argv: list[str], log: Path, cache: Path | None = None) -> dict:
    """`pretrain argv` in a new process (its output to `log`; `cache`: a fresh data cache, so the run is a first
    start): peak RSS, peak anonymous RSS (sampled every 20 ms), seconds from the process's start to the end of its
    first step."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
        env["QWENMOE_GB_DATA_CACHE"] = str(cache)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        start = time.time()
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(argv)], stdout=output,
                                 stderr=subprocess.STDOUT, env=env)  # fmt: skip
        status, peak_anon, peak = Path(f"/proc/{child.pid}/status"), 0, 0
        while child.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                peak_anon = max(peak_anon, int(fields["RssAnon"].split()[0]) * 1024)
                peak = max(peak, int(fields["VmHWM"].split()[0]) * 1024)
            except (FileNotFoundError, KeyError, ProcessLookupError):
                pass
            time.sleep(0.02)
    lines = log.read_text().splitlines()
    if child.returncode != 0:
        raise RuntimeError(f"pretrain failed ({log}):\n" + "\n".join(lines[-40:]))
    first = next(json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("BENCH_FIRST_STEP"))
    return {"peak_rss": peak, "peak_anon_rss": peak_anon, "start_to_first_step_s": first["time"] - start,
            "first_step": first["step"], "seconds": time.time() - start}  # fmt: skip


def bench_memory(args: BenchDataArguments, out: Path) -> dict:
    results = {}
    for size in args.sizes.split(","):
        data = megatron_byte_folder(Path(args.corpus), out / f"megatron-{size}", parse_size(size))
        run = out / f"run-{size}"
        shutil.rmtree(run, ignore_errors=True)
        argv = ["--data", str(data), "--tokenizer", "byte", "--preset", args.preset, "--max_steps", str(args.steps),
                "--save_strategy", "no", "--output_dir", str(run), "--eval_max_sequences", "4", "--logging_steps", "1",
                "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
        result = run_measured(argv, out / f"run-{size}.log", out / f"cache-{size}")  # a first start: ids scanned
        history = json.loads((run / "log_history.json").read_text())["log_history"]
        runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
        info = json.loads((run / "data_info.json").read_text())
        result["corpus_tokens"] = sum(info["train_tokens"].values())
        result["train_tokens_per_s"] = args.steps * 8 * 2 * info["seq_len"] / runtime  # demo: GA 8 × batch 2
        results[size] = result
    return results


def bench_loader(args: BenchDataArguments, out: Path, memory: dict | None) -> dict:
    from torch.utils.data import DataLoader

    from .data import DomainBatchSampler, TokenDomains, collate_causal_lm, open_token_folder

    size = args.sizes.split(",")[-1]
    folder = open_token_folder(megatron_byte_folder(Path(args.corpus), out / f"megatron-{size}", parse_size(size)))
    results = {"size": size}
    for batch, seq_len in ((2, 128), (8, 2048)):
        train = TokenDomains(folder.split("train"), seq_len)
        sampler = DomainBatchSampler(train.sizes, batch, [1.0] * len(train.sizes), 2000, seed=0)
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate_causal_lm)
        start = time.perf_counter()
        count = sum(1 for _ in loader)
        seconds = time.perf_counter() - start
        results[f"{batch}x{seq_len}"] = {
            "micro_batches_per_s": count / seconds,
            "tokens_per_s": count * batch * seq_len / seconds,
        }
    if memory and size in memory:
        results["train_tokens_per_s"] = memory[size]["train_tokens_per_s"]
        results["loader_over_training"] = results["2x128"]["tokens_per_s"] / memory[size]["train_tokens_per_s"]
    return results


def bench_resume(args: BenchDataArguments, out: Path) -> dict:
    from .data import DomainBatchSampler, open_token_folder

    data = megatron_byte_folder(Path(args.corpus), out / "megatron-10M", parse_size("10M"))
    base = ["--data", str(data), "--tokenizer", "byte", "--preset", "tiny", "--config_overrides",
            '{"num_hidden_layers": 1}', "--seq_len", "32", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--eval_max_sequences", "1", "--logging_steps", "1000",
            "--disable_tqdm", "true", "--report_to", "none", "--warmup_steps", "0"]  # fmt: skip
    results = {}
    for k in (int(s) for s in args.resume_steps.split(",")):
        run = out / f"resume-{k}"
        if not (run / f"checkpoint-{k}" / "trainer_state.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            start = time.time()
            subprocess.run([sys.executable, "-m", "modeling_qwenmoe_gb.cli", "pretrain", *base, "--output_dir",
                            str(run), "--max_steps", str(k), "--save_steps", str(k)], check=True,
                           capture_output=True)  # fmt: skip
            results.setdefault("train_to_k_seconds", {})[k] = time.time() - start
        for extra in run.glob(f"checkpoint-{k + 2}"):
            shutil.rmtree(extra)
        argv = [*base, "--output_dir", str(run), "--max_steps", str(k + 2), "--save_strategy", "no"]
        measured = run_measured(argv, out / f"resume-{k}.log")
        assert measured["first_step"] == k + 1, measured
        train = open_token_folder(data).split("train")
        sampler = DomainBatchSampler([len(s) // 32 for s in train.values()], 1, [1.0] * len(train), k + 2)
        start = time.perf_counter()
        for _ in zip(range(k), iter(sampler)):  # what replaying k micro-batches through the sampler costs
            pass
        measured["replay_sampler_s"] = time.perf_counter() - start
        results[k] = measured
    return results


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}", ""]
    if "prepare" in result:
        p = result["prepare"]
        procs = p["num_proc"]
        lines += [
            f"prepare: {p['bytes'] / 1e6:.0f} MB of text, {p['tokens'] / 1e6:.1f}M tokens, BPE {p['vocab_size']}, "
            f"{procs} cores",
            "",
            "| | tokens/s |",
            "|---|---|",
            f"| `encode_batch` ({procs} threads, texts in memory) | {p['raw_encode_batch_tokens_per_s']:,.0f} |",
            f"| tokenizers `encode_batch_fast` | {p['raw_encode_batch_fast_tokens_per_s']:,.0f} |",
            f"| `prepare-data --num_proc 1` | {p['prepare_1proc_tokens_per_s']:,.0f} |",
            f"| `prepare-data --num_proc {procs}` | {p[f'prepare_{procs}proc_tokens_per_s']:,.0f} "
            f"(**{p['prepare_vs_raw_encode_batch']:.2f}×** `encode_batch`) |",
            "",
        ]
    if "memory" in result:
        lines += [
            "| corpus | peak RSS | peak anonymous RSS | start → first step | train tok/s |",
            "|---|---|---|---|---|",
        ]
        for size, m in result["memory"].items():
            lines.append(
                f"| {size} ({m['corpus_tokens'] / 1e6:,.0f}M tokens) | {m['peak_rss'] / 2**20:,.0f} MiB | "
                f"{m['peak_anon_rss'] / 2**20:,.0f} MiB | {m['start_to_first_step_s']:.1f} s | "
                f"{m['train_tokens_per_s']:,.0f} |"
            )
        lines.append("")
    if "loader" in result:
        loader = result["loader"]
        lines += [
            f"loader on the {loader['size']} folder:",
            "",
            "| micro-batch | micro-batches/s | tokens/s |",
            "|---|---|---|",
        ]
        for shape in (k for k in loader if isinstance(loader[k], dict)):
            row = loader[shape]
            lines.append(f"| {shape} | {row['micro_batches_per_s']:,.0f} | {row['tokens_per_s']:,.0f} |")
        if "loader_over_training" in loader:
            lines.append(f"| a training step consumes | | {loader['train_tokens_per_s']:,.0f} "
                         f"(the loader: {loader['loader_over_training']:,.0f}×) |")  # fmt: skip
        lines.append("")
    if "resume" in result:
        lines += ["| resumed at step k | start → first resumed step | replaying k micro-batches |", "|---|---|---|"]
        for k, r in result["resume"].items():
            if k != "train_to_k_seconds":
                lines.append(f"| {k} | {r['start_to_first_step_s']:.1f} s | {r['replay_sampler_s']:.3f} s |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv: list[str] | None = None) -> dict:
    from .cli import command_parser

    (args,) = command_parser("bench-data").parse_args_into_dataclasses(args=argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    result: dict = {
        "args": asdict(args),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    if "prepare" in parts:
        result["prepare"] = bench_prepare(args, out)
    if "memory" in parts:
        result["memory"] = bench_memory(args, out)
    if "loader" in parts:
        result["loader"] = bench_loader(args, out, result.get("memory"))
    if "resume" in parts:
        result["resume"] = bench_resume(args, out)
    (out / "bench_data.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench_data.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
