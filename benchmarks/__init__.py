"""Benchmarks for dcgen_kernels; the entry point is `python -m benchmarks.run` (see run.py)."""
