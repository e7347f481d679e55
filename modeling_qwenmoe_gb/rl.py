"""Reinforcement learning with TRL's GRPO, with routing replay and global-batch balance.

Features
- `QwenMoeGBGRPOTrainer`: TRL's `GRPOTrainer` with the `GlobalBalanceMixin` (balance loss at the configured scope,
  counted over the experts the training pass used; aux-free updates; balance metrics). TRL's own aux-loss path is
  bypassed so nothing is counted twice.
- Routing replay, `routing_replay=`:
  - `"none"`: every log-prob pass routes with the current router;
  - `"rollout"` (R3, "Rollout Routing Replay", arXiv 2510.11370): the experts each token used while the rollout was
    generated (transformers generation inside TRL, recorded per position and MoE layer) are replayed in the
    old-policy and the current-policy log-prob passes;
  - `"old_policy"` (R2, "Routing Replay", GSPO, arXiv 2507.18071): the experts of the old-policy pass (the training
    engine, the weights that generated the batch) are replayed in the current-policy passes, so the importance ratios
    of the `num_iterations` updates compare the same experts. Without an old-policy pass (one update per batch at the
    weights that generated it: TRL takes the ratio as 1) there is nothing to replay.
  The gate weights always come from the current router at the replayed experts: the router keeps its gradient. The
  reference model's pass (`beta > 0`) routes as usual. Works with GRPO's token-level and GSPO's sequence-level ratios
  (`importance_sampling_level`).
- Routing metrics (`routing_metrics=True`, on by default with replay; the rollout's where TRL generates with
  transformers): `routing/mismatch_rollout` (share of (completion token, MoE layer) pairs whose set of experts in the
  current pass differs from the rollout's; `_tokens`: share of tokens with any such layer), `routing/mismatch_old`
  (against the old-policy pass's, with `"old_policy"`), and the spread of the current pass's
  log-probs against the rollout's (`rollout/abs_log_ratio_mean`, `rollout/abs_log_ratio_max`, `rollout/ratio_std`)
  and against the old policy's (`ratio/abs_log_ratio_mean`, `ratio/abs_log_ratio_max`, `ratio/std`). The positions
  counted are those whose logits score a completion token.
- The example task of `scripts/grpo_example.py` and `scripts/rl_replay_study.py`: `addition_prompts`, `sum_reward`.

vLLM generation inside TRL (`use_vllm=True`) cannot replay yet: vLLM 0.32 can return the routed experts of a request
(`enable_return_routed_experts`, `CompletionOutput.routed_experts` (seq_len, L, K)) only with its Model Runner V2,
which needs Triton (a GPU; on CPU: "Model Runner V2 requires Triton"), and TRL's vLLM client drops them;
`routing_replay="rollout"` refuses `use_vllm`, continuous batching, `rollout_func` and tools with that reason.

Needs TRL >= 1.16 (`pip install -e ".[rl]"`): the trainer hooks into its GRPO generation and log-prob passes.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from packaging.version import Version
from trl import GRPOTrainer

from .balance import find_moe_model
from .modeling_qwenmoe_gb import RouterStats, RoutingRecorder
from .trainer import GlobalBalanceMixin

if Version(trl.__version__) < Version("1.16"):
    raise ImportError(f"modeling_qwenmoe_gb.rl needs trl>=1.16 (its GRPO internals); installed: {trl.__version__}")

ROUTING_REPLAY_MODES = ("none", "rollout", "old_policy")
ROLLOUT_KEY, OLD_KEY, ROLLOUT_LOGPS_KEY = "rollout_routed_experts", "old_routed_experts", "rollout_per_token_logps"


# --------------------------------------------------------------------------------------------- the example task


def addition_prompts(num: int, seed: int = 0) -> Dataset:
    """`num` prompts `a + b =` (a < 1000, b < 100), the arithmetic lines of the embedded corpus without the answer."""
    rng = random.Random(seed)
    return Dataset.from_list([{"prompt": f"{rng.randint(0, 999)} + {rng.randint(0, 99)} ="} for _ in range(num)])


def sum_reward(completions: list[str], prompts: list[str], **kwargs) -> list[float]:
    """TRL reward for `addition_prompts`, on the completion's first line: 1.0 when it is the sum, else 0.5 · max(0,
    1 − |x − sum| / max(sum, 10)) when it is an integer x (a dense signal for a small model), else 0.0."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        a, b = prompt.rstrip("= ").split(" + ")
        answer, line = int(a) + int(b), completion.strip().split("\n")[0].strip()
        if line == str(answer):
            rewards.append(1.0)
        elif line.lstrip("-").isdigit():
            rewards.append(0.5 * max(0.0, 1 - abs(int(line) - answer) / max(answer, 10)))
        else:
            rewards.append(0.0)
    return rewards


# --------------------------------------------------------------------------------------------- pure functions


def align_routing(routing: torch.Tensor, prompt_width: int, prompt_len: int, completion_len: int) -> torch.Tensor:
    """Generation routing (B, prompt_width + steps, L, K), whose prompt was left-padded to `prompt_width`, cut to a
    training batch `cat(prompt (B, prompt_len) left-padded, completion (B, completion_len) right-padded)`:
    (B, prompt_len + completion_len, L, K), -1 where generation never ran a position."""
    prompt = routing[:, :prompt_width]  # (B, Pg, L, K), right-aligned like the padded prompt
    if prompt_len <= prompt_width:
        prompt = prompt[:, prompt_width - prompt_len :]
    else:
        prompt = F.pad(prompt, (0, 0, 0, 0, prompt_len - prompt_width, 0), value=-1)
    completion = routing[:, prompt_width : prompt_width + completion_len]  # (B, <= C, L, K)
    completion = F.pad(completion, (0, 0, 0, 0, 0, completion_len - completion.shape[1]), value=-1)
    return torch.cat([prompt, completion], dim=1)  # (B, P + C, L, K)


def compact_routing(routing: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The routing in the narrowest signed dtype that holds every expert index and -1 (int16 up to 32767 experts):
    what the trainer keeps between generation and the updates (a quarter of int64). Replay accepts any integer dtype."""
    return routing.to(torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32)


def scored_positions(attention_mask: torch.Tensor, completion_len: int) -> torch.Tensor:
    """(B, S) bool: the positions whose logits score a completion token (position t predicts token t + 1), from the
    training batch's attention mask (B, S) = cat(prompt mask, completion mask)."""
    completion = attention_mask[:, -completion_len:].bool()  # (B, C)
    positions = torch.zeros_like(attention_mask, dtype=torch.bool)  # (B, S)
    positions[:, -completion_len - 1 : -1] = completion
    return positions


def routing_mismatch(used: torch.Tensor, reference: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[pairs that differ, pairs compared, tokens that differ, tokens compared] (float64) over the (position, MoE
    layer) pairs at `positions` (B, S) where the reference routed (not -1): a pair differs when its set of K experts
    differs, a token when any of its layers does. used, reference (B, S, L, K)."""
    compared = positions[..., None] & (reference[..., 0] >= 0)  # (B, S, L)
    differ = (used.sort(-1).values != reference.sort(-1).values).any(-1) & compared  # (B, S, L)
    counts = [differ.sum(), compared.sum(), differ.any(-1).sum(), compared.any(-1).sum()]
    return torch.stack(counts).double()


def log_ratio_spread(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[Σ|log r|, max|log r|, Σ r, Σ r², count] over the masked completion tokens, for a reduction across ranks."""
    mask = mask.bool()
    lr = log_ratio.detach().double()[mask]
    ratio = lr.exp()
    top = lr.abs().max() if lr.numel() else lr.new_zeros(())
    return torch.stack([lr.abs().sum(), top, ratio.sum(), ratio.square().sum(), lr.new_tensor(float(lr.numel()))])


def cat_stats(parts: list[RouterStats]) -> RouterStats:
    """Router statistics of batch chunks joined along the batch dim: (L, B_i, ·) -> (L, ΣB_i, ·)."""
    if len(parts) == 1:
        return parts[0]
    return RouterStats(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in RouterStats.__dataclass_fields__))


# --------------------------------------------------------------------------------------------- recording


class RolloutRecorder:
    """Records, during TRL's transformers generation, the experts every position used (`RoutingRecorder`) and the
    log-probability of every sampled token under `logits / temperature` (TRL's definition of a token's log-prob),
    computed step by step from the LM head's last-position logits: no (B, steps, V) tensor is kept."""

    def __init__(self, moe_model: torch.nn.Module, lm_head: torch.nn.Module, temperature: float):
        self.routing = RoutingRecorder(moe_model)
        self.moe_model, self.lm_head, self.temperature = moe_model, lm_head, temperature
        self.log_probs: list[torch.Tensor] = []  # one (B, V) per step until its token is known, then (B,)
        self._handles: list = []

    def __enter__(self) -> "RolloutRecorder":
        def keep_logits(module, args, output):
            self.log_probs.append(torch.log_softmax(output[:, -1].float() / self.temperature, dim=-1))  # (B, V)

        def gather_previous(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if self.log_probs and ids is not None and self.log_probs[-1].dim() == 2:  # the token the last step drew
                self.log_probs[-1] = self.log_probs[-1].gather(-1, ids[:, -1:].to(self.log_probs[-1].device))[:, 0]

        self.routing.__enter__()
        self._handles = [
            self.lm_head.register_forward_hook(keep_logits),
            self.moe_model.register_forward_pre_hook(gather_previous, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.routing.__exit__(*exc)

    def result(self, completion_ids: list[list[int]]) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(routing (B, Pg + steps, L, K), prompt width Pg, rollout log-probs (B, steps) with 0 past each end)."""
        width, steps = self.routing.calls[0].shape[1], len(self.log_probs)
        routing = self.routing.sequence_routing(width + steps)  # (B, Pg + steps, L, K): the last token never ran, -1
        if self.log_probs and self.log_probs[-1].dim() == 2:  # the last step's token comes from the outputs
            last = torch.tensor([ids[-1] if len(ids) == steps else 0 for ids in completion_ids])
            self.log_probs[-1] = self.log_probs[-1].gather(-1, last[:, None].to(self.log_probs[-1].device))[:, 0]
        log_probs = torch.stack(self.log_probs, dim=1)  # (B, steps)
        lengths = torch.tensor([len(ids) for ids in completion_ids], device=log_probs.device)
        log_probs = log_probs * (torch.arange(steps, device=log_probs.device)[None] < lengths[:, None])
        return routing, width, log_probs


@contextlib.contextmanager
def _route(moe_model: torch.nn.Module | None, replay: torch.Tensor | None, record: bool, into: list, balancer=None):
    """Within: the model's forwards replay `replay` (B, S, L, K) when given, and append their (router_stats,
    routed_experts or None) to `into`. `moe_model=None` (a transformers MoE, read by the balancer's hooks): the
    statistics the balancer recorded for the pass, no replay."""
    if moe_model is None:
        last = balancer.router_stats(None)
        yield
        stats = balancer.router_stats(None)
        if stats is not None and stats is not last:  # a training forward ran (a no-grad pass records nothing)
            into.append((stats, None))
        return

    def inject(module, args, kwargs):
        extra = {"output_routed_experts": True} if record else {}
        if replay is not None:
            extra["routed_experts"] = replay
        return args, {**kwargs, **extra}

    def keep(module, args, kwargs, output):
        into.append((output.router_stats, output.routed_experts))

    handles = [
        moe_model.register_forward_pre_hook(inject, with_kwargs=True),
        moe_model.register_forward_hook(keep, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------- trainer


class QwenMoeGBGRPOTrainer(GlobalBalanceMixin, GRPOTrainer):
    """`trl.GRPOTrainer` for QwenMoE-GB models: global-batch balance and routing replay (see the module docstring).
    Any transformers MoE the balancer reads trains with global balance too (`routing_replay="none"`).

    Extra args (keywords; the rest are `GRPOTrainer`'s and `GlobalBalanceMixin`'s):
        routing_replay: `"none"` (default), `"rollout"` or `"old_policy"`.
        routing_metrics: log the routing mismatch and log-ratio spreads (default: on with replay). With `"none"` it
            records the rollout's routing to measure what replay would remove, and replays nothing.
    """

    def __init__(self, *args: Any, routing_replay: str = "none", routing_metrics: bool | None = None, **kwargs: Any):
        if routing_replay not in ROUTING_REPLAY_MODES:
            raise ValueError(f"routing_replay={routing_replay!r} is unknown: allowed {list(ROUTING_REPLAY_MODES)}")
        if args[1:]:
            raise ValueError("QwenMoeGBGRPOTrainer takes model as the only positional argument: pass the rest by name")
        super().__init__(*args, **kwargs)
        self.aux_loss_enabled = False  # TRL's own load-balancing loss: the balancer adds ours
        self.routing_replay = routing_replay
        self.routing_metrics = routing_replay != "none" if routing_metrics is None else routing_metrics
        self._moe = find_moe_model(self.model)  # None: a transformers MoE trained as it is (the balancer's hooks)
        if self._moe is None and (routing_replay != "none" or self.routing_metrics):
            raise ValueError(
                f"routing_replay={routing_replay!r}, routing_metrics={self.routing_metrics} is not allowed for "
                f"{type(self.model).__name__}: routing replay and its metrics need a QwenMoE-GB model (its forward "
                "takes `routed_experts`); a transformers MoE trains with routing_replay='none', routing_metrics=False "
                "(global balance as usual), or converted (`convert.from_qwen_moe` for Qwen2/3-MoE)"
            )
        unsupported = {
            "use_vllm=True": self.use_vllm,
            "use_transformers_continuous_batching=True": self.use_transformers_continuous_batching,
            "rollout_func": self.rollout_func is not None,
            "tools / environments": bool(self.tools),
        }
        named = [k for k, v in unsupported.items() if v]
        if routing_replay == "rollout" and named:
            raise ValueError(
                f"routing_replay='rollout' records the rollout's routing during TRL's transformers generation; not "
                f"possible with {', '.join(named)}: vLLM returns routed experts (`enable_return_routed_experts`) only "
                "with its Model Runner V2, which needs Triton, and TRL's vLLM client drops them; the other paths "
                "generate without our model's forward. Allowed there: routing_replay='old_policy' or 'none'"
            )
        self.record_rollout = routing_replay == "rollout" or (self.routing_metrics and not named)
        self._rollout: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._passes: list[str] = []  # scoring passes still to come inside `_generate_and_score_completions`
        self._pending: dict[str, Any] = {}  # per `compute_loss`: what the policy pass replays and compares to
        self._old_routing: list[torch.Tensor] = []

    # ----------------------------------------------------------------------------------- generation and scoring

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        turn = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if not self.record_rollout:
            return super()._generate_single_turn(*turn)
        lm_head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        with RolloutRecorder(self._moe, lm_head, self.temperature) as recorder:
            completion_ids, logprobs = super()._generate_single_turn(*turn)
        self._rollout = recorder.result(completion_ids)
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        generate_every = self.args.steps_per_generation * self.num_iterations  # TRL's rule for an old-policy pass
        old_pass = self.args.gradient_accumulation_steps % generate_every != 0
        old_pass = old_pass or (self.use_vllm and self.vllm_importance_sampling_correction)
        self._passes = ["old"] * old_pass + ["ref"] * (self.beta != 0.0)
        self._rollout, self._old_routing = None, []
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._passes = []
        prompt_len, completion_len = output["prompt_ids"].shape[1], output["completion_ids"].shape[1]
        if self._rollout is not None:
            routing, width, log_probs = self._rollout
            device = output["prompt_ids"].device
            aligned = align_routing(routing, width, prompt_len, completion_len)
            output[ROLLOUT_KEY] = compact_routing(aligned, self._moe.config.num_experts).to(device)
            log_probs = F.pad(log_probs, (0, max(0, completion_len - log_probs.shape[1])))[:, :completion_len]
            output[ROLLOUT_LOGPS_KEY] = log_probs.to(device)
        if self._old_routing:
            old = torch.cat(self._old_routing)  # (B, P + C, L, K)
            output[OLD_KEY] = compact_routing(old, self._moe.config.num_experts)
        self._rollout, self._old_routing = None, []
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           **kwargs):  # fmt: skip
        kind = self._passes.pop(0) if self._passes else "policy"
        if kind == "ref":  # the reference model routes as usual
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
            )
        if any(kwargs.get(k) is not None for k in ("pixel_values", "token_type_ids", "mm_token_type_ids")):
            raise ValueError("QwenMoeGBGRPOTrainer: QwenMoE-GB models are text-only; multimodal inputs are not allowed")
        if kind == "old":
            replay = None
            if self.routing_replay == "rollout" and self._rollout is not None:
                routing, width, _ = self._rollout
                prompt_len = input_ids.shape[1] - logits_to_keep
                replay = align_routing(routing, width, prompt_len, logits_to_keep).to(input_ids.device)
            record = self.routing_replay == "old_policy"
        else:
            replay, record = self._pending.get("replay"), self.routing_metrics
        batch = input_ids.shape[0]
        size = batch_size or batch
        logps, entropies, captured = [], [], []
        for start in range(0, batch, size):
            end = min(start + size, batch)
            chunk_replay = None if replay is None else replay[start:end]
            with _route(self._moe, chunk_replay, record, captured, self.balancer):
                lp, ent, _ = super()._get_per_token_logps_and_entropies(
                    model, input_ids[start:end], attention_mask[start:end], logits_to_keep, end - start, **kwargs
                )
            logps.append(lp)
            entropies.append(ent)
        logps = torch.cat(logps)
        entropies = None if entropies[0] is None else torch.cat(entropies)
        if kind == "old" and record:
            self._old_routing = [used for _, used in captured]
        if kind == "policy" and captured:
            self._pending["stats"] = cat_stats([stats for stats, _ in captured])
            if record:
                used = torch.cat([used for _, used in captured])  # (B, S, L, K)
                self._routing_metrics(used, logps, attention_mask, logits_to_keep)
        return logps, entropies, None

    # ----------------------------------------------------------------------------------- loss and metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        replay_key = {"rollout": ROLLOUT_KEY, "old_policy": OLD_KEY}.get(self.routing_replay)
        self._pending = {
            "replay": inputs.get(replay_key) if replay_key else None,
            "rollout": inputs.get(ROLLOUT_KEY),
            "old": inputs.get(OLD_KEY),
            "rollout_logps": inputs.get(ROLLOUT_LOGPS_KEY),
            "old_logps": inputs.get("old_per_token_logps"),
        }
        try:
            loss = GRPOTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            stats = self._pending.get("stats")
        finally:
            self._pending = {}
        if model.training and torch.is_grad_enabled() and stats is not None:
            balance, _ = self.balancer(stats)  # counts the experts the pass used: the replayed ones under replay
            loss = loss + balance.to(loss.device) / self.current_gradient_accumulation_steps
        return loss

    def _routing_metrics(self, used, logps, attention_mask, completion_len) -> None:
        mode = "train" if self.model.training else "eval"
        positions = scored_positions(attention_mask, completion_len)  # (B, S)
        completion_mask = attention_mask[:, -completion_len:]  # (B, C)
        for name, key in (("routing/mismatch_rollout", "rollout"), ("routing/mismatch_old", "old")):
            reference = self._pending.get(key)
            if reference is not None:
                counts = self.accelerator.reduce(routing_mismatch(used, reference, positions), reduction="sum")
                self._metrics[mode][name].append(float(counts[0] / counts[1].clamp_min(1)))
                self._metrics[mode][f"{name}_tokens"].append(float(counts[2] / counts[3].clamp_min(1)))
        for prefix, std_name, key in (("rollout/", "ratio_std", "rollout_logps"), ("ratio/", "std", "old_logps")):
            reference = self._pending.get(key)
            if reference is None:
                continue
            sums = log_ratio_spread(logps - reference, completion_mask)
            top = self.accelerator.gather(sums[1:2]).max()  # the largest over ranks
            sums = self.accelerator.reduce(sums, reduction="sum")
            count = sums[4].clamp_min(1)
            mean_ratio = sums[2] / count
            self._metrics[mode][f"{prefix}abs_log_ratio_mean"].append(float(sums[0] / count))
            self._metrics[mode][f"{prefix}abs_log_ratio_max"].append(float(top))
            self._metrics[mode][f"{prefix}{std_name}"].append(
                float((sums[3] / count - mean_ratio.square()).clamp_min(0).sqrt())
            )


__all__ = [
    "QwenMoeGBGRPOTrainer",
    "addition_prompts",
    "sum_reward",
    "ROUTING_REPLAY_MODES",
    "RolloutRecorder",
    "align_routing",
    "compact_routing",
    "log_ratio_spread",
    "routing_mismatch",
    "scored_positions",
]
