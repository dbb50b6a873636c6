"""Attention rollout (P18 DCAL): the product of the residual-mixed maps written out in NumPy,
the float64 reference forward and backward, causal maps staying causal, errors."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jattn import reference
from jattn.analysis.rollout import attention_rollout
from tests.conftest import attention_maps, check_against_reference


def test_rollout_is_the_product_of_mixed_maps():
    maps = attention_maps()
    got = attention_rollout(maps)
    want = np.eye(6)[None].repeat(2, 0)
    for a in np.asarray(maps, np.float64):
        mixed = (a.mean(1) + np.eye(6)) / 2
        mixed /= mixed.sum(-1, keepdims=True)
        want = mixed @ want
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(attention_rollout(list(maps)), got, rtol=1e-6)
    causal = attention_rollout(attention_maps(is_causal=True))
    assert np.all(np.triu(np.asarray(causal)[0], 1) == 0)


@pytest.mark.parametrize("residual,reduction", [(0.2, "max")])
def test_rollout_matches_reference(residual, reduction):
    maps = attention_maps(L=2)
    maps = maps.at[:, 0, :, 2].set(0.0)  # a masked query: a row of zeros
    fn = functools.partial(attention_rollout, residual=residual, head_reduction=reduction)
    ref = functools.partial(reference.attention_rollout, residual=residual,
                            head_reduction=reduction)
    check_against_reference(fn, ref, (maps,))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="residual"):
        attention_rollout(attention_maps(), residual=1.5)
    with pytest.raises(ValueError, match="head_reduction"):
        attention_rollout(attention_maps(), head_reduction="sum")
    with pytest.raises(ValueError, match="attention_maps"):
        attention_rollout(jnp.ones((2, 1, 1, 3, 4)))
    with pytest.raises(ValueError, match="attention_maps"):
        attention_rollout([])
