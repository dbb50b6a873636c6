"""Shape letters, array aliases and input validation shared by every primitive.

Shape letters (as in ``jax.nn.dot_product_attention``):

    B  batch size
    T  query (target) length
    S  key/value (source) length
    N  query heads
    K  key/value heads (N % K == 0: K == N is MHA, 1 < K < N is GQA, K == 1 is MQA)
    G  query heads per key/value head, N // K
    H  query/key head dim
    Hv value head dim (may differ from H)

Layout: query [B, T, N, H], key [B, S, K, H], value [B, S, K, Hv], output [B, T, N, Hv].

Every check raises ``ValueError`` (wrong shape or value) or :class:`DTypeError` (wrong dtype:
a subclass of both ValueError, as ``jax.nn`` raises for dtypes, and TypeError) with a message
that starts with the argument's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash.common import DTypeError

Array = jax.Array
Shape = tuple[int, ...]


def is_concrete(x) -> bool:
    """True when ``x`` holds values we can read now (not a tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_int(name: str, value, *, minimum: int | None = 1,
              allow_none: bool = False) -> int | None:
    """A static integer argument (a Python or NumPy int, not a bool) that is at least
    ``minimum`` (None: any), as a Python int; None passes through when ``allow_none``.

    The one check of sizes, counts and offsets across the library.

    Raises:
        DTypeError: not an int (a bool, a float, an array).
        ValueError: below ``minimum``.

    >>> check_int("top_k", 3)
    3
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        kind = "an int" if minimum is None else f"an int >= {minimum}"
        raise DTypeError(f"{name}: expected {kind}{' or None' if allow_none else ''}, got "
                         f"{value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_per_axis(name: str, value, num_axes: int, *, minimum: int = 1,
                   kind: type = int) -> tuple:
    """One static value per spatial axis: a single int (a bool with ``kind=bool``) for every
    axis or a tuple of ``num_axes``, as a tuple of Python values; ints at least ``minimum``.

    Raises:
        ValueError: a tuple of another length, an int below ``minimum``.
        DTypeError: not an int (not a bool with ``kind=bool``).

    >>> check_per_axis("window_size", 4, 2)
    (4, 4)
    """
    values = tuple(value) if isinstance(value, Sequence) else (value,) * num_axes
    if len(values) != num_axes:
        raise ValueError(f"{name}: expected one value or a tuple of {num_axes} (one per "
                         f"spatial axis), got {value!r}")
    if kind is bool:
        if not all(isinstance(v, bool | np.bool_) for v in values):
            raise DTypeError(f"{name}: expected a bool or a tuple of bools, got {value!r}")
        return tuple(bool(v) for v in values)
    return tuple(check_int(name, v, minimum=minimum) for v in values)


def check_heads(d_model: int, num_heads: int, num_kv_heads: int | None = None) -> int:
    """Validate a head layout; return the number of key/value heads (default: num_heads).

    Raises:
        ValueError: num_heads not a divisor of d_model, or num_kv_heads not of num_heads.
    """
    if num_heads < 1 or d_model % num_heads:
        raise ValueError(f"num_heads: expected a divisor of d_model={d_model}, got {num_heads}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, "
                         f"got {num_kv_heads}")
    return num_kv_heads


def check_floating(name: str, x: Array) -> None:
    """Raise :class:`DTypeError` (naming ``name``) unless ``x`` has a floating dtype."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(f"{name}: expected a floating dtype, got {x.dtype} (shape {x.shape})")


def check_integer(name: str, x: Array) -> None:
    """Raise :class:`DTypeError` (naming ``name``) unless ``x`` has an integer dtype."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise DTypeError(f"{name}: expected an integer dtype, got {x.dtype} (shape {x.shape})")


def check_bool(name: str, x: Array) -> None:
    """Raise :class:`DTypeError` (naming ``name``) unless ``x`` has the boolean dtype."""
    if x.dtype != jnp.bool_:
        raise DTypeError(f"{name}: expected a boolean dtype, got {x.dtype} (shape {x.shape})")


def check_rank(name: str, x: Array, ranks: Sequence[int], what: str = "") -> None:
    """Raise ValueError (naming ``name``) unless ``x.ndim`` is one of ``ranks``; ``what``, e.g.
    ``"[B, T, N, H]"``, is the expected layout the message shows."""
    if x.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        layout = f" {what}" if what else ""
        raise ValueError(f"{name}: expected rank {want}{layout}, got shape {x.shape}")


class QKVDims(NamedTuple):
    """The sizes :func:`check_qkv` returns: query [B, T, N, H], key [B, S, K, H] and the value
    head dim Hv."""

    B: int
    T: int
    N: int
    H: int
    S: int
    K: int
    Hv: int


def check_qkv(query: Array, key: Array, value: Array, *,
              separate_value_heads: bool = False) -> QKVDims:
    """Validate query [B, T, N, H], key [B, S, K, H], value [B, S, K, Hv] (one floating
    dtype, N % K == 0, T, S > 0) and return their sizes. With ``separate_value_heads`` the
    value may have its own head count Kv (value [B, S, Kv, Hv], N % Kv == 0; DiffQKV)."""
    check_rank("query", query, (4,), "[B, T, N, H]")
    check_rank("key", key, (4,), "[B, S, K, H]")
    check_rank("value", value, (4,), "[B, S, K, Hv]")
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_floating(name, x)
    if not query.dtype == key.dtype == value.dtype:
        raise DTypeError(f"query, key, value: expected one dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}")
    B, T, N, H = query.shape
    _, S, K, _ = key.shape
    if key.shape[0] != B or key.shape[3] != H:
        raise ValueError(f"key: expected [B={B}, S, K, H={H}] to match query {query.shape}, "
                         f"got {key.shape}")
    if separate_value_heads:
        Kv = value.shape[2]
        if value.shape[:2] != key.shape[:2]:
            raise ValueError(f"value: expected [B, S] = {key.shape[:2]} as key, "
                             f"got {value.shape}")
        if Kv == 0 or N % Kv:
            raise ValueError(f"query, value: query heads N={N} must be a multiple of value "
                             f"heads Kv={Kv} (query {query.shape}, value {value.shape})")
    elif value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value: expected [B, S, K] = {key.shape[:3]} as key, "
                         f"got {value.shape}")
    if K == 0 or N % K:
        raise ValueError(f"query, key: query heads N={N} must be a multiple of key/value "
                         f"heads K={K} (query {query.shape}, key {key.shape})")
    if T == 0 or S == 0:
        raise ValueError(f"query, key: lengths must be positive, got T={T}, S={S}")
    return QKVDims(B, T, N, H, S, K, value.shape[3])


def check_spatial_qkv(query: Array, key: Array, value: Array, *,
                      max_spatial_axes: int) -> tuple[tuple[int, ...], tuple[int, ...], QKVDims]:
    """Validate query ``[B, *q_spatial, N, H]``, key ``[B, *k_spatial, K, H]``, value
    ``[B, *k_spatial, K, Hv]`` with 1 to ``max_spatial_axes`` spatial axes (as many for all
    three) and return (q_spatial, k_spatial, the dims of the flattened [B, L, heads, H] views,
    with T and S the flattened lengths)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not 4 <= x.ndim <= 3 + max_spatial_axes:
            raise ValueError(f"{name}: expected [B, *spatial, heads, head_dim] with 1 to "
                             f"{max_spatial_axes} spatial axes, got shape {x.shape}")
    if key.ndim != query.ndim:
        raise ValueError(f"key: expected as many spatial axes as query {query.shape}, "
                         f"got {key.shape}")
    if value.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"value: expected [B, *spatial, K] = {key.shape[:-1]} as key, "
                         f"got {value.shape}")
    flat = [x.reshape(x.shape[0], math.prod(x.shape[1:-2]), *x.shape[-2:])
            for x in (query, key, value)]
    try:
        dims = check_qkv(*flat)
    except (ValueError, TypeError) as error:  # name the grids, not only their flat views
        raise type(error)(f"{error} (flattened from query {query.shape}, key {key.shape}, "
                          f"value {value.shape})") from None
    return tuple(query.shape[1:-2]), tuple(key.shape[1:-2]), dims


def check_shape(name: str, x: Array, expected: Shape, letters: str = "") -> None:
    """Raise ValueError (naming ``name``) unless ``x.shape`` equals ``expected``; ``letters``
    (e.g. ``"BTD"``) name its axes in the message."""
    if tuple(x.shape) != tuple(expected):
        layout = f" [{', '.join(letters)}]" if letters else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{layout}, got {x.shape}")


def check_broadcastable(name: str, shape: Shape, target: Shape, letters: str = "") -> None:
    """Raise unless ``shape`` (same rank as ``target``) broadcasts to ``target`` dim by dim."""
    layout = f" [{', '.join(letters)}]" if letters else ""
    compatible = len(shape) == len(target) and all(
        s in (1, t) for s, t in zip(shape, target, strict=True))
    if not compatible:
        raise ValueError(
            f"{name}: expected a shape broadcastable to {tuple(target)}{layout}, got {tuple(shape)}"
        )


def check_values_in_range(name: str, x: Array, low: int, high: int) -> None:
    """Check ``low <= x <= high`` when ``x`` is concrete; traced values cannot be checked."""
    if not is_concrete(x) or x.size == 0:
        return
    values = np.asarray(x)
    if values.min() < low or values.max() > high:
        raise ValueError(
            f"{name}: values must lie in [{low}, {high}], got min {values.min()} max {values.max()}"
        )


def left_pad_rank(x: Array, rank: int) -> Array:
    """Prepend size-1 axes until ``x`` has ``rank`` dims (numpy broadcasting rules)."""
    return x.reshape((1,) * (rank - x.ndim) + tuple(x.shape))


def accumulation_dtype(dtype) -> jnp.dtype:
    """Scores and softmax statistics: float32 for 16-bit inputs, float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)
