"""The random-features lens (P63): the layer and baselines against NumPy loops written from
the definitions, ridge against the normal equations, and the checks CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import rf_lens


def _inputs(seed, n=5, N=4, d=3, M=2, mean=0.0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (rf_lens.sphere(k[0], (n,), d, dtype=jnp.float64),
            rf_lens.sphere(k[1], (n, N), d, dtype=jnp.float64),
            rf_lens.sample_query_key(k[2], M, d, mean=mean, dtype=jnp.float64))


def _features_loop(query, keys, W, normalize):
    query, keys, W = map(np.asarray, (query, keys, W))
    n, N, d = keys.shape
    out = np.zeros((n, W.shape[0], d + 1))
    for b in range(n):
        for m in range(W.shape[0]):
            scores = np.array([query[b] @ W[m] @ keys[b, i] for i in range(N)])
            weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum() \
                if normalize else np.exp(scores) / N
            for i in range(N):
                out[b, m] += weights[i] * np.append(keys[b, i], 1.0)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_features_match_the_definition(normalize):
    with jax.enable_x64(True):
        query, keys, W = _inputs(0, mean=2.0)
        got = rf_lens.frozen_qk_features(query, keys, W, normalize=normalize)
        np.testing.assert_allclose(got, _features_loop(query, keys, W, normalize), rtol=1e-12)


def test_attention_is_linear_in_values_and_permutation_invariant():
    with jax.enable_x64(True):
        query, keys, W = _inputs(1)
        values = jax.random.normal(jax.random.key(2), (2, 4), jnp.float64)
        out = jax.jit(rf_lens.frozen_qk_attention)(query, keys, W, values)
        want = np.einsum("bmc,mc->b", _features_loop(query, keys, W, False), values)
        np.testing.assert_allclose(out, want, rtol=1e-12)
        grad = jax.grad(lambda v: rf_lens.frozen_qk_attention(query[0], keys[0], W, v))(values)
        np.testing.assert_allclose(grad, _features_loop(query, keys, W, False)[0], rtol=1e-12)
        perm = np.array([2, 0, 3, 1])
        np.testing.assert_allclose(rf_lens.frozen_qk_attention(query, keys[:, perm], W, values),
                                   out, rtol=1e-12)
        per_row = jax.vmap(rf_lens.frozen_qk_attention, (0, 0, None, None))(query, keys, W,
                                                                            values)
        np.testing.assert_allclose(per_row, out, rtol=1e-12)


def test_mlp_features_and_targets_match_numpy():
    with jax.enable_x64(True):
        query, keys, _ = _inputs(3, N=3, d=4)
        A = rf_lens.sample_mlp_weights(jax.random.key(4), 16, 7, dtype=jnp.float64)
        flat = np.concatenate([np.asarray(query), np.asarray(keys).reshape(5, -1)], 1)
        np.testing.assert_allclose(rf_lens.mlp_random_features(query, keys, A),
                                   np.maximum(flat @ np.asarray(A), 0), rtol=1e-12)
        dots = np.einsum("bd,bnd->bn", query, keys)
        np.testing.assert_allclose(rf_lens.cubic(query, keys),
                                   np.mean((2.0 * dots) ** 3, 1), rtol=1e-12)
        np.testing.assert_allclose(rf_lens.expsim(query, keys), np.mean(np.exp(3 * dots), 1),
                                   rtol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(keys, axis=-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("n,p", [(40, 7), (12, 30)])  # the primal and the dual branch
def test_ridge_matches_the_normal_equations(n, p):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        phi, y = rng.normal(size=(n, p)), rng.normal(size=n)
        lambdas = (1e-3, 1e-1, 10.0)
        fit = jax.jit(rf_lens.ridge_fit, static_argnames=("lambdas",))(phi, y, lambdas=lambdas)

        def solve(phi, y, lam):
            scale = (phi**2).sum() / len(phi)
            return np.linalg.solve(phi.T @ phi + lam * scale * np.eye(p), phi.T @ y)

        n_val = round(0.2 * n)
        val = [np.mean((phi[-n_val:] @ solve(phi[:-n_val], y[:-n_val], lam) - y[-n_val:]) ** 2)
               for lam in lambdas]
        np.testing.assert_allclose(fit.val_mse, val, rtol=1e-8)
        best = lambdas[int(np.argmin(val))]
        assert float(fit.lam) == best
        np.testing.assert_allclose(fit.coef, solve(phi, y, best), rtol=1e-8, atol=1e-10)


def test_bad_inputs_name_the_argument():
    q, k = jnp.ones(3), jnp.ones((4, 3))
    with pytest.raises(ValueError, match="query_key"):
        rf_lens.frozen_qk_features(q, k, jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="query"):
        rf_lens.frozen_qk_features(jnp.ones(2), k, jnp.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="values"):
        rf_lens.frozen_qk_attention(q, k, jnp.ones((2, 3, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="weights"):
        rf_lens.mlp_random_features(q, k, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="targets"):
        rf_lens.ridge_fit(jnp.ones((4, 2)), jnp.ones(5))
    with pytest.raises(ValueError, match="val_fraction"):
        rf_lens.ridge_fit(jnp.ones((4, 2)), jnp.ones(4), val_fraction=1.0)


@pytest.mark.slow
def test_checks_quick_preset_pass(tmp_path, capsys):
    """The quick preset of the checks CLI: every check passes, files are written."""
    from experiments.random_features.__main__ import main

    assert main(["--preset", "quick"]) == 2  # --check is required
    assert main(["--check", "--preset", "quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("PASS") == 7 and "FAIL" not in printed
    summary = (tmp_path / "summary.md").read_text()
    assert "protocol is ours" in summary and summary.count("| PASS |") == 7
    results = json.loads((tmp_path / "results.json").read_text())
    curves = results["data"]["curves"]
    assert len(curves["rf-mlp"]) == len(results["config"]["curve_sizes"])
    for name in ("learning_curves", "error_vs_keys", "bias", "ridge_peak", "heads"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0


def test_checks_are_reproducible():
    """Fixed seeds: the same config gives the same numbers twice in one process."""
    from experiments.random_features.checks import CheckConfig, check_bias

    config = CheckConfig(num_heads=10, num_test=100, bias_n=60)
    with jax.enable_x64(True):
        first, second = check_bias(config), check_bias(config)
    assert first == second

