"""Attention through the random-features lens (P63): one multi-head attention layer whose
query-key matrices are random and frozen, with only the value vectors trained.

Not Peng et al.'s "Random Feature Attention" (random features approximating the softmax
kernel inside linear attention): here the randomness is in the heads' query-key matrices
and the layer is exact attention.

The layer takes a query x_0 [d] and keys x_1..x_N [N, d]; head m has a frozen W_m [d, d]:

    phi_m(x_0, X) = (1/N) sum_i exp(<x_0, W_m x_i>) [x_i; 1]         (normalize=False)
    phi_m(x_0, X) = sum_i softmax_i(<x_0, W_m x_i>) [x_i; 1]          (normalize=True)
    f(x_0, X)     = sum_m <v_m, phi_m(x_0, X)>                         v_m in R^(d+1)

f is linear in the M (d + 1) value parameters, so training them is ridge regression on the
features (``ridge_fit``). The baseline with as many trainable weights is a two-layer
random-feature network on the concatenated input (``mlp_random_features``). Targets are
permutation-invariant functions of the keys, ``pairwise_target(F)`` = (1/N) sum_i
F(<x_0, x_i>), on the unit sphere (``sphere``).

References:
    P63 Fu, Guo, Bai, Mei, "What can a Single Attention Layer Learn? A Study Through the
    Random Features Lens" (NeurIPS 2023).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.core.shapes import Array, check_floating, check_rank, check_shape

# Ridge penalties tried by ``ridge_fit``, in units of trace(K) / n (K = features features^T).
LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def sample_query_key(rng: Array, num_heads: int, dim: int, *, mean: float = 0.0,
                     dtype=jnp.float32) -> Array:
    """Frozen query-key matrices W_m = G_m + mean * I, G_m with i.i.d. N(0, 1) entries.

    Args:
        key: a JAX key.
        num_heads: M.
        dim: d.
        mean: c; c > 0 biases every head towards the similarity <x_0, x_i>.

    Returns:
        [M, d, d].

    >>> sample_query_key(jax.random.key(0), 3, 2, mean=2.0).shape
    (3, 2, 2)
    """
    if num_heads < 1 or dim < 1:
        raise ValueError(f"num_heads, dim: expected >= 1, got {num_heads}, {dim}")
    noise = jax.random.normal(rng, (num_heads, dim, dim), dtype)
    return noise + mean * jnp.eye(dim, dtype=dtype)


def _check_inputs(query: Array, keys: Array) -> None:
    check_floating("query", query)
    check_floating("keys", keys)
    if keys.ndim < 2:
        raise ValueError(f"keys: expected [..., N, d], got {keys.shape}")
    check_shape("query", query, keys.shape[:-2] + keys.shape[-1:], "...d")


def frozen_qk_features(query: Array, keys: Array, query_key: Array, *,
                       normalize: bool = False) -> Array:
    """phi_m = (1/N) sum_i exp(<x_0, W_m x_i>) [x_i; 1] per head (softmax weights with
    ``normalize``).

    Args:
        query: [..., d], x_0.
        keys: [..., N, d], x_1..x_N.
        query_key: [M, d, d], the frozen W_m.
        normalize: weigh the keys by a softmax over i instead of exp(.) / N.

    Returns:
        [..., M, d + 1] in the inputs' dtype.

    Raises:
        ValueError: shapes that do not fit together.

    >>> x0, keys = jnp.ones(2) / 2**0.5, jnp.eye(2)
    >>> frozen_qk_features(x0, keys, jnp.zeros((1, 2, 2)))  # exp(0) = 1: the mean of [x_i; 1]
    Array([[0.5, 0.5, 1. ]], dtype=float32)
    """
    _check_inputs(query, keys)
    d = query.shape[-1]
    check_rank("query_key", query_key, (3,), "[M, d, d]")
    check_shape("query_key", query_key, (query_key.shape[0], d, d), "Mdd")
    # <x_0, W_m x_i> = <W_m^T x_0, x_i>: one [M, d] product per query, then the keys.
    projected = jnp.einsum("...a,mab->...mb", query, query_key.astype(query.dtype))
    scores = jnp.einsum("...mb,...nb->...mn", projected, keys)
    if normalize:
        weights = jax.nn.softmax(scores, axis=-1)
    else:
        weights = jnp.exp(scores) / keys.shape[-2]
    augmented = jnp.concatenate([keys, jnp.ones((*keys.shape[:-1], 1), keys.dtype)], -1)
    return jnp.einsum("...mn,...nc->...mc", weights, augmented)


def frozen_qk_attention(query: Array, keys: Array, query_key: Array, values: Array, *,
                        normalize: bool = False) -> Array:
    """f(x_0, X) = sum_m <v_m, phi_m(x_0, X)>: the layer's output.

    Args:
        query, keys, query_key, normalize: as in :func:`frozen_qk_features`.
        values: [M, d + 1], the trained value vectors v_m.

    Returns:
        [...], one number per query.

    >>> x0, keys = jnp.ones(2) / 2**0.5, jnp.eye(2)
    >>> frozen_qk_attention(x0, keys, jnp.zeros((1, 2, 2)), jnp.array([[0.0, 0.0, 3.0]]))
    Array(3., dtype=float32)
    """
    features = frozen_qk_features(query, keys, query_key, normalize=normalize)
    check_shape("values", values, features.shape[-2:], "M(d+1)")
    return jnp.einsum("...mc,mc->...", features, values.astype(features.dtype))


def sample_mlp_weights(rng: Array, in_dim: int, width: int, *, dtype=jnp.float32) -> Array:
    """First-layer weights of the random-feature MLP: [in_dim, width], N(0, 1 / in_dim)."""
    if in_dim < 1 or width < 1:
        raise ValueError(f"in_dim, width: expected >= 1, got {in_dim}, {width}")
    return jax.random.normal(rng, (in_dim, width), dtype) / math.sqrt(in_dim)


def mlp_random_features(query: Array, keys: Array, weights: Array) -> Array:
    """ReLU random features of the concatenated input: relu([x_0, x_1, ..., x_N] @ weights).

    The baseline of P63: a two-layer network with a frozen random first layer; with width
    M (d + 1) it has as many trainable weights as the attention layer with M heads.

    Args:
        query: [..., d].
        keys: [..., N, d].
        weights: [(N + 1) d, width] from :func:`sample_mlp_weights`.

    Returns:
        [..., width].

    >>> mlp_random_features(jnp.ones(1), jnp.ones((1, 1)), jnp.array([[1.0, -1.0], [1.0, 0.0]]))
    Array([2., 0.], dtype=float32)
    """
    _check_inputs(query, keys)
    flat = jnp.concatenate([query, keys.reshape((*keys.shape[:-2], -1))], axis=-1)
    check_rank("weights", weights, (2,), "[(N + 1) d, width]")
    if weights.shape[0] != flat.shape[-1]:
        raise ValueError(f"weights: expected [(N + 1) d = {flat.shape[-1]}, width], "
                         f"got {weights.shape}")
    return jax.nn.relu(flat @ weights.astype(flat.dtype))


class RidgeFit(NamedTuple):
    """The result of :func:`ridge_fit`."""

    coef: Array  # [p], refitted on every row with the chosen penalty
    lam: Array  # [], the chosen penalty, in units of trace(K) / n
    val_mse: Array  # [len(lambdas)], validation error of each penalty (NaN without a split)


def _ridge_coefs(phi: Array, y: Array, penalties: Array) -> Array:
    """argmin_w |phi w - y|^2 + pen |w|^2 for each pen: [len(penalties), p].

    One eigendecomposition of the smaller Gram matrix serves every penalty.
    """
    n, p = phi.shape
    if p <= n:
        eig, vecs = jnp.linalg.eigh(phi.T @ phi)
        proj = vecs.T @ (phi.T @ y)
        eig = jnp.maximum(eig, 0.0)
        return (proj / (eig + penalties[:, None])) @ vecs.T
    eig, vecs = jnp.linalg.eigh(phi @ phi.T)
    proj = vecs.T @ y
    eig = jnp.maximum(eig, 0.0)
    return ((proj / (eig + penalties[:, None])) @ vecs.T) @ phi


def ridge_fit(features: Array, targets: Array, *, lambdas: Sequence[float] = LAMBDAS,
              val_fraction: float = 0.2) -> RidgeFit:
    """Ridge regression with the penalty chosen on a validation split, then refitted.

    Penalties are lam * trace(K) / n with K = features features^T (the mean squared row
    norm), so one grid suits features of any scale. The last ``val_fraction`` of the rows
    validate (rows are assumed exchangeable); the chosen penalty is refitted on every row.
    With one penalty or ``val_fraction=0`` there is no selection.

    Args:
        features: [n, p]; use float64 (``jax.enable_x64``) for small penalties.
        targets: [n].
        lambdas: the penalties to try, in units of trace(K) / n.
        val_fraction: share of the rows held out to choose the penalty.

    Returns:
        :class:`RidgeFit`.

    Raises:
        ValueError: mismatched shapes, an empty grid, a split leaving no rows on a side.

    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> ridge_fit(x, x @ jnp.array([1.0, -1.0]), lambdas=(1e-6,)).coef.round(3)
    Array([ 1., -1.], dtype=float32)
    """
    check_rank("features", features, (2,), "[n, p]")
    check_floating("features", features)
    n = features.shape[0]
    check_shape("targets", targets, (n,), "n")
    if not lambdas:
        raise ValueError("lambdas: expected at least one penalty")
    grid = jnp.asarray(lambdas, features.dtype)
    targets = targets.astype(features.dtype)

    def scale(phi):
        return jnp.sum(phi * phi) / phi.shape[0]

    n_val = round(n * val_fraction) if len(lambdas) > 1 else 0
    if n_val == 0:
        val_mse = jnp.full(grid.shape, jnp.nan, features.dtype)
        lam = grid[0]
    else:
        if not 0 < n_val < n:
            raise ValueError(f"val_fraction: {val_fraction} of n={n} rows leaves an empty side")
        phi_tr, y_tr = features[:-n_val], targets[:-n_val]
        coefs = _ridge_coefs(phi_tr, y_tr, grid * scale(phi_tr))
        val_mse = jnp.mean((features[-n_val:] @ coefs.T - targets[-n_val:, None]) ** 2, 0)
        lam = grid[jnp.argmin(val_mse)]
    coef = _ridge_coefs(features, targets, (lam * scale(features))[None])[0]
    return RidgeFit(coef, lam, val_mse)


def sphere(rng: Array, shape: Sequence[int], dim: int, *, dtype=jnp.float32) -> Array:
    """Points uniform on the unit sphere in R^dim: ``[*shape, dim]``."""
    x = jax.random.normal(rng, (*shape, dim), dtype)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def pairwise_target(fn: Callable[[Array], Array]) -> Callable[[Array, Array], Array]:
    """The target (x_0, X) -> (1/N) sum_i fn(<x_0, x_i>): [..., d], [..., N, d] -> [...]."""

    def target(query: Array, keys: Array) -> Array:
        _check_inputs(query, keys)
        return jnp.mean(fn(jnp.einsum("...d,...nd->...n", query, keys)), axis=-1)

    return target


def cubic(query: Array, keys: Array) -> Array:
    """(1/N) sum_i (sqrt(d) <x_0, x_i>)^3."""
    d = query.shape[-1]
    return pairwise_target(lambda t: (math.sqrt(d) * t) ** 3)(query, keys)


expsim = pairwise_target(lambda t: jnp.exp(3.0 * t))
expsim.__doc__ = "(1/N) sum_i exp(3 <x_0, x_i>)."
