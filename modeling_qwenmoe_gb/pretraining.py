"""Pretraining: the arguments, model building, the training run and the evaluation that `qwenmoe-gb pretrain` and
`qwenmoe-gb compare` (whose arms are pretrain runs) both use.

Features
- `ModelArguments` / `DataArguments`: the model and data flags, next to every `transformers.TrainingArguments` flag.
- `ParallelArguments`: transformers' native parallel engine (`--fsdp_size`, `--dp_replicate_size`, `--ep_size`,
  `--tp_size`, named like `DistributedConfig`'s fields), checked against the world size and the experts before
  anything is built.
- `build_model`: a preset (`from_config`) or `--model_name_or_path`, with the balance options applied and checked,
  sharded at load time when parallel sizes are given. `--model_name_or_path` takes any transformers MoE the balancer
  reads (Qwen2/3-MoE, OLMoE, Mixtral, GPT-OSS, DeepSeek-V3, GLM-4.5, ...), trained as it is: its own class, the
  balance flags given to the trainer, the saved folder a checkpoint of that class (`--convert_to_qwenmoe_gb` trains a
  Qwen2/3-MoE as a QwenMoE-GB model instead).
- Crash-safe: a rerun of the same command resumes from the newest complete checkpoint in `--output_dir`
  (`--resume_from_checkpoint auto|none|PATH`, `checkpoints.resolve_resume`); an earlier run's checkpoints or finished
  model are never overwritten without `--overwrite_output_dir true`.
- `pretrain(argv)`: train with `QwenMoeGBTrainer` on domain-pure micro-batches, save, evaluate per domain, analyse
  expert specialization and write the model card. Runs unchanged under `accelerate launch` / `torchrun`.
"""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from . import analysis
from .any_moe import BALANCE_OPTIONS, StockMoE
from .checkpoints import resolve_resume
from .convert import TRANSFORMERS_UNITS, from_dense, qwen_moe_config
from .data import (
    ByteTokenizer,
    DomainBatchSampler,
    OpenedData,
    TokenDomains,
    check_data_state,
    collate_causal_lm,
    default_cache_dir,
    open_data,
    parse_weights,
    stream_identity,
    tokenizer_vocab_size,
)
from .hub import hub_model_id, write_model_card
from .modeling_qwenmoe_gb import QwenMoeGBForCausalLM
from .presets import load_preset
from .trainer import QwenMoeGBTrainer, SwitchScopeCallback, read_data_state

ARCHITECTURE_FLAGS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
# the names a transformers MoE config uses for each architecture flag (`--model_config`)
ARCHITECTURE_ALIASES = {
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "num_experts_per_tok": ("num_experts_per_tok",),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "shared_expert_intermediate_size": ("shared_expert_intermediate_size",),
}
PRETRAIN_DEFAULTS = [
    "--output_dir", "runs/pretrain",
    "--max_steps", "600",
    "--per_device_train_batch_size", "2",
    "--gradient_accumulation_steps", "8",
    "--learning_rate", "3e-3",
    "--lr_scheduler_type", "cosine",
    "--warmup_steps", "25",
    "--weight_decay", "0.01",
    "--logging_steps", "50",
    "--save_steps", "300",
    "--save_total_limit", "2",
    "--report_to", "none",
    "--seed", "0",
    "--dataloader_drop_last", "true",
]  # fmt: skip


@dataclass
class ModelArguments:
    preset: str = field(default="demo", metadata={"help": "preset name (configuration/*.json) or a config JSON path"})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "start from this checkpoint instead: QwenMoE-GB, or any transformers MoE (trained as it is)"},
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "train this transformers MoE config (folder, Hub name or config JSON) from scratch, as its "
                          "own class (e.g. configuration/stock/olmoe-byte.json)"},
    )  # fmt: skip
    convert_to_qwenmoe_gb: bool = field(
        default=False,
        metadata={"help": "with a Qwen2/3-MoE --model_name_or_path: train it as a QwenMoE-GB model (converted)"},
    )
    balance_scope: str = field(default="global", metadata={"help": "micro | global | sequence"})
    router_aux_loss_coef: float = field(default=0.1, metadata={"help": "expert-level LBL coefficient"})
    micro_balance_coef: float = field(default=0.0, metadata={"help": "extra micro LBL on top of global"})
    balance_group_size: int | None = field(default=None, metadata={"help": "micro scope over chunks of b sequences"})
    device_balance_groups: str | None = field(default=None, metadata={"help": "D, a JSON partition, or 'ep'"})
    device_balance_coef: float = field(default=0.001, metadata={"help": "device-level LBL coefficient"})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "router z-loss coefficient"})
    aux_free: bool = field(default=False, metadata={"help": "auxiliary-loss-free bias balancing"})
    aux_free_bias_update_rate: float = field(default=0.001, metadata={"help": "aux-free bias update rate u"})
    aux_free_method: str = field(
        default="sign", metadata={"help": "aux-free bias update: sign (±u) | quantile (Quantile Balancing, no rate)"}
    )
    quantile_scope: str = field(default="global", metadata={"help": "QB quantile: global (pooled) | micro_mean"})
    quantile_bins: int = field(default=1000, metadata={"help": "QB histogram bins per expert (global scope)"})
    quantile_ema: float = field(default=0.0, metadata={"help": "QB: new = ema·old + (1-ema)·quantile; 0 replaces"})
    router_scoring_func: str | None = field(
        default=None, metadata={"help": "softmax | sigmoid (QwenMoE-GB models; default softmax)"}
    )
    experts_implementation: str | None = field(default=None, metadata={"help": "eager | batched_mm | grouped_mm"})
    moe_recompute: str | None = field(
        default=None, metadata={"help": "none | expert_act | experts | moe: recomputed in backward (QwenMoE-GB)"}
    )
    n_group: int | None = field(default=None, metadata={"help": "group-limited routing: expert groups (QwenMoE-GB)"})
    topk_group: int | None = field(default=None, metadata={"help": "group-limited routing: groups per token"})
    routed_scaling_factor: float | None = field(default=None, metadata={"help": "scale of the routed gate weights"})
    expert_capacity_factor: float | None = field(
        default=None, metadata={"help": "token dropping in training: capacity factor (default dropless)"}
    )
    moe_token_drop_policy: str | None = field(default=None, metadata={"help": "probs | position (with capacity)"})
    config_overrides: str | None = field(default=None, metadata={"help": "JSON dict of further config fields"})
    balance_sync_group_size: int | None = field(default=None, metadata={"help": "all-reduce within groups of ranks"})
    aux_free_update: str = field(default="global", metadata={"help": "aux-free bias update: global (per step) | micro"})
    switch_scope_at: int | None = field(default=None, metadata={"help": "optimizer step at which to switch scope"})
    switch_scope_to: str | None = field(default=None, metadata={"help": "scope to switch to at switch_scope_at"})
    upcycle_from: str | None = field(
        default=None, metadata={"help": "upcycle this dense Qwen2 / Qwen3 / Llama checkpoint (path or Hub name)"}
    )
    upcycle_recipe: str = field(default="copy", metadata={"help": "copy | segment", "choices": ["copy", "segment"]})
    upcycle_reinit_ratio: float = field(default=0.0, metadata={"help": "Drop-Upcycling re-initialised fraction"})
    num_experts: int | None = field(default=None, metadata={"help": "routed experts (a preset or --upcycle_from)"})
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "top-k (a preset or --upcycle_from)"})
    moe_intermediate_size: int | None = field(default=None, metadata={"help": "expert width (preset / upcycle)"})
    shared_expert_intermediate_size: int | None = field(
        default=None, metadata={"help": "shared expert width, 0 = none (a preset or --upcycle_from; upcycling: 0)"}
    )

    def architecture(self) -> dict:
        """The architecture flags given (`--num_experts`, ...): they shape a model built here (a preset, or
        `--upcycle_from`); a checkpoint or a transformers config keeps its own shape, so there they are refused."""
        given = {n: getattr(self, n) for n in ARCHITECTURE_FLAGS if getattr(self, n) is not None}
        if given and self.model_name_or_path and not self.upcycle_from:
            flags = ", ".join(f"--{n} {v}" for n, v in given.items())
            raise ValueError(
                f"{flags} is not allowed with --model_name_or_path: a checkpoint keeps its shape; the architecture "
                "flags shape a model built here (--preset, --model_config, --upcycle_from)"
            )
        return given

    def stock_architecture(self, config) -> dict:
        """The architecture flags as fields of a transformers MoE config (`--model_config`): each under the name the
        family uses; `ValueError` naming the flag where the config has no such field."""
        fields = {}
        for flag, value in self.architecture().items():
            name = next((n for n in ARCHITECTURE_ALIASES[flag] if hasattr(config, n)), None)
            if name is None:
                raise ValueError(
                    f"--{flag} {value} is not allowed with --model_config ({config.model_type}): its config has no "
                    f"field {' / '.join(ARCHITECTURE_ALIASES[flag])} (--config_overrides sets the family's own fields)"
                )
            fields[name] = value
        return fields

    def load_kwargs(self) -> dict:
        """`from_pretrained` / `from_config` kwargs of the model flags."""
        return {"experts_implementation": self.experts_implementation} if self.experts_implementation else {}

    def balance_fields(self) -> dict:
        groups = self.device_balance_groups
        if groups is not None and groups != "ep":
            groups = json.loads(groups)
        fields = {
            "balance_scope": self.balance_scope,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "micro_balance_coef": self.micro_balance_coef,
            "balance_group_size": self.balance_group_size,
            "device_balance_groups": groups,
            "device_balance_coef": self.device_balance_coef,
            "router_z_loss_coef": self.router_z_loss_coef,
            "aux_free": self.aux_free,
            "aux_free_bias_update_rate": self.aux_free_bias_update_rate,
            "aux_free_method": self.aux_free_method,
            "quantile_scope": self.quantile_scope,
            "quantile_bins": self.quantile_bins,
            "quantile_ema": self.quantile_ema,
        }
        for name in OWN_MODEL_FLAGS:
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        fields.update(json.loads(self.config_overrides) if self.config_overrides else {})
        return fields

    def stock_options(self) -> tuple[dict, dict]:
        """For a transformers MoE trained as it is: (the balance options, for the trainer; the other
        `config_overrides`, for its config). Its router scores as the model does: `--router_scoring_func` is
        refused."""
        if self.moe_recompute is not None:
            raise ValueError(
                f"moe_recompute={self.moe_recompute!r} applies to QwenMoE-GB models (a preset, --upcycle_from, "
                "--convert_to_qwenmoe_gb): a transformers MoE trained as it is has whole-layer --gradient_checkpointing"
            )
        for name in ROUTING_FLAGS:
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to QwenMoE-GB models (a preset, --upcycle_from, "
                    "--convert_to_qwenmoe_gb): a transformers MoE trained as it is routes as its config says "
                    "(--config_overrides sets its own fields, e.g. DeepSeek-V3's n_group / topk_group)"
                )
        if self.router_scoring_func is not None:
            raise ValueError(
                f"router_scoring_func={self.router_scoring_func!r} applies to QwenMoE-GB models (a preset, "
                "--upcycle_from, --convert_to_qwenmoe_gb): a transformers MoE trained as it is keeps its own scoring"
            )
        fields = self.balance_fields()
        options = {k: fields.pop(k) for k in list(fields) if k in BALANCE_OPTIONS}
        return options, fields


# Model flags that set QwenMoE-GB config fields of the same name when given.
ROUTING_FLAGS = ("n_group", "topk_group", "routed_scaling_factor", "expert_capacity_factor", "moe_token_drop_policy")
OWN_MODEL_FLAGS = ("router_scoring_func", "moe_recompute", *ROUTING_FLAGS)


@dataclass
class DataArguments:
    data: str = field(
        default="synthetic",
        metadata={"help": "'synthetic', 'hub:name1,...', a folder of raw text per domain (prepared into --data_cache "
                          "first), or of tokens: prepare-data output, Megatron .bin/.idx, datatrove .ds, HF datasets"},
    )  # fmt: skip
    tokenizer: str | None = field(
        default=None, metadata={"help": "'byte' or a tokenizer path / Hub name (default: the data's, else byte)"}
    )
    seq_len: int = field(default=128, metadata={"help": "packed sequence length (cut at read time)"})
    data_cache: str | None = field(
        default=None, metadata={"help": "where raw data is prepared (default: $QWENMOE_GB_DATA_CACHE or ~/.cache/...)"}
    )
    num_proc: int | None = field(default=None, metadata={"help": "processes that prepare raw data (default: cores)"})
    text_field: str = field(default="text", metadata={"help": "text field of jsonl / parquet rows / Hub datasets"})
    domain_column: str | None = field(default=None, metadata={"help": "domain column of a mixed Hub dataset"})
    max_docs_per_domain: int | None = field(default=None, metadata={"help": "cap documents per domain and split"})
    max_tokens_per_domain: int | None = field(default=None, metadata={"help": "cap training tokens per domain"})
    test_fraction: float = field(default=0.01, metadata={"help": "held-out share of a Hub dataset without test split"})
    synthetic_docs: int = field(default=300, metadata={"help": "synthetic training documents per domain"})
    domain_weights: str | None = field(default=None, metadata={"help": "recipe weights 'a=2,b=1' (default uniform)"})
    domain_chunk: int | None = field(default=None, metadata={"help": "micro-batches of domain-pure chunks of n seqs"})
    eval_batch_size: int = field(default=16, metadata={"help": "batch size of evaluation and analysis"})
    eval_max_sequences: int | None = field(default=64, metadata={"help": "held-out sequences per domain"})
    allow_data_change: bool = field(
        default=False, metadata={"help": "resume on other data, tokenizer, seq_len or weights than the checkpoint's"}
    )

    def open(self, progress: bool = True) -> OpenedData:
        """The data as token streams (raw text prepared into `data_cache` first, by default the shared cache)."""
        return open_data(
            self.data,
            self.tokenizer,
            cache_dir=self.data_cache,
            num_proc=self.num_proc,
            text_field=self.text_field,
            domain_column=self.domain_column,
            max_docs_per_domain=self.max_docs_per_domain,
            max_tokens_per_domain=self.max_tokens_per_domain,
            synthetic_docs=self.synthetic_docs,
            test_fraction=self.test_fraction,
            progress=progress,
        )


@dataclass
class RunArguments:
    """Where the run writes, and what an existing output folder means (`TrainingArguments.resume_from_checkpoint`
    takes `auto` (the default when unset), `none` or a checkpoint folder: `checkpoints.resolve_resume`)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "start over in an output_dir that holds an earlier run (its checkpoints may be rotated out)"},
    )


@dataclass
class ParallelArguments:
    """transformers' native parallel engine under `torchrun` (all unset: one process, or DDP through accelerate)."""

    fsdp_size: int | None = field(default=None, metadata={"help": "FSDP2 shards (data parallel)"})
    dp_replicate_size: int | None = field(default=None, metadata={"help": "FSDP replicas (HSDP), data parallel"})
    ep_size: int | None = field(default=None, metadata={"help": "expert parallel ranks (all-to-all token dispatch)"})
    tp_size: int | None = field(default=None, metadata={"help": "tensor parallel ranks (GPU only through the Trainer)"})

    def sizes(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def distributed_config(self, world_size: int, num_experts: int, use_cpu: bool):
        """A `DistributedConfig`, or None when no size above 1 is given; `ValueError` for a layout that cannot run."""
        sizes = self.sizes()
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name}={value} is not allowed: a size >= 1")
        if all(v == 1 for v in sizes.values()):
            return None
        fsdp, replicate, tp = (sizes.get(k, 1) for k in ("fsdp_size", "dp_replicate_size", "tp_size"))
        ep = sizes.get("ep_size", 1)
        if fsdp * replicate * tp != world_size:
            raise ValueError(
                f"fsdp_size={fsdp} × dp_replicate_size={replicate} × tp_size={tp} = {fsdp * replicate * tp} but the "
                f"world size is {world_size}: allowed sizes whose product is the number of processes (torchrun "
                "--nproc_per_node × nodes)"
            )
        if num_experts % ep or ep % tp or (fsdp * tp) % ep:
            raise ValueError(
                f"ep_size={ep} is not allowed with num_experts={num_experts}, fsdp_size={fsdp}, tp_size={tp}: it must "
                "divide num_experts and fsdp_size × tp_size, and be a multiple of tp_size"
            )
        if tp > 1 and (use_cpu or not torch.cuda.is_available()):
            raise ValueError(
                f"tp_size={tp} is not allowed on CPU: accelerate runs the Trainer with tensor parallel only on GPUs "
                "(use fsdp_size / dp_replicate_size / ep_size on CPU)"
            )
        from transformers.distributed.configuration_utils import DistributedConfig

        from .expert_parallel import COUNTED_ALL_TO_ALL

        extra = {"ep_implementation": COUNTED_ALL_TO_ALL} if ep > 1 else {}  # all-to-all that counts its deliveries
        return DistributedConfig(**sizes, **extra)


# ----------------------------------------------------------------------------------------- model building


def initial_weights(model_class, config) -> dict[str, torch.Tensor]:
    """The state dict of `model_class(config)` initialised in full in this process from the seed, as one process,
    DDP and the native engine draw it. Under DeepSpeed ZeRO-3, `from_config` initialises inside `zero.Init` (each
    rank draws its own partition, other weights than any other engine); the full draw, loaded with `from_pretrained`
    (which partitions as it loads), gives the same weights on every engine. A plain dict: transformers' ZeRO-3 loading
    fails on a state dict's `_metadata` (it sets it on a dict)."""
    return dict(model_class(config).state_dict())


def build_model(
    model_args: ModelArguments, data_args: DataArguments, tokenizer, distributed_config=None
) -> QwenMoeGBForCausalLM:
    """The model to train; with a `DistributedConfig`, sharded at load time by transformers' engine; under ZeRO-3,
    partitioned as it loads (a new model is then initialised in this process, identically on every rank from the
    seed, and loaded from its state dict: `initial_weights`)."""
    vocab = tokenizer_vocab_size(tokenizer)
    kwargs = model_args.load_kwargs()
    if distributed_config is not None:
        kwargs["distributed_config"] = distributed_config
    sharded_at_load = distributed_config is not None or is_deepspeed_zero3_enabled()
    trains_as_qwenmoe_gb(model_args)  # the start flags agree
    if model_args.upcycle_from:
        model = upcycled_model(model_args, kwargs)
        if vocab > model.config.vocab_size:
            raise ValueError(
                f"tokenizer={data_args.tokenizer!r} has {vocab} tokens but the dense model's vocab_size is "
                f"{model.config.vocab_size}: allowed tokenizers with at most {model.config.vocab_size} tokens"
            )
    elif model_args.model_config:
        options, overrides = model_args.stock_options()
        shape = model_args.stock_architecture(AutoConfig.from_pretrained(model_args.model_config))
        config = AutoConfig.from_pretrained(model_args.model_config, **overrides, **shape)  # derived fields follow
        if vocab > config.vocab_size:
            config.vocab_size = vocab
        if not sharded_at_load:
            model = AutoModelForCausalLM.from_config(config, **kwargs)  # random init at the run's seed, its own class
        else:  # initialised here (the same on every rank: same seed), sharded as it loads
            model_class = AutoModelForCausalLM._model_mapping[type(config)]
            weights = initial_weights(model_class, config)
            model = model_class.from_pretrained(None, config=config, state_dict=weights, **kwargs)
        StockMoE(model, **options).remove()  # checked now, before anything is written (the trainer hooks it again)
    elif model_args.model_name_or_path and not trains_as_qwenmoe_gb(model_args):
        source = model_args.model_name_or_path
        options, overrides = model_args.stock_options()  # the balance options go to the trainer (`trainer_options`)
        model = AutoModelForCausalLM.from_pretrained(source, **overrides, **kwargs)
        StockMoE(model, **options).remove()  # checked now, before anything is written (the trainer hooks it again)
        _check_vocab(data_args, vocab, model.config.vocab_size)
    elif model_args.model_name_or_path:
        source = model_args.model_name_or_path
        source_config = AutoConfig.from_pretrained(source)
        if source_config.model_type in TRANSFORMERS_UNITS:  # a stock Qwen2/3-MoE checkpoint, converted
            kwargs["config"] = qwen_moe_config(source_config, **model_args.balance_fields())
        model = QwenMoeGBForCausalLM.from_pretrained(source, **kwargs)
        for name, value in model_args.balance_fields().items():
            setattr(model.config, name, value)
        model.config.validate_balance()
        _check_vocab(data_args, vocab, model.config.vocab_size)
    else:
        config = load_preset(model_args.preset, **{**model_args.architecture(), **model_args.balance_fields()})
        if vocab > config.vocab_size:
            config.vocab_size = vocab
        if not sharded_at_load:
            model = QwenMoeGBForCausalLM._from_config(config, **kwargs)
        else:  # initialised here (the same on every rank: same seed), sharded as it loads
            weights = initial_weights(QwenMoeGBForCausalLM, config)
            model = QwenMoeGBForCausalLM.from_pretrained(None, config=config, state_dict=weights, **kwargs)
    longest = getattr(model.config, "max_position_embeddings", None)
    if longest is not None and data_args.seq_len > longest:
        raise ValueError(
            f"seq_len={data_args.seq_len} is above the model's max_position_embeddings={longest}: allowed 1..{longest}"
        )
    return model


def trains_as_qwenmoe_gb(model_args: ModelArguments) -> bool:
    """A preset, an upcycled model, a QwenMoE-GB checkpoint, or a Qwen2/3-MoE with `--convert_to_qwenmoe_gb`; False
    for any other transformers model given as `--model_name_or_path` (trained as it is, its own class)."""
    source = model_args.model_name_or_path or model_args.model_config
    if model_args.model_name_or_path and model_args.model_config:
        raise ValueError("model_name_or_path and model_config are both given: start from a checkpoint or a config")
    if not source or model_args.upcycle_from:
        return True
    model_type = AutoConfig.from_pretrained(source).model_type
    if model_args.model_config and (model_type == "qwenmoe_gb" or model_args.convert_to_qwenmoe_gb):
        raise ValueError(
            f"model_config={model_args.model_config!r} ({model_type}) with convert_to_qwenmoe_gb="
            f"{model_args.convert_to_qwenmoe_gb}: a QwenMoE-GB model from scratch is a --preset (a name or a config "
            "JSON); --model_config trains another transformers MoE as its own class"
        )
    if model_args.convert_to_qwenmoe_gb and model_type not in TRANSFORMERS_UNITS + ("qwenmoe_gb",):
        raise ValueError(
            f"convert_to_qwenmoe_gb=True is not allowed for model_type={model_type!r}: allowed for Qwen2-MoE and "
            "Qwen3-MoE checkpoints (any other transformers MoE trains as it is)"
        )
    return model_type == "qwenmoe_gb" or model_args.convert_to_qwenmoe_gb


def trainer_options(model_args: ModelArguments) -> dict:
    """The balance options the trainer takes: none for a QwenMoE-GB model (its config holds them), the balance flags
    for a transformers MoE trained as it is."""
    return {} if trains_as_qwenmoe_gb(model_args) else model_args.stock_options()[0]


def use_recorded_data(model: str | Path, data_args: DataArguments, argv: list[str]) -> None:
    """Without `--data`, the data, tokenizer and seq_len the model was trained on (its `data_info.json`)."""
    info = Path(model) / "data_info.json"
    if "--data" in argv or not info.is_file():
        return
    recorded = json.loads(info.read_text())
    folder = recorded.get("token_folder")
    data_args.data = folder if folder and Path(folder).is_dir() else recorded["data"]
    data_args.tokenizer = data_args.tokenizer or recorded["tokenizer"]
    if "--seq_len" not in argv and "seq_len" in recorded:
        data_args.seq_len = recorded["seq_len"]


def load_trained(folder: str | Path, **kwargs):
    """A trained folder as its own class: QwenMoE-GB, or the transformers MoE it was trained as."""
    if AutoConfig.from_pretrained(folder).model_type == "qwenmoe_gb":
        return QwenMoeGBForCausalLM.from_pretrained(folder, **kwargs)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def _check_vocab(data_args: DataArguments, vocab: int, model_vocab: int) -> None:
    if vocab > model_vocab:
        raise ValueError(
            f"tokenizer={data_args.tokenizer!r} has {vocab} tokens but the model's vocab_size is {model_vocab}: "
            f"allowed tokenizers with at most {model_vocab} tokens"
        )


def upcycled_model(model_args: ModelArguments, load_kwargs: dict) -> QwenMoeGBForCausalLM:
    """`--upcycle_from`: the dense checkpoint upcycled (`convert.from_dense`) with the balance options; loaded through
    `from_pretrained` when there are load kwargs (experts implementation, a parallel layout)."""
    if model_args.model_name_or_path:
        raise ValueError("upcycle_from and model_name_or_path are both given: start from one checkpoint")
    missing = [n for n in ("num_experts", "num_experts_per_tok") if getattr(model_args, n) is None]
    if missing:
        raise ValueError(f"upcycle_from={model_args.upcycle_from!r} needs {', '.join('--' + n for n in missing)}")
    model = from_dense(
        model_args.upcycle_from, model_args.num_experts, model_args.num_experts_per_tok,
        model_args.moe_intermediate_size, model_args.shared_expert_intermediate_size or 0, model_args.upcycle_recipe,
        model_args.upcycle_reinit_ratio, **model_args.balance_fields(),
    )  # fmt: skip
    if not load_kwargs:
        return model
    return QwenMoeGBForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict(), **load_kwargs)


def origin(model_args: ModelArguments, config) -> dict:
    """The card's lineage of a run: the Hub model it started from (`finetune`) or the local start, in words."""
    start = model_args.upcycle_from or model_args.model_name_or_path
    base = hub_model_id(start)
    text = None
    if model_args.upcycle_from:
        text = (
            f"Upcycled from `{start}` (recipe `{model_args.upcycle_recipe}`, {config.num_experts} experts top-"
            f"{config.num_experts_per_tok}, expert width {config.moe_intermediate_size}, shared expert width "
            f"{config.shared_expert_intermediate_size}, re-initialised fraction {model_args.upcycle_reinit_ratio})."
        )
    return {"base_model": base, "base_model_relation": "finetune" if base else None, "source": start, "origin": text}


def evaluate_and_analyze(model, packed_test, out_dir: Path, data_args: DataArguments, title: str = "") -> dict:
    routed = analysis.route_domains(model, packed_test, data_args.eval_batch_size, data_args.eval_max_sequences)
    ppl = analysis.perplexity_report(routed)
    spec = analysis.specialization_report(routed, analysis.experts_per_token(model))
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis.write_json(ppl, out_dir / "eval.json")
    analysis.write_json(spec, out_dir / "specialization.json")
    analysis.plot_heatmaps(spec, out_dir / "expert_heatmap.png", title)
    analysis.plot_topk_scores(spec, out_dir / "topk_scores.png")
    return {"eval": ppl, "specialization": spec}


def describe_data(data_args: DataArguments, packed: TokenDomains) -> str:
    sizes = ", ".join(f"{d}: {n} sequences" for d, n in zip(packed.domains, packed.sizes))
    return (
        f"`{data_args.data}` tokenized with `{data_args.tokenizer}`, packed per domain into {data_args.seq_len}-token "
        f"sequences ({sizes}); every micro-batch holds one domain, domains mixed across the global batch by recipe "
        f"weights `{data_args.domain_weights or 'uniform'}` (exact at every prefix: the quota method)."
    )


def write_data_info(path: Path, data_args: DataArguments, data: OpenedData, train: TokenDomains, world_size: int):
    """data_info.json: what the run trained on (`evaluate` / `analyze` read the same data by default)."""
    manifest = data.folder.manifest.get("domains", {})
    info = {
        "data": data_args.data,
        "token_folder": data.folder.path,
        "format": data.folder.kind,
        "fingerprint": data.folder.fingerprint,
        "world_size": world_size,
        "tokenizer": data.tokenizer_name,
        "tokenizer_sha256": data.tokenizer_sha256,
        "seq_len": data_args.seq_len,
        "domains": train.domains,
        "train_sequences": dict(zip(train.domains, train.sizes)),
        "train_tokens": {d: len(train.streams[d]) for d in train.domains},
        "documents": {d: s["train"]["documents"] for d, s in manifest.items() if "train" in s},
    }
    path.write_text(json.dumps(info, indent=2))


# (arguments, field, smallest allowed value, None allowed) of the numbers a run takes: checked before anything is built
NUMBERS = (
    ("data", "seq_len", 2, False), ("data", "synthetic_docs", 1, False), ("data", "eval_batch_size", 1, False),
    ("data", "eval_max_sequences", 1, True), ("data", "max_docs_per_domain", 1, True),
    ("data", "max_tokens_per_domain", 1, True), ("data", "num_proc", 1, True), ("data", "test_fraction", 0.0, False),
    ("data", "domain_chunk", 1, True),
    ("train", "per_device_train_batch_size", 1, False), ("train", "gradient_accumulation_steps", 1, False),
    ("train", "max_steps", 1, False), ("train", "learning_rate", 0.0, False), ("train", "warmup_steps", 0.0, False),
    ("train", "weight_decay", 0.0, False), ("train", "max_grad_norm", 0.0, True),
    ("model", "router_aux_loss_coef", 0.0, False), ("model", "micro_balance_coef", 0.0, False),
    ("model", "device_balance_coef", 0.0, False), ("model", "router_z_loss_coef", 0.0, False),
    ("model", "aux_free_bias_update_rate", 0.0, False), ("model", "balance_group_size", 1, True),
    ("model", "balance_sync_group_size", 1, True), ("model", "switch_scope_at", 0, True),
    ("model", "upcycle_reinit_ratio", 0.0, False), ("model", "num_experts", 1, True),
    ("model", "num_experts_per_tok", 1, True), ("model", "moe_intermediate_size", 1, True),
    ("model", "shared_expert_intermediate_size", 0, True),
)  # fmt: skip


def check_numbers(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
    """`ValueError` naming the flag, the value and what is allowed for a number a run cannot use (a negative
    sequence length, zero steps, a negative coefficient, ...), before any tokenizer, data or model is loaded."""
    groups = {"model": model_args, "data": data_args, "train": train_args}
    for group, name, minimum, optional in NUMBERS:
        value = getattr(groups[group], name)
        if value is None and optional:
            continue
        integer = isinstance(minimum, int)
        kind = "an integer" if integer else "a number"
        wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
        if wrong_type or value != value or value < minimum:
            raise ValueError(f"{name}={value!r} is not allowed: {kind} >= {minimum} is required")
    if not model_args.upcycle_reinit_ratio <= 1.0:
        raise ValueError(
            f"upcycle_reinit_ratio={model_args.upcycle_reinit_ratio!r} is not allowed: a number in [0, 1] is required"
        )


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name V` / `--name=V` in argv (the last one), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}":
            value = argv[i + 1] if i + 1 < len(argv) else "true"
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _flag_is_true(argv: list[str], name: str) -> bool:
    """Whether argv sets the boolean `--name` true (the spellings HfArgumentParser reads as true)."""
    value = _flag(argv, name)
    return value is not None and value.lower() in ("yes", "true", "t", "y", "1")


def cpu_launch_flags(argv: list[str]) -> list[str]:
    """The flags a run launched on several processes (accelerate / torchrun set WORLD_SIZE) needs on a machine
    without an accelerator, or a `ValueError` with the fix. accelerate picks DeepSpeed only when not told to use the
    CPU, and then needs gloo named as the backend (`--ddp_backend gloo`); `--use_cpu true` would silently run DDP
    instead. DDP and FSDP need `--use_cpu true` (the Trainer otherwise counts one process); accelerate runs FSDP as
    DDP on CPU."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and _flag_is_true(argv, "use_cpu"):
        raise ValueError(
            "use_cpu=True under a DeepSpeed config: accelerate would run DDP, not DeepSpeed. Allowed: drop --use_cpu "
            "(on a machine without GPUs the run sets --ddp_backend gloo, DeepSpeed's CPU accelerator)"
        )
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = torch.cuda.is_available() or (accelerator is not None and accelerator.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or has_accelerator:
        return []
    deepspeed_file = _flag(argv, "deepspeed")
    if deepspeed_file is not None:
        raise ValueError(
            f"deepspeed={deepspeed_file!r} on a machine without GPUs: transformers then counts one process "
            "(DeepSpeed's batch-size check fails). Allowed on CPU: accelerate launch --config_file "
            "configuration/accelerate/deepspeed_zero2.yaml (or deepspeed_zero3*.yaml), without --deepspeed"
        )
    processes = os.environ["WORLD_SIZE"]
    if deepspeed:
        for precision in ("bf16", "fp16"):
            if _flag_is_true(argv, precision):
                raise ValueError(
                    f"{precision}={_flag(argv, precision)!r} under DeepSpeed on a machine without GPUs: transformers "
                    f"allows {precision} on CPU only with --use_cpu, under which accelerate runs DDP instead. Allowed "
                    f"on CPU: fp32 (drop --{precision})"
                )
        print(f"no GPU: DeepSpeed on {processes} CPU processes (--ddp_backend gloo)")
        return [] if _flag(argv, "ddp_backend") else ["--ddp_backend", "gloo"]
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        print(f"no GPU: accelerate runs FSDP as DDP on CPU ({processes} processes); the native engine shards on CPU")
    else:
        print(f"no GPU: the {processes} processes run on CPU (--use_cpu true)")
    return [] if _flag(argv, "use_cpu") is not None else ["--use_cpu", "true"]


def pretrain_parser() -> HfArgumentParser:
    """The `pretrain` command's flags: ours, then every `transformers.TrainingArguments` flag."""
    return HfArgumentParser((ModelArguments, DataArguments, ParallelArguments, RunArguments, TrainingArguments))


def pretrain(argv: list[str], callbacks: list | None = None) -> dict:
    """`qwenmoe-gb pretrain ARGV` (from Python: `callbacks`, extra `TrainerCallback`s for the trainer)."""
    parsed = pretrain_parser().parse_args_into_dataclasses(args=PRETRAIN_DEFAULTS + argv + cpu_launch_flags(argv))
    model_args, data_args, parallel_args, run_args, train_args = parsed
    check_numbers(model_args, data_args, train_args)
    model_args.architecture()  # the architecture flags apply to this start, or are refused now
    train_args.resume_from_checkpoint = resolve_resume(
        train_args.output_dir, train_args.resume_from_checkpoint, run_args.overwrite_output_dir
    )  # the newest complete checkpoint of output_dir by default; nothing an earlier run wrote is lost
    num_experts = _num_experts(model_args)
    distributed_config = parallel_args.distributed_config(train_args.world_size, num_experts, train_args.use_cpu)
    set_seed(train_args.seed)
    with train_args.main_process_first(local=False, desc="prepare data"):  # one process prepares, the others wait
        data = data_args.open(progress=not train_args.disable_tqdm)
        data.folder.max_token_ids(data_args.data_cache or default_cache_dir())  # scanned once (when not recorded)
    data_args.tokenizer = data.tokenizer_name
    tokenizer = data.tokenizer
    train, test = data.domains("train", data_args.seq_len), data.domains("test", data_args.seq_len)
    weights = parse_weights(data_args.domain_weights, train.domains)
    batch, chunk = train_args.per_device_train_batch_size, data_args.domain_chunk
    identity = stream_identity(data.folder.fingerprint, data.tokenizer_sha256, data_args.seq_len, train.domains,
                               weights, train_args.seed, batch, chunk)  # fmt: skip
    saved = read_data_state(train_args.resume_from_checkpoint) if train_args.resume_from_checkpoint else None
    if saved is not None:  # refused now, before the model is built
        check_data_state(saved, identity, data_args.allow_data_change, where=train_args.resume_from_checkpoint)
    micro_batches = train_args.max_steps * train_args.gradient_accumulation_steps * train_args.world_size
    sampler = DomainBatchSampler(
        train.sizes, batch, weights, micro_batches, train_args.seed, chunk, domains=train.domains
    )
    model = build_model(model_args, data_args, tokenizer, distributed_config)
    data.check_vocab(model.get_input_embeddings().num_embeddings)
    trainer = QwenMoeGBTrainer(
        model=model,
        args=train_args,
        train_dataset=train,
        data_collator=collate_causal_lm,
        train_batch_sampler=sampler,
        data_identity=identity,
        allow_data_change=data_args.allow_data_change,
        balance_sync_group_size=model_args.balance_sync_group_size,
        bias_update=model_args.aux_free_update,
        **trainer_options(model_args),
    )
    for callback in callbacks or []:
        trainer.add_callback(callback)
    if model_args.switch_scope_at is not None:
        trainer.add_callback(SwitchScopeCallback(model, model_args.switch_scope_at, model_args.switch_scope_to))
    trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
    out_dir = Path(train_args.output_dir)
    trainer.save_model(str(out_dir))
    _settle_distributed(trainer)  # what follows runs on rank 0 alone
    if not trainer.is_world_process_zero():
        return {}
    trained = trainer.model
    if distributed_config is not None or trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled():
        # the trained model is sharded over the ranks (a forward on this rank alone would wait for the others):
        # evaluate the saved folder here, loaded whole (outside ZeRO-3's partitioned init, whose collectives would
        # wait for the other ranks too)
        unset_hf_deepspeed_config()
        trained = load_trained(out_dir, **model_args.load_kwargs())
    analysis.write_json({"log_history": trainer.state.log_history}, out_dir / "log_history.json")
    (tokenizer.to_hf() if isinstance(tokenizer, ByteTokenizer) else tokenizer).save_pretrained(out_dir)
    write_data_info(out_dir / "data_info.json", data_args, data, train, train_args.world_size)
    balance = trainer.balancer.config  # the model's config, or the balancer's settings for a transformers MoE
    result = evaluate_and_analyze(trained, test, out_dir, data_args, f"{balance.balance_scope} balance")
    write_model_card(out_dir, model.config, result["eval"], result["specialization"], describe_data(data_args, train),
                     data=data_args.data, balance_config=balance, model=trained,
                     **origin(model_args, model.config))  # fmt: skip
    print(analysis.format_ppl_table(result["eval"]))
    print(f"specialization KL: {result['specialization']['specialization_kl']:.4f}   (files in {out_dir})")
    return result


def _settle_distributed(trainer: QwenMoeGBTrainer) -> None:
    """Let every rank finish training and saving, and let gloo's worker threads go idle, before the trainer (and the
    DDP wrapper holding the process group) is dropped. gloo frees a finished collective's tensors on its worker thread
    after the caller has returned, and needs the GIL for that; a rank that drops the last reference to the group
    meanwhile joins that thread holding the GIL and hangs (or, at interpreter exit, aborts), failing the launch. A
    barrier, then a pause that releases the GIL to the worker thread. The process group stays (the caller owns it;
    the CLI destroys it at exit)."""
    if not torch.distributed.is_initialized():
        return
    trainer.accelerator.wait_for_everyone()
    time.sleep(0.1)


def _num_experts(model_args: ModelArguments) -> int:
    """`num_experts` of the model to build, read from its config alone (before anything is loaded)."""
    if model_args.upcycle_from:
        return model_args.num_experts or 1
    if model_args.model_name_or_path or model_args.model_config:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path or model_args.model_config)
        config = getattr(config, "text_config", None) or config
        names = ("num_experts", "num_local_experts", "n_routed_experts")
        return next((v for n in names if isinstance(v := getattr(config, n, None), int)), 1)
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    return model_args.num_experts or overrides.get("num_experts", load_preset(model_args.preset).num_experts)


__all__ = [
    "PRETRAIN_DEFAULTS",
    "DataArguments",
    "ModelArguments",
    "ParallelArguments",
    "RunArguments",
    "build_model",
    "evaluate_and_analyze",
    "load_trained",
    "trainer_options",
    "trains_as_qwenmoe_gb",
    "pretrain",
]
