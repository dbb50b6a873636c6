"""Pallas kernels for GPU (Triton lowering) and TPU (Mosaic).

This package imports jax only, never jattn; jattn registers the kernels as implementations
(``jattn.core.kernels``). ``pallas_kernels.flash``: flash attention, fused forward and backward,
for GPUs (``gpu``) and TPUs (``tpu``), sharing ``common``. ``pallas_kernels.linear``: the
Lightning kernel of chunked causal linear attention (``jattn.linear_attention(form="pallas")``).
"""
