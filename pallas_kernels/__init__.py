"""Pallas kernels for GPU (Triton lowering) and TPU (Mosaic).

This package imports jax only, never jattn; jattn registers the kernels as implementations.
It holds no kernels yet: the flash-attention kernels arrive with their own issue.
"""
