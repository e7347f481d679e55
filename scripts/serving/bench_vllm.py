"""vLLM generation throughput for the same weights: the stock export through vLLM's native class against our Hub
checkpoint through vLLM's Transformers backend (what `qwenmoe-gb export` buys at serving time).

    python scripts/serving/bench_vllm.py --vllm_python VENV/bin/python [--preset qwen3-80m-byte] [--batch 16]
        [--max_tokens 64] [--rounds 3] [--pairs 2] [--out docs/results/serving_vllm_cpu.json]

One model (a preset, random weights unless `--model DIR`) is saved both ways; the two engines then run in alternating
processes (`--pairs` times each), each timing `--rounds` batched greedy generations after a warm-up. Reported: the
generated tokens per second of every round, the median per form, and the ratio native / Transformers backend.
The tokens of both forms are checked equal first (the same model, so the throughput compares like with like).
"""

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM, load_preset
from modeling_qwenmoe_gb.convert import export_qwen_moe

HERE = Path(__file__).resolve().parent


def run(python: str, request: dict, work: Path, name: str) -> dict:
    (work / f"{name}.json").write_text(json.dumps(request))
    cmd = [python, str(HERE / "vllm_generate.py"), f"{name}.json", f"{name}.out.json"]
    subprocess.run(cmd, cwd=work, check=True, capture_output=True, timeout=1800)
    return json.loads((work / f"{name}.out.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm_python", required=True, help="the Python of vLLM's venv (make serving-venvs)")
    parser.add_argument("--preset", default="qwen3-80m-byte", help="model shape (a Qwen3-MoE-shaped preset)")
    parser.add_argument("--model", default=None, help="a trained QwenMoE-GB checkpoint instead of a preset")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max_tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--rounds", type=int, default=3, help="timed generate calls per engine process")
    parser.add_argument("--pairs", type=int, default=2, help="engine processes per form, alternating")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = (
        QwenMoeGBForCausalLM.from_pretrained(args.model)
        if args.model
        else QwenMoeGBForCausalLM(load_preset(args.preset))
    )
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model.save_pretrained(work / "hub")
    export_qwen_moe(model, work / "stock")
    prompts = [[(7 * i + j) % 256 for j in range(16)] for i in range(args.batch)]
    common = {"prompts": prompts, "max_tokens": 16, "max_model_len": 16 + args.max_tokens + 8,
              "throughput": {"batch": args.batch, "max_tokens": args.max_tokens, "rounds": args.rounds}}  # fmt: skip
    forms = {
        "native": {"model": str(work / "stock"), "model_impl": "auto", **common},
        "transformers_backend": {
            "model": str(work / "hub"),
            "model_impl": "transformers",
            "trust_remote_code": True,
            **common,
        },  # fmt: skip
    }
    results = {name: [] for name in forms}
    for pair in range(args.pairs):
        for name, request in forms.items():
            results[name].append(run(args.vllm_python, request, work, f"{name}-{pair}"))
    native, backend = results["native"], results["transformers_backend"]
    assert native[0]["tokens"] == backend[0]["tokens"], "the two forms generate different tokens"
    summary = {
        "command": "python scripts/serving/bench_vllm.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                      if v is not None and k != "vllm_python"),
        "architectures": {k: v[0]["architecture"] for k, v in results.items()},
        "vllm": native[0]["vllm"],
        "transformers_in_vllm_venv": native[0]["transformers"],
        "params": model.config.num_params(),
        "active_params": model.config.num_active_params(),
        "tokens_per_s": {k: [round(x, 1) for r in v for x in r["tokens_per_s"]] for k, v in results.items()},
    }  # fmt: skip
    medians = {k: statistics.median(v) for k, v in summary["tokens_per_s"].items()}
    summary["median_tokens_per_s"] = medians
    summary["native_over_transformers_backend"] = round(medians["native"] / medians["transformers_backend"], 3)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
