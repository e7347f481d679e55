"""lm-evaluation-harness on our folders (`make test-lmeval`: lm_eval from the registry in its own venv, whose pins
clash with ours; the default suite deselects this file): lm-eval's own command line (`lm_eval --model hf`) on a local
multiple-choice task the test builds (offline) gives the log-likelihoods our model computes, for a QwenMoE-GB
checkpoint (its Hub code) and a transformers MoE trained as it is; `qwenmoe-gb evaluate --lm_eval_tasks` writes
`lm_eval.json` and puts the metric in the model card.

Environment: QWENMOE_GB_LMEVAL_PYTHON (the venv's Python, with this package and torch from the main environment)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from modeling_qwenmoe_gb.cli import pretrain
from modeling_qwenmoe_gb.data import ByteTokenizer
from modeling_qwenmoe_gb.pretraining import load_trained

from .test_cli import TINY

pytestmark = pytest.mark.lm_eval
ROOT = Path(__file__).resolve().parent.parent
LOGLIKELIHOOD_TOL = 1e-4  # fp32 on both sides
TASK = """task: qgb_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_python() -> str:
    path = os.environ.get("QWENMOE_GB_LMEVAL_PYTHON")
    if not path:
        pytest.fail("QWENMOE_GB_LMEVAL_PYTHON is not set: run `make test-lmeval` (it builds lm-eval's venv)")
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_task")
    pairs = [(1, 2), (3, 4), (5, 6), (7, 1), (2, 9), (8, 8), (12, 30), (41, 7)]
    with open(folder / "test.jsonl", "w") as f:
        for a, b in pairs:
            f.write(json.dumps({"question": f"{a} + {b} =", "choices": [f"{a + b}", f"{a + b + 1}", f"{a * b + 3}"],
                                "label": 0}) + "\n")  # fmt: skip
    (folder / "qgb_sums.yaml").write_text(TASK.format(data=folder / "test.jsonl"))
    return folder


@pytest.fixture(scope="module", params=["qwenmoe_gb", "olmoe"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"lm_eval_{request.param}") / "run"
    start = (
        [] if request.param == "qwenmoe_gb" else ["--model_config", str(ROOT / "configuration/stock/olmoe-byte.json")]
    )
    flags = [f for f in TINY if f not in ("--config_overrides", '{"num_hidden_layers": 2}')]
    pretrain([*flags, "--output_dir", str(out), "--save_strategy", "no", *start])
    return out


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT),
               HF_DATASETS_CACHE=str(cwd / "datasets-cache"))  # fmt: skip
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def our_loglikelihood(model, context: str, continuation: str) -> float:
    """log P(continuation | context) of the model, byte tokens, one forward."""
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (S, V)
    return float(sum(logits[t - 1, ids[t]] for t in range(start, len(ids))))


def test_lm_eval_command_line_gives_our_loglikelihoods(trained, task_dir, tmp_path):
    custom = json.loads((trained / "config.json").read_text())["model_type"] == "qwenmoe_gb"
    model_args = f"pretrained={trained},dtype=float32" + (",trust_remote_code=True" if custom else "")
    run([lm_eval_python(), "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", "qgb_sums",
         "--include_path", str(task_dir), "--log_samples", "--output_path", str(tmp_path / "out"), "--device", "cpu",
         "--batch_size", "4"], tmp_path)  # fmt: skip
    (samples,) = tmp_path.glob("out/*/samples_qgb_sums_*.jsonl")
    model = load_trained(trained).eval()
    diffs = []
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        for arguments, response in zip(sample["arguments"].values(), sample["filtered_resps"]):
            ours = our_loglikelihood(model, arguments["arg_0"], arguments["arg_1"])
            diffs.append(abs(float(response[0]) - ours))
    assert len(diffs) == 24 and max(diffs) < LOGLIKELIHOOD_TOL, max(diffs)


def test_evaluate_runs_lm_eval_and_puts_the_metric_in_the_card(trained, task_dir, tmp_path):
    run([lm_eval_python(), "-m", "modeling_qwenmoe_gb.cli", "evaluate", "--model", str(trained), "--seq_len", "64",
         "--eval_max_sequences", "2", "--lm_eval_tasks", "qgb_sums", "--lm_eval_include_path", str(task_dir),
         "--lm_eval_batch_size", "4"], tmp_path)  # fmt: skip
    report = json.loads((trained / "lm_eval.json").read_text())
    accuracy = report["results"]["qgb_sums"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and report["lm_eval_version"]
    card = ModelCard.load(trained / "README.md")
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results["acc (qgb_sums)"].metric_value == round(accuracy, 4)
    assert "average perplexity" in results  # the perplexities stay
