"""Data-dependent decay (gated linear attention) and segment resets: every form against the
float64 reference (written with explicit span indicators, not cumulative sums), gradients
with respect to the gates, state carried across calls, validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import reference
from jattn.efficient.linear import LinearAttentionState, linear_attention
from tests.conftest import normalised_error

FORMS = ["parallel", "recurrent", "chunked", "pallas"]  # "pallas": the kernel, interpreted
B, T, N, K, H, HV = 2, 13, 4, 2, 3, 5
CHUNK = 4  # 13 is not a multiple; documents cross chunk borders


def _rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _case():
    rng = np.random.default_rng(3)
    q, k, v = _rand(0, B, T, N, H), _rand(1, B, T, K, H), _rand(2, B, T, K, HV)
    log_decay = -jnp.asarray(rng.random((B, T, N))) * 0.7
    segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3],
                            [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7]], jnp.int32)
    state = LinearAttentionState(jnp.asarray(rng.random((B, N, H, HV))),
                                 jnp.asarray(rng.random((B, N, H))))
    return q, k, v, log_decay, segments, state


@pytest.mark.parametrize("with_segments", [False, True])
def test_every_form_matches_the_reference(with_segments):
    with jax.enable_x64(True):
        q, k, v, log_decay, segments, state = _case()
        kwargs = dict(is_causal=True, decay=jnp.asarray([0.9, 1.0, 0.8, 0.95]),
                      log_decay=log_decay, segment_ids=segments if with_segments else None,
                      initial_state=state, return_state=True)
        want, (kv, z) = jax.jit(functools.partial(reference.linear_attention, **kwargs))(
            q, k, v)
        for form in FORMS:
            got, got_state = linear_attention(q, k, v, form=form, chunk_size=CHUNK, **kwargs)
            assert normalised_error(got, want) < 1e-12, form
            assert normalised_error(got_state.kv, kv) < 1e-12, form
            assert normalised_error(got_state.k_sum, z) < 1e-12, form


def test_segments_isolate_documents():
    """Each document alone (no state) equals its slice of the packed call: nothing crosses a
    boundary, in either direction."""
    with jax.enable_x64(True):
        q, k, v, log_decay, segments, _ = _case()
        packed = linear_attention(q, k, v, is_causal=True, log_decay=log_decay,
                                  segment_ids=segments, chunk_size=CHUNK)
        for start, stop in [(0, 3), (3, 8), (8, 9), (9, 13)]:
            alone = linear_attention(q[:1, start:stop], k[:1, start:stop], v[:1, start:stop],
                                     is_causal=True, log_decay=log_decay[:1, start:stop])
            assert normalised_error(packed[:1, start:stop], alone) < 1e-12, (start, stop)


def test_gradients_with_respect_to_the_gates_match_the_reference():
    with jax.enable_x64(True):
        q, k, v, log_decay, segments, state = _case()
        ct = _rand(20, B, T, N, HV)
        ct_kv = _rand(21, *state.kv.shape)

        def loss(fn, q, k, v, log_decay, kv0, **kw):
            out, (kv, z) = fn(q, k, v, is_causal=True, log_decay=log_decay,
                              segment_ids=segments,
                              initial_state=LinearAttentionState(kv0, state.k_sum),
                              return_state=True, **kw)
            return (out * ct).sum() + (kv * ct_kv).sum() + z.sum()

        args = (q, k, v, log_decay, state.kv)
        argnums = tuple(range(5))
        want = jax.jit(jax.grad(functools.partial(loss, reference.linear_attention),
                                argnums))(*args)
        for form in FORMS:
            got = jax.jit(jax.grad(functools.partial(loss, linear_attention, form=form,
                                                     chunk_size=CHUNK), argnums))(*args)
            for name, g, w in zip(["q", "k", "v", "log_decay", "kv0"], got, want,
                                  strict=True):
                assert normalised_error(g, w) < 1e-11, (form, name)


@pytest.mark.parametrize("form", ["chunked", "pallas"])
def test_state_carried_across_two_calls_equals_one_call(form):
    with jax.enable_x64(True):
        q, k, v, log_decay, segments, _ = _case()
        kw = dict(is_causal=True, chunk_size=CHUNK, return_state=True, form=form)
        whole, whole_state = linear_attention(q, k, v, log_decay=log_decay,
                                              segment_ids=segments, **kw)
        cut = 6  # inside a document of both rows
        first, state = linear_attention(q[:, :cut], k[:, :cut], v[:, :cut],
                                        log_decay=log_decay[:, :cut],
                                        segment_ids=segments[:, :cut], **kw)
        second, state = linear_attention(q[:, cut:], k[:, cut:], v[:, cut:],
                                         log_decay=log_decay[:, cut:],
                                         segment_ids=segments[:, cut:], initial_state=state,
                                         **kw)
        assert normalised_error(jnp.concatenate([first, second], 1), whole) < 1e-12
        assert normalised_error(state.kv, whole_state.kv) < 1e-12


def test_validation():
    q, k, v, log_decay, segments, _ = _case()
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, log_decay=log_decay)  # not causal
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, is_causal=True, log_decay=-log_decay + 0.1)
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, is_causal=True, log_decay=log_decay[:, :3])
    with pytest.raises(ValueError, match="segment_ids"):
        linear_attention(q, k, v, segment_ids=segments)
    with pytest.raises(TypeError, match="segment_ids"):
        linear_attention(q, k, v, is_causal=True, segment_ids=segments.astype(jnp.float32))


@pytest.mark.parametrize("feature_map", ["elu+1", "taylor", "favor+"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_the_chunked_form(feature_map, dtype):
    """The lightning kernel (interpreted) against the chunked form on the same low-precision
    inputs, with a constant decay and no extras: the plain Lightning Attention case."""
    q, k, v = (x.astype(dtype) for x in _case()[:3])
    kw = dict(feature_map=feature_map, is_causal=True, decay=jnp.asarray([0.9, 1.0, 0.8, 0.95]),
              chunk_size=CHUNK, rng=jax.random.key(0) if feature_map == "favor+" else None)
    got = linear_attention(q, k, v, form="pallas", **kw)
    want = linear_attention(q, k, v, form="chunked", **kw)
    assert got.dtype == dtype
    assert normalised_error(got, want) < (1e-5 if dtype == jnp.float32 else 1e-2)


def test_kernel_interface_rejects_bad_input():
    from pallas_kernels.linear.lightning import lightning_attention

    B_, T_, K_, G_, F_, V_ = 1, 8, 2, 2, 3, 4
    z = jnp.zeros
    good = dict(q_features=z((B_, T_, K_, G_, F_)), k_features=z((B_, T_, K_, F_)),
                value=z((B_, T_, K_, V_)), initial_state=z((B_, K_, G_, F_, V_)),
                log_factor=z((B_, T_, K_, G_)))
    with pytest.raises(ValueError, match="k_features"):
        lightning_attention(**{**good, "k_features": z((B_, T_, K_, F_ + 1))}, interpret=True)
    with pytest.raises(ValueError, match="log_factor"):
        lightning_attention(**{**good, "log_factor": z((B_, T_, K_))}, interpret=True)
    with pytest.raises(TypeError, match="value"):
        lightning_attention(**{**good, "value": z((B_, T_, K_, V_), jnp.bfloat16)},
                            interpret=True)
    with pytest.raises(TypeError, match="document"):
        lightning_attention(**good, document=z((B_, T_)), interpret=True)
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attention(**good, chunk_size=0, interpret=True)
