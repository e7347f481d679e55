"""Benchmark entry point: `python scripts/benchmark.py --help` (see modeling_qwenmoe_gb/benchmark.py)."""

from modeling_qwenmoe_gb.benchmark import main

if __name__ == "__main__":
    main()
