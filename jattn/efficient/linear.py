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
    Attention" (the elu + 1 feature map and the recurrent form); Performer, "Rethinking
    Attention with Performers" (FAVOR+ positive orthogonal random features, ``"favor+"``);
    cosFormer, "cosFormer: Rethinking Softmax in Attention" (ReLU features with cos-based
    re-weighting, ``"cosformer"``). Performer / RFA random feature maps are not P63 (the
    random-features lens of a single attention layer, :mod:`jattn.analysis.rf_lens`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_floating,
    check_integer,
    check_qkv,
    check_shape,
    is_concrete,
)
from pallas_kernels.linear import lightning

FeatureMap = Callable[[Array], Array]

FORMS = ("parallel", "recurrent", "chunked", "pallas")


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

# Feature maps with parameters beyond x (random features, positions): linear_attention builds
# them from its own arguments (key, num_features; offset, max_length).
PARAMETRIC_FEATURE_MAPS = ("favor+", "cosformer")


def default_num_features(head_dim: int) -> int:
    """FAVOR+'s default number of random features m: ceil(H ln H), at least H.

    The Performer paper's analysis asks for m = Theta(H log H) features for a uniformly good
    approximation; H ln H gives 267 for H = 64 (the paper's experiments use 256).

    >>> default_num_features(64), default_num_features(8), default_num_features(2)
    (267, 17, 2)
    """
    return max(head_dim, math.ceil(head_dim * math.log(head_dim))) if head_dim > 1 else 1


def favor_projection(rng, num_features: int, head_dim: int, dtype=jnp.float32) -> Array:
    r"""FAVOR+'s random projection W [m, H]: orthogonal Gaussian rows with chi(H) norms.

    Rows come in blocks of H: each block is a Haar-random orthogonal H x H matrix (QR of a
    Gaussian matrix, signs fixed by diag(R)), so rows within a block are exactly orthogonal;
    ceil(m / H) independent blocks are stacked and the first m rows kept. Each row is then
    rescaled by an independent chi(H)-distributed norm (the norm of an H-dim standard
    Gaussian), so that every row is marginally N(0, I_H), which keeps the estimator unbiased.

    Args:
        key: a PRNG key (``jax.random.key``).
        num_features: m >= 1.
        head_dim: H >= 1.
        dtype: a floating dtype of the result.

    Returns:
        [m, H].

    >>> import jax
    >>> w = favor_projection(jax.random.key(0), 6, 4)
    >>> w.shape, bool(abs(w[0] @ w[1]) < 1e-5)  # rows 0..3 are one orthogonal block
    ((6, 4), True)

    References:
        "Rethinking Attention with Performers" (Choromanski et al.), orthogonal random features.
    """
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
    return _favor_projection(rng, num_features, head_dim, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _favor_projection(rng, m: int, h: int, dtype) -> Array:
    n_blocks = -(-m // h)
    block_key, norm_key = jax.random.split(rng)
    gaussian = jax.random.normal(block_key, (n_blocks, h, h), dtype)
    q, r = jnp.linalg.qr(gaussian)
    # Haar measure: fix the sign ambiguity of QR; rows of q^T (= columns of q) orthonormal.
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    rows = jnp.swapaxes(q, -1, -2).reshape(n_blocks * h, h)[:m]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (m, h), dtype), axis=-1)
    return rows * norms[:, None]


def favor_features(x: Array, projection: Array) -> Array:
    r"""FAVOR+ positive random features of the last axis (size H -> m), plain definition.

    .. math::
        \phi(x) = \frac{1}{\sqrt m} \exp\Big(W x' - \frac{|x'|^2}{2}\Big), \quad
        x' = H^{-1/4} x, \qquad
        \mathbb{E}_W[\phi(q) \cdot \phi(k)] = \exp\Big(\frac{q \cdot k}{\sqrt H}\Big)

    for rows of W marginally N(0, I_H) (:func:`favor_projection`). Not stabilised: inside
    :func:`linear_attention` a per-query maximum is subtracted (see there).

    Args:
        x: [..., H].
        projection: W [m, H].

    Returns:
        [..., m], positive.

    >>> import jax, jax.numpy as jnp
    >>> w = favor_projection(jax.random.key(0), 16, 4)
    >>> favor_features(jnp.ones((3, 4)), w).shape
    (3, 16)

    References:
        "Rethinking Attention with Performers" (FAVOR+). Not P63 (the random-features lens).
    """
    x = x * x.shape[-1] ** -0.25
    logits = jnp.einsum("...h,mh->...m", x, projection.astype(x.dtype))
    return jnp.exp(logits - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / math.sqrt(
        projection.shape[0])


def cosformer_features(x: Array, positions, max_length) -> Array:
    r"""cosFormer's features of the last axis (size H -> 2H) at absolute positions.

    .. math::
        \phi(x_i) = \big[\mathrm{relu}(x_i) \cos\tfrac{\pi i}{2M},\
                         \mathrm{relu}(x_i) \sin\tfrac{\pi i}{2M}\big], \qquad
        \phi(q_i) \cdot \phi(k_j) = \mathrm{relu}(q_i) \cdot \mathrm{relu}(k_j)
            \cos\Big(\frac{\pi}{2} \frac{i - j}{M}\Big)

    (cos(a - b) = cos a cos b + sin a sin b).

    Args:
        x: [..., H].
        positions: absolute positions i, broadcastable to x.shape[:-1].
        max_length: M; the weight stays positive while ``|i - j| < M``.

    Returns:
        [..., 2H] in x's dtype.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((2, 3))
    >>> cosformer_features(x, jnp.arange(2), 2).shape
    (2, 6)

    References:
        "cosFormer: Rethinking Softmax in Attention" (Qin et al.).
    """
    angle = (jnp.pi / 2) * jnp.asarray(positions, x.dtype) / jnp.asarray(max_length, x.dtype)
    r = jax.nn.relu(x)
    return jnp.concatenate([r * jnp.cos(angle)[..., None], r * jnp.sin(angle)[..., None]], -1)


def _unknown_feature_map(feature_map) -> ValueError:
    names = ", ".join((*FEATURE_MAPS, *PARAMETRIC_FEATURE_MAPS))
    return ValueError(f"feature_map: expected one of {names} or a callable, got "
                      f"{feature_map!r}")


def resolve_feature_map(feature_map: str | FeatureMap) -> FeatureMap:
    """The function behind a feature-map name (a callable is returned as is).

    "favor+" and "cosformer" have parameters (random features; positions): use
    :func:`favor_features` and :func:`cosformer_features`.

    Raises:
        ValueError: an unknown name (the message lists the supported ones), or "favor+" /
            "cosformer".
        TypeError: neither a name nor a callable.
    """
    if isinstance(feature_map, str):
        if feature_map in PARAMETRIC_FEATURE_MAPS:
            raise ValueError(f"feature_map: {feature_map!r} has parameters; use "
                             f"favor_features or cosformer_features")
        if feature_map not in FEATURE_MAPS:
            raise _unknown_feature_map(feature_map)
        return FEATURE_MAPS[feature_map]
    if callable(feature_map):
        return feature_map
    raise TypeError(f"feature_map: expected a name or a callable, got "
                    f"{type(feature_map).__name__}")


def feature_size(feature_map: str | FeatureMap, head_dim: int, *,
                 num_features: int | None = None) -> int:
    """F, the size of phi(x) for x of size ``head_dim`` (H for the elementwise maps,
    1 + H + H^2 for "taylor", 2H for "cosformer", m for "favor+": ``num_features`` or
    :func:`default_num_features`).

    >>> feature_size("taylor", 8), feature_size("cosformer", 8), feature_size("favor+", 8)
    (73, 16, 17)
    """
    if feature_map == "favor+":
        return default_num_features(head_dim) if num_features is None else num_features
    if feature_map == "cosformer":
        return 2 * head_dim
    phi = resolve_feature_map(feature_map)
    return int(jax.eval_shape(phi, jax.ShapeDtypeStruct((head_dim,), jnp.float32)).shape[-1])


def linear_attention(q, k, v, *, feature_map: str | FeatureMap = "elu+1",
                     is_causal: bool = False, decay=None, log_decay=None, segment_ids=None,
                     normalize: bool = True,
                     eps: float = 1e-6, form: str = "chunked", chunk_size: int = 64,
                     initial_state: LinearAttentionState | None = None,
                     return_state: bool = False, rng=None, num_features: int | None = None,
                     max_length: int | None = None, offset=0):
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

    CAB's patterns: noncausal self, noncausal cross (any S) and causal self; causal cross
    only with S == T (query t is paired with key t). Other lengths raise
    NotImplementedError: the running state is a prefix sum over one sequence, so there is no
    alignment of T queries with S != T keys to sum up to.

    Feature maps with parameters:

    * ``"favor+"`` (Performer's FAVOR+): ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` with
      x' = x / H^(1/4), so that E[phi(q) . phi(k)] = exp(q . k / sqrt(H)), the softmax kernel
      (see :func:`jattn.efficient.linear.favor_features`). W [m, H] is drawn from ``rng`` by
      :func:`jattn.efficient.linear.favor_projection` (orthogonal rows in blocks of H, chi(H)
      norms), the same for every head; m = ``num_features`` (default
      :func:`jattn.efficient.linear.default_num_features`, ceil(H ln H)).
      Stabilisation: each query's features are computed as exp(W q' - max_f (W q')_f) /
      sqrt(m), i.e. phi(q_t) divided by ``c_t = exp(max_f (W q')_f - |q'|^2 / 2)``, a factor
      that cancels between numerator and denominator; so with ``normalize`` the output is
      num_t / (den_t + eps c_t): eps acts on the query's stabilised scale (largest feature
      1 / sqrt(m)) and does not swamp a query whose plain features all underflow or are far
      below eps (large ``|q|``, peaked attention). eps = 0 gives exactly the plain definition.
      Without ``normalize`` nothing can cancel, so c_t is multiplied back and the numerator
      is exactly the plain definition (it can overflow only where that does). Keys are not
      shifted: their exponent ``W k' - |k'|^2 / 2`` is at most ``|w_f|^2 / 2 ~ H / 2``
      (complete the square), far from float32's limit for usual head sizes (H <= 128); an
      unshifted key keeps the carried state independent of the call (a maximum over keys, as
      the Performer code subtracts, would change from call to call and, when causal, look at
      future keys). Works with every form, decay and state.
    * ``"cosformer"`` (cosFormer): phi = relu and the score of query position i and key
      position j is multiplied by cos(pi/2 (i - j) / M), via the features
      [relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)]
      (:func:`jattn.efficient.linear.cosformer_features`, F = 2H).
      Positions are absolute: query t and key s of this call are at ``offset`` + t and
      ``offset`` + s. M = ``max_length``, default max(T, S) (only without ``initial_state``
      and with ``offset`` 0: a carried state needs the same M in every call, so pass
      ``max_length`` and ``offset`` = the number of tokens before this call).
      Works with every form, decay and state.

    Performer / RFA random features are not P63 (the random-features lens of
    :mod:`jattn.analysis.rf_lens`, which studies a frozen random query-key attention layer).

    Args:
        q: [B, T, N, H].
        k: [B, S, K, H]; N % K == 0 gives GQA/MQA without repeating K/V.
        v: [B, S, K, Hv].
        feature_map: "identity", "elu+1", "relu", "taylor" (Based's 1 + d + d^2 features,
            :func:`jattn.efficient.linear.taylor_feature_map`), "favor+", "cosformer" (above)
            or a callable [..., H] -> [..., F] applied to the last axis (any leading shape) of
            queries and keys.
        is_causal: query t sees keys s <= t (then S == T). Otherwise every query sees every
            key.
        decay: per-query-head factors gamma in (0, 1], [N] (causal only): key s reaches query
            t with weight gamma^(t - s). May be traced (learned).
        log_decay: data-dependent decay (gated linear attention, Mamba-2, RetNet with gates;
            causal only): float [B, T, N] of values <= 0, the log of the factor the state is
            multiplied by at position t before key t enters, so key s reaches query t with
            weight exp(sum_{s < r <= t} log_decay[r]) (times gamma^(t - s) with ``decay``) and
            the initial state with exp(sum_{r <= t} log_decay[r]). May be traced.
        segment_ids: int [B, T] (causal only): packed documents; the state is reset where
            the id changes from one position to the next, so a query sees only keys of its
            own run of equal ids. The initial state continues into position 0 and reaches
            the queries up to the first change.
        normalize: divide by phi(q_t) . sum of phi(k_s) (+ eps); False returns the numerator.
        eps: added to the denominator, a Python float >= 0.
        form: "parallel", "recurrent" or "chunked" (see the module docstring); the same result
            up to rounding. Non-causal attention has a single (global-sum) form.
        chunk_size: chunk length of the "chunked" form (clipped to T); any T is accepted.
        initial_state: a :class:`LinearAttentionState` (kv [B, N, F, Hv], k_sum [B, N, F]).
        return_state: also return the state after the last key.
        key: PRNG key of the random features ("favor+" only, required there; ignored
            otherwise). Reuse the same key in every call that shares a state.
        num_features: m, the number of random features ("favor+" only).
        max_length: M of "cosformer" (only there), a Python int with offset + max(T, S) <= M.
        offset: absolute position of the first query and key ("cosformer" only; ignored
            otherwise): an int or an integer scalar array (may be traced, e.g. in a decoding
            loop).

    Returns:
        output [B, T, N, Hv] in the input dtype; with ``return_state`` the pair (output,
        state), the state in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: non-floating or mismatched q/k/v dtypes, a non-floating decay or state, a
            feature map that is neither a name nor a callable.
        NotImplementedError: causal cross attention with S != T.
        ValueError: wrong ranks or shapes, heads that do not divide, an unknown feature map
            or form, decay without ``is_causal`` or outside (0, 1], a non-positive chunk
            size, a negative eps; "favor+" without ``rng``; a bad
            ``num_features`` or one given without "favor+"; for "cosformer" a bad
            ``max_length`` (or one given for another map), a negative ``offset``, positions
            beyond ``max_length``, ``initial_state`` or ``offset`` without ``max_length``.

    Example:
        >>> import jax, jax.numpy as jnp, jattn
        >>> q = jax.random.normal(jax.random.key(0), (2, 10, 4, 8))
        >>> kv = jax.random.normal(jax.random.key(1), (2, 10, 2, 8))
        >>> out, state = jattn.linear_attention(q, kv, kv, feature_map="taylor",
        ...                                     is_causal=True, return_state=True)
        >>> out.shape, state.kv.shape, state.k_sum.shape
        ((2, 10, 4, 8), (2, 4, 73, 8), (2, 4, 73))
        >>> out = jattn.linear_attention(q, kv, kv, feature_map="favor+",
        ...                              rng=jax.random.key(2), num_features=32)
        >>> y1, st = jattn.linear_attention(q[:, :6], kv[:, :6], kv[:, :6], is_causal=True,
        ...     feature_map="cosformer", max_length=10, return_state=True)
        >>> y2 = jattn.linear_attention(q[:, 6:], kv[:, 6:], kv[:, 6:], is_causal=True,
        ...     feature_map="cosformer", max_length=10, offset=6, initial_state=st)
        >>> whole = jattn.linear_attention(q, kv, kv, is_causal=True, feature_map="cosformer")
        >>> bool(jnp.allclose(jnp.concatenate([y1, y2], 1), whole, atol=1e-5))
        True

    References:
        P22 Lightning Attention (chunked form, per-head decay); P24 Zoology (Based's Taylor
        feature map); "Transformers are RNNs: Fast Autoregressive Transformers with Linear
        Attention" (elu + 1, the recurrent form); "Rethinking Attention with Performers"
        (FAVOR+); "cosFormer: Rethinking Softmax in Attention".
    """
    query, key_, value = (jnp.asarray(x) for x in (q, k, v))
    B, T, N, H, S, K, Hv = check_qkv(query, key_, value)
    if is_causal and S != T:
        raise NotImplementedError(f"key: causal linear attention needs S == T (a prefix sum "
                                  f"over one sequence), got query {query.shape} and key "
                                  f"{key_.shape}")
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if eps < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    dtype = accumulation_dtype(query.dtype)
    phi, params, F = _feature_setup(feature_map, query, key_, dtype, rng=rng,
                                    num_features=num_features, max_length=max_length,
                                    offset=offset, has_state=initial_state is not None)
    G = N // K

    a, doc = _decay_and_documents(decay, log_decay, segment_ids, is_causal, B, T, N, K,
                                  dtype)

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
    chunk_size = max(1, min(chunk_size, T)) if form in ("chunked", "pallas") else 0
    # Named maps go through the compiled cache; a user's callable (maybe unhashable, maybe a
    # new closure each call) is traced in place.
    compute = _compute_jit if isinstance(feature_map, str) else _compute
    out, (kv, z) = compute(q, key_.astype(dtype), value.astype(dtype), kv0, z0, a, doc,
                           params, phi=phi, normalize=normalize, eps=float(eps), form=form,
                           chunk_size=chunk_size)
    out = out.reshape(B, T, N, Hv).astype(query.dtype)
    if return_state:
        return out, LinearAttentionState(kv.reshape(B, N, F, Hv), z.reshape(B, N, F))
    return out


def _decay_and_documents(decay, log_decay, segment_ids, is_causal, B, T, N, K, dtype):
    """(a, doc): a [1 or B, T, K, G], the log factor of the state at each position (constant
    decay and data-dependent decay summed); doc [B, T] int32, the number of segment changes
    up to each position, or None without segment ids."""
    G = N // K
    a = jnp.zeros((1, T, K, G), dtype)
    for name, x in (("decay", decay), ("log_decay", log_decay), ("segment_ids", segment_ids)):
        if x is not None and not is_causal:
            raise ValueError(f"{name}: only defined for causal attention (is_causal=True)")
    if decay is not None:
        decay = jnp.asarray(decay)
        check_floating("decay", decay)
        check_shape("decay", decay, (N,), "N")
        if is_concrete(decay):
            values = np.asarray(decay, np.float64)
            if not ((values > 0) & (values <= 1)).all():
                raise ValueError(f"decay: expected values in (0, 1], got min {values.min()} "
                                 f"max {values.max()}")
        a = a + jnp.log(decay.astype(dtype)).reshape(K, G)
    if log_decay is not None:
        log_decay = jnp.asarray(log_decay)
        check_floating("log_decay", log_decay)
        check_shape("log_decay", log_decay, (B, T, N), "BTN")
        if is_concrete(log_decay) and not (np.asarray(log_decay, np.float64) <= 0).all():
            raise ValueError(f"log_decay: expected values <= 0 (a factor <= 1), got max "
                             f"{float(np.max(np.asarray(log_decay)))}")
        a = a + log_decay.astype(dtype).reshape(B, T, K, G)
    doc = None
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        check_integer("segment_ids", segment_ids)
        check_shape("segment_ids", segment_ids, (B, T), "BT")
        change = jnp.concatenate([jnp.zeros((B, 1), bool),
                                  segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        doc = jnp.cumsum(change, axis=1, dtype=jnp.int32)
    return a, doc


def _feature_setup(feature_map, query, key_, dtype, *, rng, num_features, max_length, offset,
                   has_state):
    """(phi, params, F): phi is static (a callable, or the name of a parametric map), params
    the traced arrays of a parametric map: favor+ (W [m, H],), cosformer (offset, M)."""
    H = query.shape[-1]
    if num_features is not None and feature_map != "favor+":
        raise ValueError(f"num_features: only used by feature_map='favor+', got "
                         f"feature_map={feature_map!r}")
    if max_length is not None and feature_map != "cosformer":
        raise ValueError(f"max_length: only used by feature_map='cosformer', got "
                         f"feature_map={feature_map!r}")
    if feature_map == "favor+":
        if rng is None:
            raise ValueError("rng: feature_map='favor+' draws random features and needs an "
                             "explicit PRNG key, e.g. rng=jax.random.key(0)")
        m = default_num_features(H) if num_features is None else num_features
        return "favor+", (favor_projection(rng, m, H, dtype),), m
    if feature_map == "cosformer":
        T, S = query.shape[1], key_.shape[1]
        # A Python 0 stays known under jit (jnp.asarray of it inside a trace may not be).
        zero_offset = isinstance(offset, int | np.integer) and int(offset) == 0
        offset = jnp.asarray(offset)
        if not jnp.issubdtype(offset.dtype, jnp.integer) or offset.ndim != 0:
            raise ValueError(f"offset: expected an integer scalar, got {offset.dtype} of "
                             f"shape {offset.shape}")
        zero_offset = zero_offset or (is_concrete(offset) and int(offset) == 0)
        if max_length is None:
            if has_state or not zero_offset:
                raise ValueError("max_length: cosformer with initial_state or an offset needs "
                                 "a fixed max_length (M must be the same in every call that "
                                 "shares a state)")
            max_length = max(T, S)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
        if is_concrete(offset):
            if int(offset) < 0:
                raise ValueError(f"offset: expected >= 0, got {int(offset)}")
            if int(offset) + max(T, S) > max_length:
                raise ValueError(f"max_length: positions up to offset + max(T, S) = "
                                 f"{int(offset) + max(T, S)} exceed max_length={max_length} "
                                 f"(query {query.shape}, key {key_.shape})")
        return "cosformer", (offset.astype(dtype), jnp.asarray(max_length, dtype)), 2 * H
    phi = resolve_feature_map(feature_map)
    return phi, (), _checked_feature_size(phi, query, key_, dtype)


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


def _features(phi, params, x: Array, pos, is_query: bool) -> tuple[Array, Array | None]:
    """(features, log_scale): the true phi(x) is features * exp(log_scale)[..., None]
    (log_scale None: features are phi(x) itself). ``pos``: positions of x's tokens relative
    to the call, broadcastable to x.shape[:-1]."""
    if not isinstance(phi, str):
        return phi(x), None
    if phi == "cosformer":
        offset, max_length = params
        return cosformer_features(x, offset + pos, max_length), None
    (w,) = params  # favor+
    m = w.shape[0]
    x = x * x.shape[-1] ** -0.25
    logits = jnp.einsum("...h,mh->...m", x, w)
    half_sq = 0.5 * jnp.sum(x * x, -1)
    if not is_query:
        return jnp.exp(logits - half_sq[..., None]) / math.sqrt(m), None
    # Not stop_gradient: with eps > 0 the output depends (slightly) on the subtracted maximum.
    top = jnp.max(logits, -1)
    return jnp.exp(logits - top[..., None]) / math.sqrt(m), top - half_sq


def _compute(q, k, v, kv0, z0, a, doc, params, *, phi, normalize, eps, form, chunk_size):
    if form == "global":  # non-causal
        return _global(phi, params, q, k, v, kv0, z0, normalize, eps)
    if form == "parallel":
        return _parallel(phi, params, q, k, v, kv0, z0, a, doc, normalize, eps)
    if form == "recurrent":
        return _recurrent(phi, params, q, k, v, kv0, z0, a, doc, normalize, eps)
    if form == "pallas":
        return _pallas(phi, params, q, k, v, kv0, z0, a, doc, normalize, eps, chunk_size)
    return _chunked(phi, params, q, k, v, kv0, z0, a, doc, normalize, eps, chunk_size)


# Compiled once per shape and option set, so that eager callers (notebooks, tests) do not
# retrace and recompile the scans on every call; inside an outer jit it is inlined.
_compute_jit = jax.jit(_compute, static_argnames=("phi", "normalize", "eps", "form",
                                                  "chunk_size"))


def _divide(num: Array, den: Array, normalize: bool, eps: float, log_scale=None,
            valid=None) -> Array:
    """num / (den + eps); rows marked invalid (padding) divide by 1 so they stay finite.

    A query ``log_scale`` (favor+: num and den computed from features exp(-log_scale) times
    the true ones) cancels in the ratio, eps acting on the stabilised scale; unnormalised, the
    true numerator num exp(log_scale) is returned.
    """
    if not normalize:
        return num if log_scale is None else num * jnp.exp(log_scale)[..., None]
    den = den + eps
    if valid is not None:
        den = jnp.where(valid, den, 1)
    return num / den[..., None]


# Shapes inside: q [B, T, K, G, H], k [B, S, K, H], v [B, S, K, Hv], state kv [B, K, G, F, Hv],
# z [B, K, G, F], a [1 or B, T, K, G] (log factor of the state at each position), doc [B, T]
# (segment changes so far) or None. Query head n is (n // G, n % G), as jnp.repeat maps it.
# Positions passed to _features broadcast against [B, T, K, G] (queries), [B, S, K] (keys).


def _global(phi, params, q, k, v, kv0, z0, normalize, eps):
    pk, _ = _features(phi, params, k, jnp.arange(k.shape[1])[:, None], False)
    kv = kv0 + jnp.einsum("bskf,bskv->bkfv", pk, v)[:, :, None]
    z = z0 + pk.sum(1)[:, :, None]
    pq, log_scale = _features(phi, params, q, jnp.arange(q.shape[1])[:, None, None], True)
    num = jnp.einsum("btkgf,bkgfv->btkgv", pq, kv)
    den = jnp.einsum("btkgf,bkgf->btkg", pq, z)
    return _divide(num, den, normalize, eps, log_scale), (kv, z)


def _pair_weights(A: Array, doc: Array | None) -> Array:
    """[B', K, G, T, T]: exp(A_i - A_j) where j <= i in the same document, else 0 (no
    inf * 0 anywhere). A [B', T, K, G]: cumulative log factors; doc [B, T] or None."""
    At = jnp.moveaxis(A, 1, -1)  # [B', K, G, T]
    T = At.shape[-1]
    ok = jnp.tril(jnp.ones((T, T), bool))
    if doc is not None:
        ok = ok & (doc[:, None, None, :, None] == doc[:, None, None, None, :])
    return jnp.where(ok, jnp.exp(jnp.where(ok, At[..., :, None] - At[..., None, :], 0)), 0)


def _parallel(phi, params, q, k, v, kv0, z0, a, doc, normalize, eps):
    T = q.shape[1]
    t = jnp.arange(T)
    pq, log_scale = _features(phi, params, q, t[:, None, None], True)
    pk, _ = _features(phi, params, k, t[:, None], False)
    A = jnp.cumsum(a, axis=1)  # [B', T, K, G]: log factor from before position 0 to t
    scores = jnp.einsum("btkgf,bskf->bkgts", pq, pk) * _pair_weights(A, doc)
    num = jnp.einsum("bkgts,bskv->btkgv", scores, v)
    den = jnp.einsum("bkgts->btkg", scores)
    from_state = jnp.exp(A)  # [B', T, K, G]
    to_state = jnp.exp(A[:, -1:] - A)  # key s to the end
    carried = jnp.exp(A[:, -1])  # [B', K, G]
    if doc is not None:  # the state reaches the first document; the end sees the last one
        from_state = from_state * (doc == 0)[..., None, None]
        to_state = to_state * (doc == doc[:, -1:])[..., None, None]
        carried = carried * (doc[:, -1] == 0)[:, None, None]
    num = num + jnp.einsum("btkgf,bkgfv->btkgv", pq, kv0) * from_state[..., None]
    den = den + jnp.einsum("btkgf,bkgf->btkg", pq, z0) * from_state
    kv = carried[..., None, None] * kv0 + jnp.einsum("bskf,bskg,bskv->bkgfv", pk, to_state, v)
    z = carried[..., None] * z0 + jnp.einsum("bskf,bskg->bkgf", pk, to_state)
    return _divide(num, den, normalize, eps, log_scale), (kv, z)


def _recurrent(phi, params, q, k, v, kv0, z0, a, doc, normalize, eps):
    B, T = q.shape[:2]
    factor = jnp.exp(jnp.broadcast_to(a, (B, *a.shape[1:])))  # [B, T, K, G]
    if doc is not None:  # a change of segment resets the state
        change = jnp.diff(doc, axis=1, prepend=doc[:, :1]) > 0
        factor = jnp.where(change[..., None, None], 0, factor)

    def step(carry, inputs):
        kv, z = carry
        q_t, k_t, v_t, f_t, t = inputs  # [B, K, G, H], [B, K, H], [B, K, Hv], [B, K, G], []
        pq, log_scale = _features(phi, params, q_t, t, True)
        pk, _ = _features(phi, params, k_t, t, False)
        kv = f_t[..., None, None] * kv + jnp.einsum("bkf,bkv->bkfv", pk, v_t)[:, :, None]
        z = f_t[..., None] * z + pk[:, :, None]
        num = jnp.einsum("bkgf,bkgfv->bkgv", pq, kv)
        den = jnp.einsum("bkgf,bkgf->bkg", pq, z)
        return (kv, z), _divide(num, den, normalize, eps, log_scale)

    xs = (*(jnp.moveaxis(x, 1, 0) for x in (q, k, v, factor)), jnp.arange(T))
    state, out = lax.scan(step, (kv0, z0), xs)
    return jnp.moveaxis(out, 0, 1), state


def _chunked(phi, params, q, k, v, kv0, z0, a, doc, normalize, eps, C):
    B, T, K, G, _ = q.shape
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    # Zero padded to whole chunks; each step slices its chunk out of these arrays, which
    # costs less memory traffic than scanning over [n_chunks, B, C, ...] transposed copies
    # (10% of the forward time at L = 16k on CPU). Padded positions have a log factor 0.
    q, k, v, a = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v, a))
    if doc is not None:
        doc = jnp.pad(doc, [(0, 0), (1, pad)], mode="edge")  # doc[:, start] precedes the chunk
    i = jnp.arange(C)

    def step(carry, start):
        kv, z = carry
        # [B, C, K, G, H], [B, C, K, H], [B, C, K, Hv], [B', C, K, G]
        q_c, k_c, v_c, a_c = (lax.dynamic_slice_in_dim(x, start, C, axis=1)
                              for x in (q, k, v, a))
        length = jnp.minimum(C, T - start)  # the last chunk may be short
        valid = i < length
        pos = start + i
        # Padded keys must not count: phi(0) is not 0 for elu+1 or taylor.
        pq, log_scale = _features(phi, params, q_c, pos[:, None, None], True)
        pq = pq * valid[:, None, None, None]
        pk = _features(phi, params, k_c, pos[:, None], False)[0] * valid[:, None, None]
        A = jnp.cumsum(a_c, axis=1)  # log factor from the state before the chunk to i
        A_end = lax.dynamic_index_in_dim(A, length - 1, axis=1)  # [B', 1, K, G]
        doc_c = None
        from_state, to_state, carried = jnp.exp(A), jnp.exp(A_end - A), jnp.exp(A_end[:, 0])
        if doc is not None:
            window = lax.dynamic_slice_in_dim(doc, start, C + 1, axis=1)
            doc_c = window[:, 1:] - window[:, :1]  # 0: the state's document
            doc_end = lax.dynamic_index_in_dim(doc_c, length - 1, axis=1)  # [B, 1]
            from_state = from_state * (doc_c == 0)[..., None, None]
            to_state = to_state * (doc_c == doc_end)[..., None, None]
            carried = carried * (doc_end == 0)[..., None]
        to_state = to_state * valid[:, None, None]
        scores = jnp.einsum("bikgf,bjkf->bkgij", pq, pk) * _pair_weights(A, doc_c)
        num = jnp.einsum("bkgij,bjkv->bikgv", scores, v_c)
        den = jnp.einsum("bkgij->bikg", scores)
        num = num + jnp.einsum("bikgf,bkgfv->bikgv", pq, kv) * from_state[..., None]
        den = den + jnp.einsum("bikgf,bkgf->bikg", pq, z) * from_state
        kv = carried[..., None, None] * kv + jnp.einsum("bjkf,bjkg,bjkv->bkgfv", pk, to_state,
                                                        v_c)
        z = carried[..., None] * z + jnp.einsum("bjkf,bjkg->bkgf", pk, to_state)
        out = _divide(num, den, normalize, eps, log_scale, valid[:, None, None])
        return (kv, z), out

    state, out = lax.scan(step, (kv0, z0), jnp.arange(n_chunks) * C)
    out = jnp.moveaxis(out, 0, 1).reshape(B, n_chunks * C, K, G, v.shape[-1])[:, :T]
    return out, state


def _pallas(phi, params, q, k, v, kv0, z0, a, doc, normalize, eps, C):
    """The chunked form as the Pallas lightning kernel: features here, the kernel's sums of
    [v, 1] give the numerator and the normaliser in one pass."""
    B, T = q.shape[:2]
    pq, log_scale = _features(phi, params, q, jnp.arange(T)[:, None, None], True)
    pk, _ = _features(phi, params, k, jnp.arange(T)[:, None], False)
    ones = jnp.ones((*v.shape[:-1], 1), v.dtype)
    sums, state = lightning.lightning_attention(
        pq, pk, jnp.concatenate([v, ones], -1), jnp.concatenate([kv0, z0[..., None]], -1),
        jnp.broadcast_to(a, (B, *a.shape[1:])), doc, chunk_size=C,
        interpret=jax.default_backend() not in ("gpu", "tpu"))
    num, den = sums[..., :-1], sums[..., -1]
    return _divide(num, den, normalize, eps, log_scale), (state[..., :-1], state[..., -1])
