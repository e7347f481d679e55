"""Greedy generation (or a throughput run) with vLLM, run by the Python of vLLM's own venv (`make serving-venvs`).

    python vllm_generate.py REQUEST.json RESULT.json

REQUEST: {"model": DIR, "prompts": [[ids], ...], "max_tokens": N, "model_impl": "auto" | "transformers",
"trust_remote_code": bool, "logprobs": K, "throughput": {"batch": B, "max_tokens": T, "rounds": R} (optional)}.
RESULT: the architecture vLLM ran, the tokens and the logprob of each generated token, the vLLM and transformers
versions, and for a throughput run the generated tokens per second of each round. Token ids in, token ids out (no
tokenizer), fp32, eager: the exact-comparison settings.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB


def main(request_path: str, result_path: str) -> None:
    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    request = json.load(open(request_path))
    llm = LLM(
        model=request["model"],
        model_impl=request.get("model_impl", "auto"),
        trust_remote_code=request.get("trust_remote_code", False),
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=request.get("max_model_len", 128),
        seed=0,
    )
    architecture = llm.llm_engine.model_config.architecture  # the class vLLM resolved and ran
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=request.get("logprobs", 1),
                            detokenize=False, ignore_eos=True)  # fmt: skip
    outputs = llm.generate([{"prompt_token_ids": p} for p in request["prompts"]], params, use_tqdm=False)
    tokens, logprobs = [], []
    for out in outputs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        logprobs.append([step[t].logprob for t, step in zip(completion.token_ids, completion.logprobs)])
    result = {"architecture": architecture, "tokens": tokens, "logprobs": logprobs, "vllm": vllm.__version__,
              "transformers": transformers.__version__}  # fmt: skip
    if bench := request.get("throughput"):
        prompts = [{"prompt_token_ids": request["prompts"][i % len(request["prompts"])]} for i in range(bench["batch"])]
        fixed = SamplingParams(temperature=0.0, max_tokens=bench["max_tokens"], ignore_eos=True, detokenize=False)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        result["tokens_per_s"] = []
        for _ in range(bench["rounds"]):
            start = time.perf_counter()
            done = llm.generate(prompts, fixed, use_tqdm=False)
            seconds = time.perf_counter() - start
            result["tokens_per_s"].append(sum(len(o.outputs[0].token_ids) for o in done) / seconds)
    json.dump(result, open(result_path, "w"))


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main(*sys.argv[1:])
