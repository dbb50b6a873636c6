r"""Position information for any attention: transforms of q/k, or additive biases on the logits.

* ``sinusoidal``: the fixed absolute encoding of "Attention Is All You Need",
  PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)).
* ``apply_rope``: rotary embeddings (RoFormer): pairs of channels rotated by angle p * theta_i,
  theta_i = base^(-2i/r) over the first r = fraction * H channels; "linear" scaling divides
  positions by a factor (position interpolation), "ntk" raises the base to
  base * factor^(r / (r - 2)) (NTK-aware). ``apply_rope_2d`` rotates half the rotary pairs by
  the row and half by the column of an image token.
* ``alibi_slopes`` / ``alibi_bias``: ALiBi's per-head linear distance penalty,
  ``bias[n, t, s] = -m_n * (t - s)`` (causal) or ``-m_n * |t - s|``.
* ``t5_bucket`` / ``t5_bias``: T5's relative-position buckets (exact for small distances,
  logarithmic up to ``max_distance``) and the bias read from a learned [buckets, N] table.
* ``xl_relative_logits``: Transformer-XL's relative attention logits,
  (q_t + u) . k_s + (q_t + v) . r_{t - s}, with r the (projected) sinusoidal embeddings of the
  relative distance; ``relative_logits``, its position terms alone, also with a learned table
  r and a scalar b_{t - s} per distance (RCMHA's form).

Biases are [N, T, S] (broadcast over batch) and go to ``jattn.dot_product_attention(bias=...)``;
query positions default to the last T of the S key positions (a query block at the end of a
KV cache).

References:
    "Attention Is All You Need" (sinusoidal); "RoFormer: Enhanced Transformer with Rotary
    Position Embedding"; "Extending Context Window of Large Language Models via Positional
    Interpolation" (linear scaling); NTK-aware scaled RoPE (bloc97, 2023); "Train Short, Test
    Long: Attention with Linear Biases" (ALiBi); "Exploring the Limits of Transfer Learning
    with a Unified Text-to-Text Transformer" (T5 buckets); "Transformer-XL: Attentive Language
    Models Beyond a Fixed-Length Context".
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jattn.core.shapes import Array, accumulation_dtype, check_floating, check_rank, check_shape


def sinusoidal(positions: Array, dim: int, *, base: float = 10000.0) -> Array:
    """PE[..., 2i] = sin(p / base^(2i/dim)), PE[..., 2i+1] = cos(p / base^(2i/dim)).

    Args:
        positions: [...] positions (integers or floats).
        dim: an even embedding size.
        base: the wavelength base.

    Returns:
        [..., dim] float32.

    >>> sinusoidal(jnp.arange(2), 4)
    Array([[0.        , 1.        , 0.        , 1.        ],
           [0.84147096, 0.5403023 , 0.00999983, 0.99995   ]], dtype=float32)
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"dim: expected an even number >= 2, got {dim}")
    angles = jnp.asarray(positions, jnp.float32)[..., None] * _inverse_frequencies(dim, base)
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], -1).reshape(*angles.shape[:-1], dim)


def _inverse_frequencies(dim: int, base: float, dtype=jnp.float32) -> Array:
    return base ** (-jnp.arange(0, dim, 2, dtype=dtype) / dim)


def rope_frequencies(head_dim: int, *, base: float = 10000.0, fraction: float = 1.0,
                     scaling: str | None = None, factor: float = 1.0,
                     dtype=jnp.float32) -> Array:
    """The rotation rates theta_i of the r = fraction * head_dim rotated channels: [r / 2]
    in ``dtype`` (float32; :func:`apply_rope` asks for float64 for float64 inputs).

    ``scaling="ntk"`` uses base * factor^(r / (r - 2)); ``"linear"`` is applied to the
    positions in :func:`apply_rope` (theta unchanged here).

    >>> rope_frequencies(4)
    Array([1.  , 0.01], dtype=float32)
    """
    rotary = _rotary_dim(head_dim, fraction)
    if scaling not in (None, "linear", "ntk"):
        raise ValueError(f"scaling: expected None, 'linear' or 'ntk', got {scaling!r}")
    if factor <= 0:
        raise ValueError(f"factor: expected > 0, got {factor}")
    if scaling == "ntk" and rotary > 2:
        base = base * factor ** (rotary / (rotary - 2))
    return _inverse_frequencies(rotary, base, dtype)


def _rotary_dim(head_dim: int, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction}")
    rotary = int(head_dim * fraction) // 2 * 2
    if rotary < 2:
        raise ValueError(f"fraction: {fraction} of head_dim={head_dim} leaves fewer than 2 "
                         f"channels to rotate")
    return rotary


def _rotate(x: Array, angles: Array, interleaved: bool) -> Array:
    """Rotate channel pairs of x [..., r] by angles [..., r / 2]."""
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if interleaved:  # pairs (0, 1), (2, 3), ...
        a, b = x[..., 0::2], x[..., 1::2]
        return jnp.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)
    half = x.shape[-1] // 2  # pairs (i, i + r/2)
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


def apply_rope(x: Array, positions: Array | None = None, *, base: float = 10000.0,
               fraction: float = 1.0, scaling: str | None = None, factor: float = 1.0,
               interleaved: bool = False) -> Array:
    r"""Rotary position embedding of queries or keys.

    Channel pair i of the first r = fraction * H channels is rotated by p * theta_i
    (:func:`rope_frequencies`); the other channels pass through. Pairs are (i, i + r/2)
    (GPT-NeoX / Llama layout) or, with ``interleaved``, (2i, 2i + 1) (RoFormer / GPT-J).
    Rotating both q and k makes their dot product depend on positions only through p_q - p_k.

    Args:
        x: [B, T, N, H].
        positions: [T] or [B, T] positions; default 0..T-1. ``scaling="linear"`` divides them
            by ``factor`` (position interpolation).
        base, fraction, scaling, factor: see :func:`rope_frequencies`.
        interleaved: the channel-pair layout.

    Returns:
        [B, T, N, H] in x's dtype (angles and rotations computed in float32, in float64 for
        float64 x).

    >>> x = jnp.ones((1, 2, 1, 2))
    >>> [round(float(v), 3) for v in apply_rope(x)[0, 1, 0]]  # (1, 1) turned by 1 radian
    [-0.301, 1.382]
    """
    check_rank("x", x, (4,), "[B, T, N, H]")
    check_floating("x", x)
    B, T, _, H = x.shape
    dtype = accumulation_dtype(x.dtype)
    theta = rope_frequencies(H, base=base, fraction=fraction, scaling=scaling, factor=factor,
                             dtype=dtype)
    rotary = 2 * theta.shape[0]
    p = _positions(positions, B, T).astype(dtype)
    if scaling == "linear":
        p = p / factor
    angles = p[:, :, None, None] * theta  # [B, T, 1, r/2]
    rotated = _rotate(x[..., :rotary].astype(dtype), angles, interleaved)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary:]], -1)


def apply_rope_2d(x: Array, rows: Array, cols: Array, *, base: float = 10000.0,
                  interleaved: bool = False) -> Array:
    """2-D rotary embedding for image tokens: the first half of the channels is rotated by
    the token's row, the second half by its column (each half a 1-D RoPE).

    Args:
        x: [B, T, N, H] with H divisible by 4.
        rows, cols: [T] or [B, T] grid coordinates of the tokens.

    Returns:
        [B, T, N, H].
    """
    check_rank("x", x, (4,), "[B, T, N, H]")
    H = x.shape[-1]
    if H % 4:
        raise ValueError(f"x: 2-D RoPE needs a head dim divisible by 4, got {x.shape}")
    half = H // 2
    return jnp.concatenate([
        apply_rope(x[..., :half], rows, base=base, interleaved=interleaved),
        apply_rope(x[..., half:], cols, base=base, interleaved=interleaved)], -1)


def _positions(positions, B: int, T: int) -> Array:
    if positions is None:
        return jnp.broadcast_to(jnp.arange(T), (B, T))
    positions = jnp.asarray(positions)
    if positions.shape == (T,):
        return jnp.broadcast_to(positions, (B, T))
    check_shape("positions", positions, (B, T), "BT")
    return positions


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's head slopes m_n: a geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads;
    for n not a power of two, the slopes of the largest power of two below n, then every
    other slope of twice that power.

    >>> alibi_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if num_heads < 1:
        raise ValueError(f"num_heads: expected >= 1, got {num_heads}")

    def geometric(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    power = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(power)
    if power < num_heads:
        slopes += geometric(2 * power)[0::2][:num_heads - power]
    return np.asarray(slopes)


def _query_key_positions(q_len: int, kv_len: int, query_offset: int | None):
    offset = kv_len - q_len if query_offset is None else query_offset
    return jnp.arange(q_len)[:, None] + offset, jnp.arange(kv_len)[None, :]


def alibi_bias(num_heads: int, q_len: int, kv_len: int, *, is_causal: bool = True,
               query_offset: int | None = None) -> Array:
    """bias[n, t, s] = -m_n (p_t - s) (causal; future keys must be masked separately) or
    ``-m_n |p_t - s|`` (symmetric), with p_t = query_offset + t (default kv_len - q_len).

    Returns:
        [N, T, S] float32.
    """
    qp, kp = _query_key_positions(q_len, kv_len, query_offset)
    distance = (qp - kp) if is_causal else jnp.abs(qp - kp)
    return -jnp.asarray(alibi_slopes(num_heads), jnp.float32)[:, None, None] * distance


def t5_bucket(relative_position: Array, *, bidirectional: bool = True, num_buckets: int = 32,
              max_distance: int = 128) -> Array:
    """T5's bucket of the relative position s - t.

    Bidirectional: half the buckets for keys after the query, half before. Within a side,
    distances below half the side's buckets get their own bucket; larger ones share
    logarithmically spaced buckets up to ``max_distance`` (and the last bucket beyond).
    Causal (``bidirectional=False``): keys after the query all go to bucket 0.

    Args:
        relative_position: integer array of s - t (key position minus query position).

    Returns:
        int32 buckets in [0, num_buckets).
    """
    if num_buckets < 2 or (bidirectional and num_buckets < 4):
        raise ValueError(f"num_buckets: expected >= {4 if bidirectional else 2}, "
                         f"got {num_buckets}")
    rel = jnp.asarray(relative_position, jnp.int32)
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(rel > 0, num_buckets, 0)
        distance = jnp.abs(rel)
    else:
        distance = jnp.maximum(-rel, 0)
    exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(
        max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return (offset + jnp.where(distance < exact, distance, large)).astype(jnp.int32)


def t5_bias(table: Array, q_len: int, kv_len: int, *, bidirectional: bool = True,
            max_distance: int = 128, query_offset: int | None = None) -> Array:
    """bias[n, t, s] = table[bucket(s - p_t), n] for a learned table [num_buckets, N].

    Returns:
        [N, T, S] in the table's dtype.
    """
    check_rank("table", table, (2,), "[num_buckets, N]")
    qp, kp = _query_key_positions(q_len, kv_len, query_offset)
    buckets = t5_bucket(kp - qp, bidirectional=bidirectional, num_buckets=table.shape[0],
                        max_distance=max_distance)
    return jnp.moveaxis(table[buckets], -1, 0)


def relative_logits(query: Array, kv_len: int, relative_key: Array, *,
                    position_bias: Array | None = None, distance_bias: Array | None = None,
                    query_offset: int | None = None) -> Array:
    r"""The position terms of relative attention: (q_t + v) . r_{p_t - s} + b_{p_t - s}.

    Zero where the distance p_t - s is negative (a future key: mask it) or >= R.

    Args:
        query: [B, T, N, H].
        kv_len: S, the number of keys.
        relative_key: [R, N, H], one key per relative distance d = 0 .. R - 1: projected
            sinusoids (Transformer-XL) or a learned table (RCMHA).
        position_bias: v, [N, H], or None (no v term).
        distance_bias: b, [R, N], a learned scalar per distance and head, or None.
        query_offset: p_t = query_offset + t (default S - T).

    Returns:
        [B, N, T, S] float32 (float64 for float64 input).
    """
    check_rank("query", query, (4,), "[B, T, N, H]")
    check_floating("query", query)
    check_rank("relative_key", relative_key, (3,), "[R, N, H]")
    check_floating("relative_key", relative_key)
    B, T, N, H = query.shape
    R = relative_key.shape[0]
    check_shape("relative_key", relative_key, (R, N, H), "RNH")
    acc = accumulation_dtype(query.dtype)
    q = query.astype(acc)
    if position_bias is not None:
        check_shape("position_bias", position_bias, (N, H), "NH")
        q = q + jnp.asarray(position_bias).astype(acc)
    by_distance = jnp.einsum("btnh,rnh->bntr", q, relative_key.astype(acc))
    if distance_bias is not None:
        check_shape("distance_bias", distance_bias, (R, N), "RN")
        by_distance = by_distance + jnp.asarray(distance_bias).astype(acc).T[None, :, None]
    qp, kp = _query_key_positions(T, kv_len, query_offset)
    distance = qp - kp  # [T, S]
    valid = (distance >= 0) & (distance < R)
    index = jnp.broadcast_to(jnp.clip(distance, 0, R - 1), (B, N, T, kv_len))
    return jnp.where(valid, jnp.take_along_axis(by_distance, index, axis=-1), 0.0)


def xl_relative_logits(query: Array, key: Array, relative_key: Array, content_bias: Array,
                       position_bias: Array, *, query_offset: int | None = None) -> Array:
    r"""Transformer-XL logits (unscaled): (q_t + u) . k_s + (q_t + v) . r_{p_t - s}.

    Args:
        query: [B, T, N, H]; key: [B, S, N, H].
        relative_key: [R, N, H], the projected embedding of each relative distance
            d = 0, 1, ..., R - 1 (e.g. ``sinusoidal(jnp.arange(R), d_model) @ W_R`` split into
            heads); distances beyond R - 1 or negative (future keys) read zeros: mask them.
        content_bias, position_bias: u and v, [N, H].
        query_offset: p_t = query_offset + t (default S - T).

    Returns:
        [B, N, T, S] float32 (float64 for float64 input) logits; scale and mask them before
        the softmax.
    """
    for name, x in (("query", query), ("key", key)):
        check_rank(name, x, (4,), "[B, T, N, H]" if name == "query" else "[B, S, N, H]")
        check_floating(name, x)
    B, _, N, H = query.shape
    S = key.shape[1]
    check_shape("key", key, (B, S, N, H), "BSNH")
    check_shape("content_bias", content_bias, (N, H), "NH")
    acc = accumulation_dtype(query.dtype)
    content = jnp.einsum("btnh,bsnh->bnts", query.astype(acc) + content_bias, key.astype(acc))
    return content + relative_logits(query, S, relative_key, position_bias=position_bias,
                                     query_offset=query_offset)
