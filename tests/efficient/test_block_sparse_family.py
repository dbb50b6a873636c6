"""The routed and retrieval methods on every implementation of the one softmax path: each
against its float64 reference (forward and gradients), on "xla", chunked tiles much
smaller than the sequence, and both Pallas kernels in interpret mode; lengths that are not
a multiple of any block."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

import jattn
from jattn import reference
from tests.conftest import as_implementation, check_against_reference, qkv

T = 37  # not a multiple of the blocks (8) nor of the tiles
# Every method on "xla" and the chunked path; each Pallas kernel (interpreted, slow on a CPU)
# on one routed and one retrieval-by-head method.
CASES = [(m, i) for m in ("bilevel", "bilevel_causal", "longheads")
         for i in ("xla", "chunked_small_blocks")] + [
    ("bilevel_causal", "pallas_tpu_small_blocks"), ("longheads", "pallas_gpu_small_blocks")]

METHODS = {
    "bilevel": (jattn.bilevel_routing_attention, reference.bilevel_routing_attention,
                {"region_size": 8, "top_k": 2}),
    "bilevel_causal": (jattn.bilevel_routing_attention, reference.bilevel_routing_attention,
                       {"region_size": 8, "top_k": 3, "is_causal": True}),
    "longheads": (jattn.longheads_attention, reference.longheads_attention,
                  {"chunk_size": 8, "top_k": 3}),
}


@pytest.mark.parametrize("method,implementation", CASES)
def test_against_the_reference(method, implementation):
    fn, ref, options = METHODS[method]
    q, k, v = qkv(B=2, T=T, S=T, N=4, K=2, H=8, Hv=8)
    check_against_reference(
        functools.partial(fn, implementation=as_implementation(implementation), **options),
        functools.partial(ref, **options), (q, k, v),
        dtype=jnp.float64 if implementation == "xla" else jnp.float32)


# Landmark's retrieved logits carry a score_mod, which the Pallas kernels do not take yet.
@pytest.mark.parametrize("implementation", ["xla", "chunked_small_blocks"])
@pytest.mark.parametrize("is_causal", [True, False])
def test_landmark_against_the_reference(implementation, is_causal):
    q, k, v = qkv(B=2, T=T, S=T, N=4, K=2, H=8, Hv=8)
    landmarks = jattn.mean_landmark_keys(k, 8) + 0.5
    options = {"block_size": 8, "top_k": 2, "is_causal": is_causal}
    check_against_reference(
        functools.partial(jattn.landmark_attention,
                          implementation=as_implementation(implementation), **options),
        functools.partial(reference.landmark_attention, **options), (q, k, v, landmarks),
        dtype=jnp.float64 if implementation == "xla" else jnp.float32)
