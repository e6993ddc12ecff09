"""Triton kernels, one module per op (the launchers live in ``dcgen_kernels.ops``)."""
