"""QwenMoE-GB: Mixture-of-Experts language models for transformers with global-batch load balancing."""

from setuptools import setup

setup(
    name="qwenmoe-gb",
    version="0.1.0",
    description="Hugging Face Transformers MoE models trained with global-batch load balancing (Qiu et al. 2025)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "modeling_qwenmoe_gb",
        "modeling_qwenmoe_gb.data",
        "modeling_qwenmoe_gb.configuration",
        "modeling_qwenmoe_gb.model_cards",
    ],
    package_dir={
        "modeling_qwenmoe_gb.configuration": "configuration",
        "modeling_qwenmoe_gb.model_cards": "model_cards",
    },
    package_data={
        "modeling_qwenmoe_gb.configuration": ["*.json", "accelerate/*.yaml", "accelerate/*.json", "stock/*.json"],
        "modeling_qwenmoe_gb": ["metrics/*/*.py"],
        "modeling_qwenmoe_gb.model_cards": ["*.md"],
    },
    install_requires=[
        "torch>=2.6",
        # 5.23: the first with transformers' whole native parallel engine (DistributedConfig's dp_replicate_size and
        # ep_implementation); 5.24 renamed the KV-cache argument, both are supported (CI tests the floor and the newest)
        "transformers>=5.23,<6",
        "accelerate>=1.10",
        "datasets>=3.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "evaluate>=0.4",
        "matplotlib>=3.7",
        "tqdm",
        "numpy>=1.24",
        "pyarrow>=15",  # parquet sources
        "zstandard>=0.22",  # .jsonl.zst sources
        "filelock>=3.12",  # one preparer per data folder
    ],
    extras_require={
        "sft": ["trl>=1.0", "peft>=0.17"],
        "rl": ["trl>=1.16"],
        "lm-eval": ["lm_eval>=0.4.13"],
        "deepspeed": ["deepspeed>=0.17"],
        # deepspeed: the ZeRO-2/3 tests run it on 2 CPU processes (its CPU accelerator, gloo); megatron-core and
        # datatrove: the data tests write and read their token files with their own code; scipy: the LP reference
        # of the Quantile Balancing tests
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "tensorboard>=2.15",
            "trl>=1.16",
            "peft>=0.17",
            "deepspeed>=0.17",
            "megatron-core>=0.16.1",
            "datatrove>=0.10",
            "scipy>=1.11",
            # the docs site (make docs), its Python examples under pytest and the browser check (make docs-check)
            "mkdocs-material>=9.6",
            "mkdocstrings-python>=1.16",
            "sybil>=9",
            "playwright>=1.50",
        ],
    },
    entry_points={"console_scripts": ["qwenmoe-gb=modeling_qwenmoe_gb.cli:main"]},
)
