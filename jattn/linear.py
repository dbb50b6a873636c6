r"""Linear attention: kernelised attention with a running state instead of a softmax.

.. math::
    \mathrm{out}_t = \frac{\sum_{s \in A(t)} w_{ts}\, (\phi(q_t) \cdot \phi(k_s))\, v_s}
                          {\sum_{s \in A(t)} w_{ts}\, \phi(q_t) \cdot \phi(k_s) + \epsilon}
    = \frac{\phi(q_t)^\top S_t}{\phi(q_t)^\top z_t + \epsilon},
    \qquad S_t = \gamma S_{t-1} + \phi(k_t) v_t^\top,\quad z_t = \gamma z_{t-1} + \phi(k_t)

with A(t) = {s <= t} (causal) or every key (non-causal), w_ts = gamma^(t - s) (a per-head
decay, causal only; 1 without decay). Three ways to compute the causal case, which agree:

* ``"parallel"``: the quadratic form, (phi(Q) phi(K)^T ⊙ decay mask) V; O(T^2 F).
* ``"recurrent"``: one token at a time (``lax.scan``) carrying (S, z); O(T F Hv), sequential.
* ``"chunked"``: Lightning-attention style: within a chunk of C tokens the masked quadratic
  form, across chunks the state carried by a scan; O(T C (F + Hv) + T F Hv), T / C sequential
  steps. Lengths that are not a multiple of the chunk are padded and masked.

Everything is computed in float32 (float64 stays float64); the output has the input dtype and
the state stays in the compute dtype so that it can be carried across calls without loss.

References:
    P22 Lightning Attention (intra-chunk quadratic + inter-chunk recurrent state, per-head
    exponential decay); P24 Zoology (Based: linear attention with the second-order Taylor
    feature map, "Simple linear attention language models balance the recall-throughput
    tradeoff"); "Transformers are RNNs: Fast Autoregressive Transformers with Linear
    Attention" (the elu + 1 feature map and the recurrent form).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.typing import (
    Array,
    accumulation_dtype,
    check_floating,
    check_qkv,
    check_shape,
    is_concrete,
)

FeatureMap = Callable[[Array], Array]

FORMS = ("parallel", "recurrent", "chunked")


class LinearAttentionState(NamedTuple):
    """The running sums of linear attention after the last key (compute dtype, float32+).

    With decay gamma, key s of a sequence that ended at position e enters with weight
    gamma^(e - s); without decay, with weight 1.
    """

    kv: Array  # [B, N, F, Hv]  sum_s w_s phi(k_s) v_s^T
    k_sum: Array  # [B, N, F]   sum_s w_s phi(k_s), the normaliser

    @classmethod
    def zeros(cls, batch: int, num_heads: int, feature_size: int, value_dim: int,
              dtype=jnp.float32) -> LinearAttentionState:
        """The state before any key: zeros of the shapes above."""
        return cls(jnp.zeros((batch, num_heads, feature_size, value_dim), dtype),
                   jnp.zeros((batch, num_heads, feature_size), dtype))


def elu_plus_one(x: Array) -> Array:
    """phi(x) = elu(x) + 1 > 0, elementwise (feature size H)."""
    return jax.nn.elu(x) + 1


def taylor_feature_map(x: Array) -> Array:
    r"""Based's second-order Taylor feature map of the last axis (size d -> 1 + d + d^2).

    .. math::
        \phi(x) = \Big[1,\ \frac{x}{d^{1/4}},\ \frac{\mathrm{vec}(x x^\top)}{\sqrt{2}\sqrt{d}}
        \Big], \qquad \phi(x) \cdot \phi(y) = 1 + \frac{x \cdot y}{\sqrt d}
        + \frac{(x \cdot y)^2}{2 d} \approx \exp\Big(\frac{x \cdot y}{\sqrt d}\Big)

    The inner product is always positive (it is ((a + 1)^2 + 1) / 2 with a = x.y / sqrt(d)).

    Args:
        x: [..., d].

    Returns:
        [..., 1 + d + d^2] in x's dtype.

    >>> import jax.numpy as jnp
    >>> x, y = jnp.array([1.0, 2.0, 0.0, 1.0]), jnp.array([0.5, -1.0, 2.0, 1.0])  # x.y = -1/2
    >>> taylor_feature_map(x).shape, float(taylor_feature_map(x) @ taylor_feature_map(y))
    ((21,), 0.78125)

    References:
        P24 Zoology / Based, "Simple linear attention language models balance the
        recall-throughput tradeoff".
    """
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return jnp.concatenate(
        [jnp.ones_like(x[..., :1]), x / d ** 0.25, outer / math.sqrt(2 * d)], axis=-1)


FEATURE_MAPS: dict[str, FeatureMap] = {
    "identity": lambda x: x,
    "elu+1": elu_plus_one,
    "relu": jax.nn.relu,
    "taylor": taylor_feature_map,
}


def resolve_feature_map(feature_map: str | FeatureMap) -> FeatureMap:
    """The function behind a feature-map name (a callable is returned as is).

    Raises:
        ValueError: an unknown name (the message lists the supported ones).
        TypeError: neither a name nor a callable.
    """
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {', '.join(FEATURE_MAPS)} or a "
                             f"callable, got {feature_map!r}")
        return FEATURE_MAPS[feature_map]
    if callable(feature_map):
        return feature_map
    raise TypeError(f"feature_map: expected a name or a callable, got "
                    f"{type(feature_map).__name__}")


def feature_size(feature_map: str | FeatureMap, head_dim: int) -> int:
    """F, the size of phi(x) for x of size ``head_dim`` (H for the elementwise maps,
    1 + H + H^2 for "taylor").

    >>> feature_size("taylor", 8)
    73
    """
    phi = resolve_feature_map(feature_map)
    return int(jax.eval_shape(phi, jax.ShapeDtypeStruct((head_dim,), jnp.float32)).shape[-1])


def linear_attention(query, key, value, *, feature_map: str | FeatureMap = "elu+1",
                     is_causal: bool = False, decay=None, normalize: bool = True,
                     eps: float = 1e-6, form: str = "chunked", chunk_size: int = 64,
                     initial_state: LinearAttentionState | None = None,
                     return_state: bool = False):
    r"""Linear attention out = phi(q) S / (phi(q) z + eps), causal or not, with optional decay.

    .. math::
        \mathrm{num}_t = \sum_{s \in A(t)} \gamma^{t-s} (\phi(q_t) \cdot \phi(k_s))\, v_s
            + \gamma^{t+1} \phi(q_t)^\top S_0, \qquad
        \mathrm{den}_t = \sum_{s \in A(t)} \gamma^{t-s}\, \phi(q_t) \cdot \phi(k_s)
            + \gamma^{t+1} \phi(q_t)^\top z_0

    and out_t = num_t / (den_t + eps) (``normalize``) or num_t. A(t) = {s <= t} when causal,
    every key otherwise (then gamma = 1). (S_0, z_0) is ``initial_state``: the sums of the
    keys before position 0, as returned by a previous call, so a sequence can be processed in
    pieces. Computed in float32 or wider whatever the input dtype.

    Args:
        query: [B, T, N, H].
        key: [B, S, K, H]; N % K == 0 gives GQA/MQA without repeating K/V.
        value: [B, S, K, Hv].
        feature_map: "identity", "elu+1", "relu", "taylor" (Based's 1 + d + d^2 features,
            :func:`taylor_feature_map`) or a callable [..., H] -> [..., F] applied to the last
            axis (any leading shape) of queries and keys.
        is_causal: query t sees keys s <= t (then S == T). Otherwise every query sees every
            key.
        decay: per-query-head factors gamma in (0, 1], [N] (causal only): key s reaches query
            t with weight gamma^(t - s). May be traced (learned).
        normalize: divide by phi(q_t) . sum of phi(k_s) (+ eps); False returns the numerator.
        eps: added to the denominator, a Python float >= 0.
        form: "parallel", "recurrent" or "chunked" (see the module docstring); the same result
            up to rounding. Non-causal attention has a single (global-sum) form.
        chunk_size: chunk length of the "chunked" form (clipped to T); any T is accepted.
        initial_state: a :class:`LinearAttentionState` (kv [B, N, F, Hv], k_sum [B, N, F]).
        return_state: also return the state after the last key.

    Returns:
        output [B, T, N, Hv] in the input dtype; with ``return_state`` the pair (output,
        state), the state in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: non-floating or mismatched q/k/v dtypes, a non-floating decay or state, a
            feature map that is neither a name nor a callable.
        ValueError: wrong ranks or shapes, heads that do not divide, S != T when causal, an
            unknown feature map or form, decay without ``is_causal`` or outside (0, 1], a
            non-positive chunk size, a negative eps.

    Example:
        >>> import jax, jax.numpy as jnp, jattn
        >>> q = jax.random.normal(jax.random.key(0), (2, 10, 4, 8))
        >>> kv = jax.random.normal(jax.random.key(1), (2, 10, 2, 8))
        >>> out, state = jattn.linear_attention(q, kv, kv, feature_map="taylor",
        ...                                     is_causal=True, return_state=True)
        >>> out.shape, state.kv.shape, state.k_sum.shape
        ((2, 10, 4, 8), (2, 4, 73, 8), (2, 4, 73))

    References:
        P22 Lightning Attention (chunked form, per-head decay); P24 Zoology (Based's Taylor
        feature map); "Transformers are RNNs: Fast Autoregressive Transformers with Linear
        Attention" (elu + 1, the recurrent form).
    """
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    B, T, N, H, S, K, Hv = check_qkv(query, key, value)
    if is_causal and S != T:
        raise ValueError(f"key: causal linear attention needs S == T, got query "
                         f"{query.shape} and key {key.shape}")
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if eps < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    phi = resolve_feature_map(feature_map)
    dtype = accumulation_dtype(query.dtype)
    F = _checked_feature_size(phi, query, key, dtype)
    G = N // K

    if decay is None:
        log_decay = jnp.zeros((K, G), dtype)
    else:
        if not is_causal:
            raise ValueError("decay: only defined for causal attention (is_causal=True)")
        decay = jnp.asarray(decay)
        check_floating("decay", decay)
        check_shape("decay", decay, (N,), "N")
        if is_concrete(decay):
            values = np.asarray(decay, np.float64)
            if not ((values > 0) & (values <= 1)).all():
                raise ValueError(f"decay: expected values in (0, 1], got min {values.min()} "
                                 f"max {values.max()}")
        log_decay = jnp.log(decay.astype(dtype)).reshape(K, G)

    if initial_state is None:
        kv0 = jnp.zeros((B, K, G, F, Hv), dtype)
        z0 = jnp.zeros((B, K, G, F), dtype)
    else:
        if not isinstance(initial_state, tuple) or len(initial_state) != 2:
            raise TypeError(f"initial_state: expected a LinearAttentionState (kv, k_sum), got "
                            f"{type(initial_state).__name__}")
        kv0, z0 = (jnp.asarray(x) for x in initial_state)
        check_floating("initial_state.kv", kv0)
        check_floating("initial_state.k_sum", z0)
        check_shape("initial_state.kv", kv0, (B, N, F, Hv), ["B", "N", "F", "Hv"])
        check_shape("initial_state.k_sum", z0, (B, N, F), "BNF")
        kv0 = kv0.astype(dtype).reshape(B, K, G, F, Hv)
        z0 = z0.astype(dtype).reshape(B, K, G, F)

    q = query.astype(dtype).reshape(B, T, K, G, H)
    # Options that change nothing map to one value, so that equivalent calls share a compile.
    if not is_causal:
        form = "global"
    chunk_size = max(1, min(chunk_size, T)) if form == "chunked" else 0
    # Named maps go through the compiled cache; a user's callable (maybe unhashable, maybe a
    # new closure each call) is traced in place.
    compute = _compute_jit if isinstance(feature_map, str) else _compute
    out, (kv, z) = compute(q, key.astype(dtype), value.astype(dtype), kv0, z0, log_decay,
                           phi=phi, normalize=normalize, eps=float(eps), form=form,
                           chunk_size=chunk_size)
    out = out.reshape(B, T, N, Hv).astype(query.dtype)
    if return_state:
        return out, LinearAttentionState(kv.reshape(B, N, F, Hv), z.reshape(B, N, F))
    return out


def _checked_feature_size(phi: FeatureMap, query: Array, key: Array, dtype) -> int:
    """F from the (abstract) feature maps of query and key; both must keep the leading axes."""
    sizes = []
    for name, x in (("query", query), ("key", key)):
        shape = jax.eval_shape(phi, jax.ShapeDtypeStruct(x.shape, dtype)).shape
        if len(shape) != x.ndim or tuple(shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(f"feature_map: must map the last axis only; {name} {x.shape} "
                             f"became {tuple(shape)}")
        sizes.append(shape[-1])
    if sizes[0] != sizes[1]:
        raise ValueError(f"feature_map: query and key features differ in size, {sizes[0]} vs "
                         f"{sizes[1]}")
    return int(sizes[0])


def _compute(q, k, v, kv0, z0, log_decay, *, phi, normalize, eps, form, chunk_size):
    if form == "global":  # non-causal
        return _global(phi, q, k, v, kv0, z0, normalize, eps)
    if form == "parallel":
        return _parallel(phi, q, k, v, kv0, z0, log_decay, normalize, eps)
    if form == "recurrent":
        return _recurrent(phi, q, k, v, kv0, z0, log_decay, normalize, eps)
    return _chunked(phi, q, k, v, kv0, z0, log_decay, normalize, eps, chunk_size)


# Compiled once per shape and option set, so that eager callers (notebooks, tests) do not
# retrace and recompile the scans on every call; inside an outer jit it is inlined.
_compute_jit = jax.jit(_compute, static_argnames=("phi", "normalize", "eps", "form",
                                                  "chunk_size"))


def _divide(num: Array, den: Array, normalize: bool, eps: float, valid=None) -> Array:
    """num / (den + eps); rows marked invalid (padding) divide by 1 so they stay finite."""
    if not normalize:
        return num
    den = den + eps
    if valid is not None:
        den = jnp.where(valid, den, 1)
    return num / den[..., None]


# Shapes inside: q [B, T, K, G, H], k [B, S, K, H], v [B, S, K, Hv], state kv [B, K, G, F, Hv],
# z [B, K, G, F], log_decay [K, G]. Query head n is (n // G, n % G), as jnp.repeat would map it.


def _global(phi, q, k, v, kv0, z0, normalize, eps):
    pk = phi(k)
    kv = kv0 + jnp.einsum("bskf,bskv->bkfv", pk, v)[:, :, None]
    z = z0 + pk.sum(1)[:, :, None]
    pq = phi(q)
    num = jnp.einsum("btkgf,bkgfv->btkgv", pq, kv)
    den = jnp.einsum("btkgf,bkgf->btkg", pq, z)
    return _divide(num, den, normalize, eps), (kv, z)


def _decay_mask(log_decay: Array, length: int) -> Array:
    """[K, G, length, length]: gamma^(i - j) where j <= i, else 0 (no inf * 0 anywhere)."""
    lag = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
    causal = lag >= 0
    powers = jnp.exp(jnp.where(causal, lag, 0) * log_decay[..., None, None])
    return jnp.where(causal, powers, 0)


def _parallel(phi, q, k, v, kv0, z0, log_decay, normalize, eps):
    T = q.shape[1]
    pq, pk = phi(q), phi(k)
    scores = jnp.einsum("btkgf,bskf->bkgts", pq, pk) * _decay_mask(log_decay, T)
    num = jnp.einsum("bkgts,bskv->btkgv", scores, v)
    den = jnp.einsum("bkgts->btkg", scores)
    t = jnp.arange(T)
    from_state = jnp.exp((t + 1)[:, None, None] * log_decay)  # [T, K, G]: gamma^(t+1)
    num = num + jnp.einsum("btkgf,bkgfv->btkgv", pq, kv0) * from_state[..., None]
    den = den + jnp.einsum("btkgf,bkgf->btkg", pq, z0) * from_state
    to_state = jnp.exp((T - 1 - t)[:, None, None] * log_decay)  # gamma^(T-1-s)
    carried = jnp.exp(T * log_decay)
    kv = carried[..., None, None] * kv0 + jnp.einsum("bskf,skg,bskv->bkgfv", pk, to_state, v)
    z = carried[..., None] * z0 + jnp.einsum("bskf,skg->bkgf", pk, to_state)
    return _divide(num, den, normalize, eps), (kv, z)


def _recurrent(phi, q, k, v, kv0, z0, log_decay, normalize, eps):
    gamma = jnp.exp(log_decay)

    def step(carry, inputs):
        kv, z = carry
        q_t, k_t, v_t = inputs  # [B, K, G, H], [B, K, H], [B, K, Hv]
        pq, pk = phi(q_t), phi(k_t)
        kv = gamma[..., None, None] * kv + jnp.einsum("bkf,bkv->bkfv", pk, v_t)[:, :, None]
        z = gamma[..., None] * z + pk[:, :, None]
        num = jnp.einsum("bkgf,bkgfv->bkgv", pq, kv)
        den = jnp.einsum("bkgf,bkgf->bkg", pq, z)
        return (kv, z), _divide(num, den, normalize, eps)

    state, out = lax.scan(step, (kv0, z0), tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
    return jnp.moveaxis(out, 0, 1), state


def _chunked(phi, q, k, v, kv0, z0, log_decay, normalize, eps, C):
    B, T, K, G, _ = q.shape
    n_chunks = -(-T // C)
    pad = n_chunks * C - T

    def chunks(x):  # [B, T, ...] -> [n_chunks, B, C, ...], zero padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n_chunks, C, *x.shape[2:]), 1, 0)

    lengths = jnp.asarray(np.minimum(C, T - C * np.arange(n_chunks)))  # the last may be short
    intra = _decay_mask(log_decay, C)  # [K, G, C, C]
    i = jnp.arange(C)
    from_state = jnp.exp((i + 1)[:, None, None] * log_decay)  # [C, K, G]: gamma^(i+1)

    def step(carry, inputs):
        kv, z = carry
        q_c, k_c, v_c, length = inputs  # [B, C, K, G, H], [B, C, K, H], [B, C, K, Hv], []
        valid = i < length
        # Padded keys must not count: phi(0) is not 0 for elu+1 or taylor.
        pq = phi(q_c) * valid[:, None, None, None]
        pk = phi(k_c) * valid[:, None, None]
        scores = jnp.einsum("bikgf,bjkf->bkgij", pq, pk) * intra
        num = jnp.einsum("bkgij,bjkv->bikgv", scores, v_c)
        den = jnp.einsum("bkgij->bikg", scores)
        num = num + jnp.einsum("bikgf,bkgfv->bikgv", pq, kv) * from_state[..., None]
        den = den + jnp.einsum("bikgf,bkgf->bikg", pq, z) * from_state
        # Key j of this chunk reaches the chunk's last real token with gamma^(length-1-j).
        lag = jnp.where(valid, length - 1 - i, 0)
        to_state = jnp.where(valid[:, None, None],
                             jnp.exp(lag[:, None, None] * log_decay), 0)  # [C, K, G]
        carried = jnp.exp(length * log_decay)
        kv = carried[..., None, None] * kv + jnp.einsum("bjkf,jkg,bjkv->bkgfv", pk, to_state,
                                                        v_c)
        z = carried[..., None] * z + jnp.einsum("bjkf,jkg->bkgf", pk, to_state)
        out = _divide(num, den, normalize, eps, valid[:, None, None])
        return (kv, z), out

    state, out = lax.scan(step, (kv0, z0), (chunks(q), chunks(k), chunks(v), lengths))
    out = jnp.moveaxis(out, 0, 1).reshape(B, n_chunks * C, K, G, v.shape[-1])[:, :T]
    return out, state
