"""Greedy generation with llama.cpp (llama-cpp-python), run by the Python of its own venv (`make serving-venvs`).

    python llamacpp_generate.py REQUEST.json RESULT.json

REQUEST: {"gguf": FILE, "prompts": [[ids], ...], "max_tokens": N, "texts": [str, ...] (optional)}.
RESULT: the tokens and the logprob of each generated token (greedy: argmax of llama.cpp's logits, token ids in and
out), and llama.cpp's own tokenization of each text (`tokenize(..., add_bos=False)`), to compare with the tokenizer
the model was exported with.
"""

import json
import sys

import numpy as np

GGML_TYPE_F32 = 0  # ggml_type of the KV cache


def main(request_path: str, result_path: str) -> None:
    from llama_cpp import Llama

    request = json.load(open(request_path))
    # f32 KV cache (llama.cpp keeps it in f16 by default): the exact-comparison setting
    llm = Llama(model_path=request["gguf"], n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=2,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # fmt: skip
    tokens, logprobs = [], []
    for prompt in request["prompts"]:
        llm.reset()
        llm.eval(prompt)
        new, scores = [], []
        for _ in range(request["max_tokens"]):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)  # (V,)
            log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            token = int(logits.argmax())
            new.append(token)
            scores.append(float(log_probs[token]))
            llm.eval([token])
        tokens.append(new)
        logprobs.append(scores)
    texts = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in request.get("texts", [])]
    json.dump({"tokens": tokens, "logprobs": logprobs, "tokenized": texts}, open(result_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
