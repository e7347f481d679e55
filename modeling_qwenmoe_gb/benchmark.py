"""Training-step benchmark: QwenMoE-GB (micro, global, global + aux-free) against transformers' Qwen3-MoE / Qwen2-MoE
with their own aux loss, on the identical config and weights; eager and grouped_mm experts; CPU and CUDA.

    python scripts/benchmark.py --preset demo --batch 8 --seq 256 --steps 10 --out bench.json
    torchrun --nproc_per_node 2 scripts/benchmark.py --distributed ...   # all-reduce cost with 2 processes
    torchrun --nproc_per_node 2 scripts/benchmark.py --models "" --paired_layouts fsdp,fsdp+ep   # EP vs FSDP2, paired

Measures tokens/s, step time (forward + backward + SGD step), peak memory (CUDA: the allocator's peak; CPU: the peak of
live tensors from torch's MemTracker), ops per step, activations saved for backward, and MFU. FLOPs per token (training,
forward + backward = 3 × forward), with N_active the parameters a token multiplies by (attention projections, the
router, the K routed experts, the shared expert, the LM head; no embedding lookup or norms):

    flops_per_token = 6 · N_active + 12 · L · S · n_heads · head_dim / 2      (causal attention scores + values)

MFU = flops_per_token · tokens/s / peak (H100 SXM bf16 dense 989 TFLOP/s; given by --peak_tflops elsewhere).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import time
import weakref
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from .balance import GlobalBalancer
from .configuration_qwenmoe_gb import MOE_RECOMPUTE, QwenMoeGBConfig
from .modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from .presets import load_preset

COMPILE_MODES = ("none", "layers", "model")
ARM_BASES = ("micro", "global", "transformers-qwen2", "transformers-qwen3")
# e.g. global+experts, global+gc; qb / qbmicro: Quantile Balancing (global histogram / micro_mean), aux-free on
ARM_MODIFIERS = ("auxfree", "qb", "qbmicro", "gc", *(m for m in MOE_RECOMPUTE if m != "none"))
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def matmul_params_per_token(config: QwenMoeGBConfig) -> int:
    """Parameters each token multiplies by in a forward (no embedding lookup, norms or biases)."""
    d = config.hidden_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attn = d * q + 2 * d * kv + q * d
    moe = config.num_experts_per_tok * 3 * d * config.moe_intermediate_size + config.num_experts * d
    if config.shared_expert_intermediate_size > 0:
        moe += 3 * d * config.shared_expert_intermediate_size + d
    n_moe = len(config.moe_layer_indices())
    dense = 3 * d * config.intermediate_size
    layers = config.num_hidden_layers * attn + n_moe * moe + (config.num_hidden_layers - n_moe) * dense
    return layers + d * config.vocab_size  # + LM head


def flops_per_token(config: QwenMoeGBConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) with causal attention over `seq_len`."""
    attention = 12 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim / 2
    return 6 * matmul_params_per_token(config) + attention


@dataclass
class Result:
    name: str
    experts_implementation: str
    device: str
    dtype: str
    batch: int
    seq: int
    tokens_per_step: int
    step_ms: float
    tokens_per_s: float
    peak_mem_gib: float | None
    mfu: float | None
    allreduce_ms: float | None = None  # the balancer call per step (all-reduce of the counts + losses + metrics)
    compiled: str = "none"  # torch.compile: none, layers (each decoder layer) or model (the whole model, one graph)
    ops_per_step: int | None = None  # eager: ATen ops of forward + balance loss + backward + balancer step; compiled
    # (`model`): kernel launches of the generated graphs + the ops left eager
    saved_mib: float | None = None  # activations saved for backward + router tensors the output keeps
    kept_mib: float | None = None  # activations alive when backward starts (MemTracker: saved + recompute caches)
    max_batch_in_budget: int | None = None  # the most sequences whose peak fits the budget arm's peak (measured)
    collective_us: float | None = None  # the balancer's collective alone: all-reduce of the (L, E) int64 counts


def reference_model(kind: str, config: QwenMoeGBConfig):
    """transformers' own model on the same shape: `qwen3` (needs use_qk_norm, no shared expert) or `qwen2`."""
    fields = config.to_dict()
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        fields.pop(key, None)
    fields.update(output_router_logits=True)
    if kind == "qwen3":
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**fields))
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**fields))


def build(
    name: str,
    config: QwenMoeGBConfig,
    impl: str,
    device: torch.device,
    dtype: torch.dtype,
    state=None,
    compiled: str = "none",
):
    """(model, balancer or None) for one benchmark arm; every arm loads the same weights. `compiled`: `layers` puts
    each decoder layer through `torch.compile`, `model` the whole model (ours and transformers' alike)."""
    base, *modifiers = name.split("+")
    unknown = [m for m in modifiers if m not in ARM_MODIFIERS or (base.startswith("transformers-") and m != "gc")]
    if base not in ARM_BASES or unknown:
        raise ValueError(
            f"arm {name!r} is unknown: allowed {list(ARM_BASES)} with +{'/+'.join(ARM_MODIFIERS)} (ours) or +gc "
            "(transformers)"
        )
    if base.startswith("transformers-"):
        model = reference_model(base.split("-")[1], config)
    else:
        quantile = next((m for m in modifiers if m in ("qb", "qbmicro")), None)
        overrides = {"balance_scope": base, "aux_free": "auxfree" in modifiers or quantile is not None}
        if quantile is not None:
            overrides.update(aux_free_method="quantile", quantile_scope="global" if quantile == "qb" else "micro_mean")
        overrides["moe_recompute"] = next((m for m in modifiers if m in MOE_RECOMPUTE), "none")
        model = QwenMoeGBForCausalLM(QwenMoeGBConfig(**{**config.to_dict(), **overrides}))
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or any(not k.endswith("expert_bias") for k in unexpected):  # only our aux-free bias is extra
            raise ValueError(f"{name}: weights differ from QwenMoE-GB's: missing {missing}, unexpected {unexpected}")
    model.set_experts_implementation(impl)
    model.to(device=device, dtype=dtype).train()
    if "gc" in modifiers:  # transformers' whole-layer gradient checkpointing (non-reentrant)
        model.gradient_checkpointing_enable()
    if compiled == "layers":
        compile_decoder_layers(model)
    elif compiled == "model":
        model = torch.compile(model)
    elif compiled != "none":
        raise ValueError(f"compile={compiled!r} is unknown: allowed {list(COMPILE_MODES)}")
    return model, None if base.startswith("transformers-") else GlobalBalancer(model, compile=compiled != "none")


def compile_decoder_layers(model: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """`torch.compile` each decoder layer in place (`nn.Module.compile`: parameter names and checkpoints unchanged),
    the per-block compilation torchtitan uses; the layers fuse their element-wise work (norms, rotary, SiLU · up,
    gate weights, residuals). Works for QwenMoE-GB and transformers' Qwen-MoE models."""
    for layer in model.model.layers:
        layer.compile(**compile_kwargs)
    return model


def _train_loss(model, balancer, ids: torch.Tensor):
    """Forward + the balance loss of one training micro-step: (outputs, loss, seconds in the balancer call)."""
    if balancer is None:
        out = model(input_ids=ids, labels=ids)
        return out, out.loss, 0.0
    out = model(input_ids=ids, labels=ids, add_balance_loss=False)
    start = time.perf_counter()
    balance, _ = balancer(out.router_stats)
    return out, out.loss + balance, time.perf_counter() - start


def _backward_and_step(model, balancer, loss: torch.Tensor) -> None:
    """Backward, then the balancer's optimizer-step work (aux-free update, buffer reset)."""
    loss.backward()
    if balancer is not None:
        balancer.step()


def _synchronizer(device: torch.device):
    """Waits for the device's queued work before a clock is read (a no-op on CPU); called with an elapsed time, waits
    and returns it."""

    def sync(elapsed: float | None = None) -> float | None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return elapsed

    return sync


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops that reach the kernels (after autograd and decompositions): on a GPU, ≈ kernel launches."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def step_accounting(model, balancer, ids: torch.Tensor) -> tuple[int, float]:
    """Deterministic cost of one training step, no timing: (ATen ops dispatched by forward + balance loss + backward +
    balancer step, MiB of activations saved for backward plus the router tensors the output keeps). Two untimed steps:
    one under the op counter, one under saved-tensor hooks (which dispatch ops of their own). Storages are counted
    once; parameters are not activations and are left out."""
    counter = _OpCounter()
    with counter:
        _, loss, _ = _train_loss(model, balancer, ids)
        _backward_and_step(model, balancer, loss)
    model.zero_grad(set_to_none=True)

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, weakref.ref]] = {}  # storage address -> (bytes, the tensor the graph holds)

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = (storage.nbytes(), weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out, loss, _ = _train_loss(model, balancer, ids)
    stats = getattr(out, "router_stats", None)
    for tensor in list(out.router_logits or ()) + list(stats.to_tuple() if stats is not None else ()):
        keep(tensor)  # transformers' per-layer (T, E) logits, or our (L, B, E) statistics
    # only what is still alive when backward starts: tensors of graph branches freed during the forward are gone
    saved_bytes = sum(nbytes for nbytes, ref in saved.values() if ref() is not None)
    _backward_and_step(model, balancer, loss)
    model.zero_grad(set_to_none=True)
    return sum(counter.ops.values()), saved_bytes / 2**20


# A line of an Inductor wrapper's `call` that launches work: a generated kernel (C++ `cpp_fused_*`, Triton `.run(`), an
# extern kernel (mm, addmm, ...), or an op it falls back to (`torch.ops.<ns>.<op>`). Allocations, views
# (`reinterpret_tensor`), asserts and `del` are not kernels.
_KERNEL_LINE = re.compile(r"^(?:\w+ = )?(?:cpp_fused_\w+\(|\w+\.run\(|extern_kernels\.\w+\(|torch\.ops\.\w+\.\w+)")


def _kernel_calls(code: str) -> int:
    """Kernel launches of one Inductor output module: the matching lines of its `call` function."""
    start = code.find("def call(")
    if start < 0:
        return 0
    body = code[start:]
    end = body.find("\n\n\n")
    return sum(bool(_KERNEL_LINE.match(line.strip())) for line in body[: end if end > 0 else None].splitlines())


def compiled_step_kernels(model, balancer, ids: torch.Tensor) -> tuple[int, int]:
    """Deterministic cost of one training step of a `torch.compile`d model, no timing: (kernel launches in the
    generated forward and backward code of every graph, ATen ops run eagerly outside them: the balancer's loss, its
    backward and its step). Compiles afresh (dynamo reset, empty Inductor cache) so that every graph's code is seen;
    the eager ops are counted in a second step, whose graphs are already compiled."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    def step():
        _, loss, _ = _train_loss(model, balancer, ids)
        _backward_and_step(model, balancer, loss)

    with fresh_cache():
        _, codes = run_and_get_code(step)
    model.zero_grad(set_to_none=True)
    eager = 0
    if balancer is not None:  # the balancer's own ops run eagerly (its loss is compiled too: counted above)
        out = model(input_ids=ids, labels=ids, add_balance_loss=False)
        compiled_loss = balancer._loss
        balancer._loss = _outside(compiled_loss, torch.utils._python_dispatch._disable_current_modes)
        counter = _OpCounter()
        try:
            with counter:
                balancer(out.router_stats)
                balancer.step()
        finally:
            balancer._loss = compiled_loss
        eager = sum(counter.ops.values())
    return sum(_kernel_calls(c) for c in codes), eager


def _outside(fn, context):
    """`fn` run under `context()` (here: with the op counter switched off, which compiled code cannot run under)."""

    def wrapped(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    return wrapped


def tracked_memory(model, balancer, ids: torch.Tensor) -> tuple[float, float] | None:
    """One forward + backward under torch's `MemTracker` (tensor lifetimes, any device): (MiB of activations alive
    when backward starts: what autograd saves plus what selective activation checkpointing caches outside autograd,
    which saved-tensor hooks do not see: the measure of what recompute saves; GiB peak of the live tensors, parameters,
    gradients and activations: the CPU stand-in for `torch.cuda.max_memory_allocated`). None where this torch has no
    MemTracker."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        _, loss, _ = _train_loss(model, balancer, ids)
        snapshot = tracker.get_tracker_snapshot()
        loss.backward()
    if balancer is not None:
        balancer.step()
    model.zero_grad(set_to_none=True)
    kept = sum(v for device in snapshot.values() for k, v in device.items() if "ACT" in str(k))
    peak = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    return kept / 2**20, peak / 2**30


def collective_cost_us(config: QwenMoeGBConfig, device: torch.device, iters: int = 200) -> float:
    """Mean time (µs) of the balancer's one collective per micro-step: an all-reduce of the stacked (L, E) int64 expert
    counts over the world, measured alone (ranks aligned by a barrier first)."""
    counts = torch.ones(len(config.moe_layer_indices()), config.num_experts, dtype=torch.long, device=device)
    sync = _synchronizer(device)
    for _ in range(10):
        torch.distributed.all_reduce(counts)
    torch.distributed.barrier()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        torch.distributed.all_reduce(counts)
    sync()
    return (time.perf_counter() - start) / iters * 1e6


def time_steps(model, balancer, batches, steps: int, warmup: int, device: torch.device) -> tuple[float, float | None]:
    """Mean step time (s) of forward + backward + SGD over `steps` after `warmup`; all-reduce time (s) if any."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    sync = _synchronizer(device)
    allreduce = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start, allreduce = time.perf_counter(), 0.0
        allreduce += _train_step(model, balancer, optimizer, batches[i % len(batches)])
    sync()
    return (time.perf_counter() - start) / steps, allreduce / steps


def _train_step(model, balancer, optimizer, ids: torch.Tensor) -> float:
    """One full training step (forward, balance loss, backward, balancer step, SGD); seconds in the balancer call."""
    _, loss, balancer_s = _train_loss(model, balancer, ids)
    _backward_and_step(model, balancer, loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return balancer_s


def paired_ratio(
    arms: tuple, config, impl, device, dtype, state, batches, steps: int, warmup: int, compiled: str = "none"
) -> dict:
    """Step time of arm B over arm A measured in pairs: both models live side by side and their steps alternate (order
    flipped every pair), so drift of the machine cancels. Returns the median of the per-pair ratios B/A, its
    interquartile range and the number of pairs."""
    built = [build(name, config, impl, device, dtype, state, compiled) for name in arms]
    result = _alternate(built, batches, steps, warmup, _synchronizer(device))
    return {"arms": list(arms), "experts_implementation": impl, "compile": compiled, **result}


def _alternate(built: list, batches, steps: int, warmup: int, sync) -> dict:
    """Alternate training steps of two (model, balancer) pairs; the median and IQR of the per-pair time ratios B/A."""
    optimizers = [torch.optim.SGD(model.parameters(), lr=1e-4) for model, _ in built]
    ratios = []
    for i in range(warmup + steps):
        ids, times = batches[i % len(batches)], [0.0, 0.0]
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            sync()
            start = time.perf_counter()
            _train_step(*built[j], optimizers[j], ids)
            times[j] = sync(time.perf_counter() - start)
        if i >= warmup:
            ratios.append(times[1] / times[0])
    q = torch.tensor(ratios, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"ratio": float(q[1]), "iqr": [float(q[0]), float(q[2])], "pairs": len(ratios)}


# transformers' engine layouts on the torchrun world (size w) that `--paired_layouts` compares
ENGINE_LAYOUTS = {
    "fsdp": lambda w: {"fsdp_size": w},
    "fsdp+ep": lambda w: {"fsdp_size": w, "ep_size": w},
}


def engine_paired_ratio(layouts: tuple, config, impl: str, state, batches, steps: int, warmup: int) -> dict:
    """Step time of engine layout B over A (e.g. FSDP2 + EP over FSDP2) under torchrun, measured in pairs like
    `paired_ratio`; a step's time is the slowest rank's (ranks meet at a barrier before each step)."""
    import torch.distributed as dist
    from transformers.distributed.configuration_utils import DistributedConfig

    from .expert_parallel import COUNTED_ALL_TO_ALL

    world = dist.get_world_size()
    unknown = [name for name in layouts if name not in ENGINE_LAYOUTS]
    if len(layouts) != 2 or unknown:
        raise ValueError(f"--paired_layouts={','.join(layouts)!r}: allowed two of {list(ENGINE_LAYOUTS)}")
    built = []
    for name in layouts:
        sizes = ENGINE_LAYOUTS[name](world)
        extra = {"ep_implementation": COUNTED_ALL_TO_ALL} if sizes.get("ep_size", 1) > 1 else {}
        model = QwenMoeGBForCausalLM.from_pretrained(
            None, config=config, state_dict=state, distributed_config=DistributedConfig(**sizes, **extra),
            experts_implementation=impl,
        ).train()  # fmt: skip
        built.append((model, GlobalBalancer(model)))

    def sync(elapsed: float | None = None) -> float | None:
        if elapsed is None:
            dist.barrier()
            return None
        slowest = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return float(slowest)

    result = _alternate(built, batches, steps, warmup, sync)
    return {"layouts": list(layouts), "world_size": world, "experts_implementation": impl, **result}


def _setup(args: argparse.Namespace):
    """(device, dtype, config, initial state dict, 4 batches of token ids) shared by every arm."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    config = load_preset(args.preset, **overrides)
    torch.manual_seed(0)
    state = QwenMoeGBForCausalLM(config).state_dict()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device) for _ in range(4)]
    return device, dtype, config, state, batches


def run_paired(args: argparse.Namespace) -> list[dict]:
    """`--paired A,B` for each experts implementation: see `paired_ratio`."""
    device, dtype, config, state, batches = _setup(args)
    arms = tuple(args.paired.split(","))
    if len(arms) != 2:
        raise ValueError(f"--paired={args.paired!r} names {len(arms)} arms: allowed exactly two, e.g. micro,global")
    return [
        paired_ratio(arms, config, impl, device, dtype, state, batches, args.paired_steps, args.warmup, compiled)
        for compiled in args.compile.split(",")
        for impl in args.experts_implementations.split(",")
    ]


def run_paired_layouts(args: argparse.Namespace) -> list[dict]:
    """`--paired_layouts A,B` under torchrun, for each experts implementation: see `engine_paired_ratio`."""
    import torch.distributed as dist

    args.dtype = "fp32"
    device, dtype, config, state, batches = _setup(args)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    layouts = tuple(args.paired_layouts.split(","))
    results = [
        engine_paired_ratio(layouts, config, impl, state, batches, args.paired_steps, args.warmup)
        for impl in args.experts_implementations.split(",")
    ]
    dist.barrier()
    return results


def run(args: argparse.Namespace) -> list[Result]:
    distributed = args.distributed
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device, dtype, config, state, batches = _setup(args)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in _device_name(device)), None)
    compile_modes = args.compile.split(",")
    if unknown := [m for m in compile_modes if m not in COMPILE_MODES]:
        raise ValueError(f"--compile={args.compile!r} has unknown modes {unknown}: allowed {list(COMPILE_MODES)}")
    arms = [
        (name, impl, compiled)
        for compiled in compile_modes
        for impl in args.experts_implementations.split(",")
        for name in args.models.split(",")
    ]
    timings: dict[tuple, list[tuple[float, float | None, float | None]]] = {arm: [] for arm in arms}
    for _ in range(args.rounds):  # arms interleaved round by round; the median round is reported
        for name, impl, compiled in arms:
            model, balancer = build(name, config, impl, device, dtype, state, compiled)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step_s, allreduce_s = time_steps(model, balancer, batches, args.steps, args.warmup, device)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            timings[name, impl, compiled].append((step_s, allreduce_s, mem))
            del model, balancer
            _release_memory()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.profile:
        profile_arm(arms[0], config, device, dtype, state, batches, args.profile)
    results = []
    tokens = args.batch * args.seq
    for (name, impl, compiled), rounds in timings.items():
        step_s, allreduce_s, mem = sorted(rounds, key=lambda r: r[0])[len(rounds) // 2]
        tps = tokens / step_s
        mfu = flops_per_token(config, args.seq) * tps / (peak * 1e12) if peak else None
        allreduce_ms = allreduce_s * 1e3 if (distributed and allreduce_s is not None) else None
        ops = saved = kept = None
        if args.accounting and compiled == "none":  # one more, untimed step under an op counter
            model, balancer = build(name, config, impl, device, dtype, state)
            ops, saved = step_accounting(model, balancer, batches[0])
            tracked = tracked_memory(model, balancer, batches[0])
            kept = tracked[0] if tracked else None
            if device.type == "cpu":  # no allocator peak on a CPU: the peak of live tensors instead
                mem = tracked[1] if tracked else None
            del model, balancer
            _release_memory()
        elif args.accounting and compiled == "model":  # kernels of the compiled graphs + the ops left eager
            model, balancer = build(name, config, impl, device, dtype, state, compiled)
            ops = sum(compiled_step_kernels(model, balancer, batches[0]))
            del model, balancer
        results.append(
            Result(name, impl, _device_name(device), args.dtype, args.batch, args.seq, tokens, step_s * 1e3, tps,
                   mem, mfu, allreduce_ms, compiled, ops, saved, kept_mib=kept)
        )  # fmt: skip
    if args.budget_from:  # the largest micro-batch each arm runs in the memory the budget arm needs
        budget = next((r for r in results if r.name == args.budget_from and r.peak_mem_gib is not None), None)
        if budget is None:
            raise ValueError(
                f"--budget_from={args.budget_from!r} names no arm with a measured peak: give one of --models"
            )
        for r in results:
            if r.compiled == "none":
                r.max_batch_in_budget = largest_batch(r.name, config, r.experts_implementation, device, dtype, state,
                                                      args, budget.peak_mem_gib)  # fmt: skip
    if distributed:
        collective = collective_cost_us(config, device)
        for r in results:
            r.collective_us = collective
        torch.distributed.destroy_process_group()
    return results


def largest_batch(name, config, impl, device, dtype, state, args, budget_gib: float, limit: int = 1024) -> int:
    """The most sequences of `args.seq` tokens one micro-batch of the arm holds with a peak (CUDA: the allocator's;
    CPU: the live tensors') within `budget_gib`: measured, a step per size tried, not extrapolated. The sizes tried
    come from a line through the peaks measured so far (the first through the origin, which overestimates the slope),
    so no step runs far above the budget; then bisection. 0 when even one sequence exceeds it."""
    peaks: dict[int, float] = {}

    def peak(batch: int) -> float:
        ids = torch.randint(0, config.vocab_size, (batch, args.seq), generator=torch.Generator().manual_seed(batch))
        model, balancer = build(name, config, impl, device, dtype, state)
        ids = ids.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            _, loss, _ = _train_loss(model, balancer, ids)
            _backward_and_step(model, balancer, loss)
            peaks[batch] = torch.cuda.max_memory_allocated() / 2**30
        else:
            peaks[batch] = tracked_memory(model, balancer, ids)[1]
        del model, balancer, ids
        _release_memory()
        return peaks[batch]

    low, high = 0, args.batch  # low fits (0 trivially), high does not (once found)
    if peak(high) <= budget_gib:
        low, high = high, None
        while high is None and low < limit:
            (b1, p1), (b2, p2) = sorted(peaks.items())[-2:] if len(peaks) > 1 else ((0, 0.0), (low, peaks[low]))
            slope = max((p2 - p1) / (b2 - b1), 1e-9)
            candidate = min(limit, max(low + 1, int(low + (budget_gib - peaks[low]) / slope)))
            if peak(candidate) <= budget_gib:
                low = candidate
            else:
                high = candidate
        if high is None:
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peak(middle) <= budget_gib else (low, middle)
    return low


def _release_memory() -> None:
    """Free the models of a finished measurement (they reference themselves: hooks, the balancer) and give the heap
    back to the system, so that measurements in a row do not add up."""
    gc.collect()
    if platform.system() == "Linux":
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def profile_arm(arm, config, device, dtype, state, batches, path: str) -> None:
    """torch.profiler table of 3 training steps of one arm (what limits the step), written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    model, balancer = build(arm[0], config, arm[1], device, dtype, state, arm[2])
    time_steps(model, balancer, batches, 1, 2, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        time_steps(model, balancer, batches, 3, 0, device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def markdown_table(results: list[Result]) -> str:
    """One row per arm; ratios against QwenMoE-GB micro and transformers with the same experts and compile mode."""
    micro = {(r.experts_implementation, r.compiled): r.tokens_per_s for r in results if r.name == "micro"}
    hf = {(r.experts_implementation, r.compiled): r.tokens_per_s for r in results if r.name.startswith("transformers")}
    lines = [
        "| model | experts | compile | tokens/s | step ms | vs micro | vs transformers | vs transformers uncompiled | "
        "peak GiB | MFU | all-reduce ms | ops/step | saved MiB | kept MiB | batch in budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(table: dict, r: Result, compiled: str | None = None) -> str:
        base = table.get((r.experts_implementation, compiled or r.compiled))
        return "—" if base is None else f"{r.tokens_per_s / base:.3f}"

    def opt(value, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for r in results:
        lines.append(
            f"| {r.name} | {r.experts_implementation} | {r.compiled} | {r.tokens_per_s:,.0f} | "
            f"{r.step_ms:.1f} | {ratio(micro, r)} | {ratio(hf, r)} | {ratio(hf, r, 'none')} | "
            f"{opt(r.peak_mem_gib, '.3f')} | "
            f"{'—' if r.mfu is None else f'{100 * r.mfu:.1f}%'} | {opt(r.allreduce_ms, '.2f')} | "
            f"{opt(r.ops_per_step, ',')} | {opt(r.saved_mib, '.1f')} | {opt(r.kept_mib, '.1f')} | "
            f"{opt(r.max_batch_in_budget, 'd')} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `bench` command's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="model preset or config JSON path")
    parser.add_argument("--config_overrides", default=None, help="JSON dict of config fields")
    parser.add_argument(
        "--models",
        default="micro,global,global+auxfree,transformers-qwen2",
        help="arms: micro / global (+auxfree, +qb / +qbmicro: Quantile Balancing, +expert_act / +experts / +moe: "
        "moe_recompute, +gc: whole-layer gradient checkpointing), transformers-qwen3 / transformers-qwen2 (+gc)",
    )
    parser.add_argument(
        "--budget_from", default=None, help="an arm whose peak memory is the budget: report each arm's largest batch"
    )
    parser.add_argument("--experts_implementations", default="eager,grouped_mm", help="comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="sequence length")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all arms, interleaved; median reported")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter and compute dtype")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument(
        "--compile", default="none", help="comma-separated torch.compile modes for every arm: none, layers, model"
    )
    parser.add_argument(
        "--accounting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count the ATen ops (compile=model: kernel launches) and saved activation bytes of one step per arm "
        "(deterministic, untimed)",
    )
    parser.add_argument("--distributed", action="store_true", help="run under torchrun: measure the all-reduce")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of the first arm here")
    parser.add_argument("--paired", default=None, help="two arms, e.g. micro,global: step-time ratio in pairs")
    parser.add_argument("--paired_steps", type=int, default=100, help="timed pairs of --paired")
    parser.add_argument(
        "--paired_layouts", default=None, help="under torchrun: two engine layouts (fsdp, fsdp+ep), step-time ratio"
    )
    return parser


def main(argv: list[str] | None = None) -> list[Result]:
    args = build_parser().parse_args(argv)
    if args.paired and args.distributed:
        raise ValueError(f"--paired={args.paired!r} with --distributed: allowed in one process only")
    if args.paired_layouts and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--paired_layouts={args.paired_layouts!r} needs torchrun: allowed with several processes")
    results = run(args) if args.models else []
    paired = run_paired(args) if args.paired else []
    if args.paired_layouts:
        paired += run_paired_layouts(args)
    if int(os.environ.get("RANK", "0")) == 0:
        if results:
            print(markdown_table(results))
        if results and results[0].collective_us is not None:
            world = os.environ.get("WORLD_SIZE", "?")
            print(f"all-reduce of the (L, E) int64 counts alone, {world} processes: {results[0].collective_us:.1f} µs")
        for p in paired:
            low, high = p["iqr"]
            names = p.get("arms") or p["layouts"]
            where = f"compile {p['compile']}" if "compile" in p else f"{p['world_size']} processes"
            print(f"paired {names[1]} / {names[0]} step time ({p['experts_implementation']}, {where}, {p['pairs']} "
                  f"pairs): median {p['ratio']:.4f}, interquartile range {low:.4f}-{high:.4f}")  # fmt: skip
        if args.out:
            meta = {"torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args)}
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": [asdict(r) for r in results], "paired": paired}, f, indent=2)
    return results
