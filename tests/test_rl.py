"""TRL GRPO with routing replay (`modeling_qwenmoe_gb.rl`): what generation records equals a manual decoding loop
with a KV cache; with replay the training passes use the recorded experts for every scored token and reproduce the
rollout's log-probs to fp32 rounding; without replay the routing drifts after an update; the balancer counts the
replayed experts; GRPO's token-level and GSPO's sequence-level ratios both run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from modeling_qwenmoe_gb import QwenMoeGBForCausalLM  # noqa: E402
from modeling_qwenmoe_gb.data import ByteTokenizer  # noqa: E402
from modeling_qwenmoe_gb.rl import (  # noqa: E402
    OLD_KEY,
    ROLLOUT_KEY,
    ROLLOUT_LOGPS_KEY,
    QwenMoeGBGRPOTrainer,
    align_routing,
    routing_mismatch,
    scored_positions,
)

from .conftest import tiny_config  # noqa: E402
from .test_routing_replay import manual_decode  # noqa: E402
from .test_sft import char_tokenizer  # noqa: E402


def prompts() -> Dataset:
    return Dataset.from_list([{"prompt": f"what is {a} + {b}?"} for a in range(4) for b in range(4)])


def exact_sum(completions, prompts, **kwargs) -> list[float]:
    """1 when the completion starts with the sum of the prompt's two numbers."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        a, b = prompt.removeprefix("what is ").rstrip("?").split(" + ")
        rewards.append(float(completion.strip().split(".")[0] == str(int(a) + int(b))))
    return rewards


class Probe(QwenMoeGBGRPOTrainer):
    """Keeps every micro-batch the loss saw."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen = [*getattr(self, "seen", []), inputs]
        return super().compute_loss(model, inputs, *args, **kwargs)


class StepCounts(TrainerCallback):
    """The balancer's step counts just before the optimizer step (before the balance callback resets them)."""

    def __init__(self):
        self.trainer, self.counts = None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.counts.append(self.trainer.balancer.step_counts.clone())


def run_grpo(
    tmp_path, replay: str, steps: int = 4, lr: float = 1e-2, callbacks=(), model=None, routing_metrics=True, **config
):
    fields = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=steps,
                  learning_rate=lr, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                  disable_tqdm=True, bf16=False, num_iterations=2, beta=0.0, temperature=1.0)  # fmt: skip
    args = GRPOConfig(str(tmp_path), **{**fields, **config})
    if model is None:
        model = QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0, eos_token_id=1))
    trainer = Probe(model=model, reward_funcs=exact_sum, args=args, train_dataset=prompts(),
                    processing_class=char_tokenizer(), routing_replay=replay, routing_metrics=routing_metrics,
                    callbacks=list(callbacks))  # fmt: skip
    for callback in callbacks:
        callback.trainer = trainer
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def test_align_routing_and_scored_positions():
    routing = torch.arange(2 * 7).view(2, 7, 1, 1).expand(2, 7, 3, 2)  # prompt width 3, 4 steps
    aligned = align_routing(routing, prompt_width=3, prompt_len=2, completion_len=5)
    assert aligned.shape == (2, 7, 3, 2)
    assert aligned[0, :, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, -1]  # prompt cut on the left, completion padded
    wider = align_routing(routing, prompt_width=3, prompt_len=4, completion_len=2)
    assert wider[1, :, 0, 0].tolist() == [-1, 7, 8, 9, 10, 11]
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])  # prompt 3, completion 3
    assert scored_positions(mask, 3).int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    used = torch.tensor([[[[0, 1]], [[2, 3]], [[4, 5]]]])  # (1, 3, 1, 2)
    reference = torch.tensor([[[[1, 0]], [[2, 4]], [[-1, -1]]]])
    counts = routing_mismatch(used, reference, torch.ones(1, 3, dtype=torch.bool))
    assert counts.tolist() == [1.0, 2.0, 1.0, 2.0]  # order inside a set does not count; -1 is not compared
    used2 = torch.tensor([[[[0, 1], [0, 1]], [[2, 3], [5, 6]]]])  # (1, 2, 2, 2): token 1 differs in layer 1 only
    reference2 = torch.tensor([[[[1, 0], [1, 0]], [[2, 3], [5, 7]]]])
    assert routing_mismatch(used2, reference2, torch.ones(1, 2, dtype=torch.bool)).tolist() == [1.0, 4.0, 1.0, 2.0]


def test_recorded_rollout_equals_a_manual_decoding_loop(tmp_path):
    """lr 0, no aux-free bias: the weights that generated are the weights of the check. TRL's generation recorded the
    routing of every prompt and completion position and the sampled tokens' log-probs; a manual loop with a KV cache
    over the same tokens gives the same experts and log-probs, and the replayed training pass equals both."""
    trainer, _ = run_grpo(tmp_path, "rollout", steps=1, lr=0.0, num_iterations=1)
    model = trainer.model.eval()
    batch = trainer.seen[0]
    prompt, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion, completion_mask = batch["completion_ids"], batch["completion_mask"]
    routing, logps = manual_decode(model, prompt, prompt_mask, completion)
    recorded = batch[ROLLOUT_KEY]  # (B, P + C, L, K)
    assert recorded.dtype == torch.int16  # kept compact between generation and the updates
    recorded = recorded.long()
    mask = torch.cat([prompt_mask, completion_mask], 1)
    scored = scored_positions(mask, completion.shape[1])
    check = scored | torch.cat([prompt_mask.bool(), torch.zeros_like(completion_mask, dtype=torch.bool)], 1)
    assert check.sum() > 20
    assert torch.equal(recorded[:, :-1][check[:, :-1]], routing[check[:, :-1]])
    torch.testing.assert_close(batch[ROLLOUT_LOGPS_KEY] * completion_mask, logps * completion_mask, rtol=0, atol=1e-6)
    with torch.no_grad():
        train = model(torch.cat([prompt, completion], 1), attention_mask=mask, routed_experts=recorded,
                      output_routed_experts=True)  # fmt: skip
    assert torch.equal(train.routed_experts[scored], recorded[scored])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_replay_uses_the_recorded_experts(tmp_path, level):
    """Every log-prob pass replays the rollout's experts: no (token, layer) pair differs from the rollout in any pass,
    and on the weights that generated a batch the training log-probs equal the rollout's to fp32 rounding. The ratios
    still move with the policy (second pass over each batch)."""
    trainer, logs = run_grpo(tmp_path, "rollout", importance_sampling_level=level)
    assert len(logs) == 4
    assert all(h["routing/mismatch_rollout"] == 0.0 for h in logs)
    first, second = logs[0::2], logs[1::2]  # num_iterations=2: passes at the generating weights, then after 1 update
    assert all(h["rollout/abs_log_ratio_max"] < 1e-5 for h in first)
    assert all(h["rollout/abs_log_ratio_max"] > 1e-3 for h in second)
    assert all("balance/global_lbl" in h and "aux_loss" not in h for h in logs)
    assert trainer.aux_loss_enabled is False


def test_without_replay_the_routing_drifts_after_an_update(tmp_path):
    _, none = run_grpo(tmp_path / "none", "none")
    _, replayed = run_grpo(tmp_path / "rollout", "rollout")
    assert none[0]["routing/mismatch_rollout"] < 0.01  # fp32, the generating weights
    assert none[1]["routing/mismatch_rollout"] > 0.05  # after one update on the batch
    assert replayed[1]["routing/mismatch_rollout"] == 0.0


def test_old_policy_replay(tmp_path):
    """R2: the old-policy pass records, the current-policy passes replay it: no mismatch against the old policy's
    experts, and a ratio of exactly the weights' change (1 at the generating weights)."""
    trainer, logs = run_grpo(tmp_path, "old_policy")
    assert all(h["routing/mismatch_old"] == 0.0 for h in logs)
    assert logs[0]["ratio/abs_log_ratio_max"] < 1e-5 and logs[1]["ratio/abs_log_ratio_max"] > 1e-3
    assert OLD_KEY in trainer.seen[0] and trainer.seen[0][OLD_KEY].shape[:2] == trainer.seen[0]["prompt_ids"].shape[
        :1
    ] + (trainer.seen[0]["prompt_ids"].shape[1] + trainer.seen[0]["completion_ids"].shape[1],)


def test_balance_counts_the_replayed_experts(tmp_path):
    """The step buffer before the optimizer step = torch.bincount of the replayed experts over the real tokens of the
    step's micro-batch (GA 1), per layer, plus the top-k of the positions generation never ran (the last token, -1);
    the aux-free bias moves from those counts."""
    counts = StepCounts()
    model = QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0, eos_token_id=1, aux_free=True))
    trainer, _ = run_grpo(tmp_path, "rollout", steps=2, callbacks=[counts], model=model)
    assert len(counts.counts) == 2
    for inputs, step_counts in zip(trainer.seen, counts.counts):
        real = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1).bool()
        replayed = inputs[ROLLOUT_KEY].long()
        free = real & (replayed[..., 0, 0] < 0)  # never run by generation: the last token of a full-length completion
        assert not free[:, :-1].any()
        real = real & ~free
        for layer in range(replayed.shape[2]):
            expected = torch.bincount(replayed[:, :, layer][real].flatten(), minlength=8)
            extra = step_counts[layer] - expected  # the free positions' own top-k
            assert (extra >= 0).all() and extra.sum() == 2 * free.sum()
    assert model.model.moe_routers()[0].expert_bias.abs().sum() > 0


def test_refusals(tmp_path):
    args = GRPOConfig(str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to=[], use_cpu=True,
                      bf16=False)  # fmt: skip
    model = QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0, eos_token_id=1))
    common = dict(model=model, reward_funcs=exact_sum, args=args, train_dataset=prompts(),
                  processing_class=char_tokenizer())  # fmt: skip
    allowed = r"allowed \['none', 'rollout', 'old_policy'\]"
    with pytest.raises(ValueError, match=rf"routing_replay='r3' is unknown: {allowed}"):
        QwenMoeGBGRPOTrainer(**common, routing_replay="r3")

    def rollout_func(prompts, trainer):
        return {"prompt_ids": [], "completion_ids": [], "logprobs": []}

    with pytest.raises(ValueError, match="not possible with rollout_func"):
        QwenMoeGBGRPOTrainer(**common, routing_replay="rollout", rollout_func=rollout_func)
    QwenMoeGBGRPOTrainer(**common, routing_replay="old_policy", rollout_func=rollout_func)  # R2 needs no rollout record


def test_grpo_example_script(tmp_path):
    """`scripts/grpo_example.py` end to end on a tiny model with the byte tokenizer: GSPO's sequence-level ratio,
    old-policy replay, bf16 weights with the fp32 router linear; the saved model keeps `router_dtype`."""
    model_dir = tmp_path / "base"
    QwenMoeGBForCausalLM(tiny_config(vocab_size=260, pad_token_id=256)).save_pretrained(model_dir)
    ByteTokenizer().to_hf().save_pretrained(model_dir)
    script = Path(__file__).resolve().parent.parent / "scripts" / "grpo_example.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    cmd = [sys.executable, str(script), "--model", str(model_dir), "--output_dir", str(tmp_path / "grpo"),
           "--routing_replay", "old_policy", "--importance_sampling_level", "sequence", "--dtype", "bfloat16",
           "--router_dtype", "float32", "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--num_generations", "4", "--logging_steps", "1", "--use_cpu", "true", "--disable_tqdm", "true"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reward: first log" in done.stdout
    saved = QwenMoeGBForCausalLM.from_pretrained(tmp_path / "grpo")
    assert saved.config.router_dtype == "float32"


def test_rollout_replay_with_a_lora_adapter(tmp_path):
    """A PEFT LoRA model (attention + fused experts, router trainable): generation through PEFT records, the passes
    replay, the router and adapters train."""
    from peft import get_peft_model

    from modeling_qwenmoe_gb.sft import lora_config

    base = QwenMoeGBForCausalLM(tiny_config(vocab_size=64, pad_token_id=0, eos_token_id=1))
    model = get_peft_model(base, lora_config(rank=4, train_router=True))
    _, logs = run_grpo(tmp_path, "rollout", model=model)
    assert all(h["routing/mismatch_rollout"] == 0.0 for h in logs)
    assert logs[0]["rollout/abs_log_ratio_max"] < 1e-5 and logs[1]["rollout/abs_log_ratio_max"] > 1e-3
