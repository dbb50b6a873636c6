"""KV caches for decoding: explicit state in, new state out.

A :class:`KVCache` holds the keys and values of the tokens seen so far, either all of them
(``window=None``: slot s holds position s, up to ``max_length``) or only the last ``window``
(a ring buffer: position p lives in slot p mod window). :func:`cached_attention` takes the
queries, keys and values of the next T tokens (T = 1 when decoding, T > 1 for a prompt),
attends causally over the cached tokens plus the new ones (within the window, if any), and
returns the output with the cache that now includes the new tokens. A prompt longer than the
window is fine: the new tokens attend to each other before the ring keeps the last ones.
With ``sinks`` the first positions stay visible to every later query and keep slots of their
own beside the ring (attention sinks, as StreamingLLM decodes; Titans MAG's persistent
tokens).

Every sequence in the batch is at the same position (``length`` is a scalar); GQA caches
hold only the K kv heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jattn.core.attention import dot_product_attention
from jattn.core.shapes import Array, check_qkv, check_rank, check_shape, is_concrete


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A pytree whose ``window`` is static (part of the tree structure, not a leaf)."""

    key: Array  # [B, slots, K, H]
    value: Array  # [B, slots, Kv, Hv] (Kv = K unless DiffQKV)
    length: Array  # [] int32, tokens written so far
    window: int | None = dataclasses.field(default=None, metadata={"static": True})
    sinks: int = dataclasses.field(default=0, metadata={"static": True})


def init_cache(batch: int, max_length: int, num_kv_heads: int, head_dim: int, *,
               value_head_dim: int | None = None, num_value_heads: int | None = None,
               window: int | None = None, sinks: int = 0, dtype=jnp.float32) -> KVCache:
    """An empty cache: ``max_length`` slots, or ``sinks + window`` slots: the first
    ``sinks`` positions, always visible, then a ring buffer of the last ``window``.

    Values have ``num_value_heads`` heads of ``value_head_dim`` (default: as the keys);
    DiffQKV (P68) caches fewer key heads than value heads.

    >>> init_cache(2, 16, 1, 8, window=4).key.shape
    (2, 4, 1, 8)
    >>> init_cache(2, 16, 1, 8, window=4, sinks=2).key.shape
    (2, 6, 1, 8)
    """
    if window is not None and window < 1:
        raise ValueError(f"window: expected None or >= 1, got {window}")
    if max_length < 1:
        raise ValueError(f"max_length: expected >= 1, got {max_length}")
    if sinks < 0 or (sinks and window is None):
        raise ValueError(f"sinks: expected 0, or >= 0 with a window (a full cache keeps every "
                         f"position anyway), got sinks={sinks}, window={window}")
    slots = max_length if window is None else sinks + window
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    num_value_heads = num_kv_heads if num_value_heads is None else num_value_heads
    return KVCache(jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype),
                   jnp.zeros((batch, slots, num_value_heads, value_head_dim), dtype),
                   jnp.zeros((), jnp.int32), window, sinks)


def _slot_positions(cache: KVCache) -> Array:
    """The absolute position held by each slot, -1 for an empty slot: [slots]."""
    slots = cache.key.shape[1]
    s = jnp.arange(slots)
    written = jnp.where(s < cache.length, s, -1)
    if cache.window is None:
        return written
    # Ring slot r holds the latest position p >= sinks, p < length, p - sinks = r (mod window).
    sinks, seen = cache.sinks, cache.length - cache.sinks
    latest = sinks + seen - 1 - jnp.mod(seen - 1 - (s - sinks), cache.window)
    return jnp.where(s < sinks, written, jnp.where(latest >= sinks, latest, -1))


def cached_attention(query: Array, key: Array, value: Array, cache: KVCache, *,
                     scale: float | None = None) -> tuple[Array, KVCache]:
    """Causal attention of T new tokens over the cache and themselves; the updated cache.

    Query t (at position length + t) sees every cached or new position p <= length + t, and
    with a window only p > length + t - window or p < sinks.

    Args:
        query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, Kv, Hv] of the new tokens.
        cache: a :class:`KVCache` from :func:`init_cache` or a previous call.
        scale: logit scale (default 1 / sqrt(H)).

    Returns:
        (output [B, T, N, Hv], the cache with the new tokens written).

    Raises:
        ValueError: shapes that do not match the cache, or (full cache) more tokens than it
            has slots left when the length is known.

    >>> import jax.numpy as jnp
    >>> cache = init_cache(1, 8, 1, 4)
    >>> x = jnp.ones((1, 3, 1, 4))
    >>> out, cache = cached_attention(x, x, x, cache)
    >>> out.shape, int(cache.length)
    ((1, 3, 1, 4), 3)
    """
    check_qkv(query, key, value, separate_value_heads=True)
    _check_new_tokens(cache, key, value)
    T = key.shape[1]
    new_positions = cache.length + jnp.arange(T)
    positions = jnp.concatenate([_slot_positions(cache), new_positions])
    keys = jnp.concatenate([cache.key, key.astype(cache.key.dtype)], 1)
    values = jnp.concatenate([cache.value, value.astype(cache.value.dtype)], 1)
    qp, kp = new_positions[:, None], positions[None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if cache.window is not None:
        allowed &= (kp > qp - cache.window) | (kp < cache.sinks)
    out = dot_product_attention(query, keys.astype(query.dtype), values.astype(query.dtype),
                                mask=allowed[None, None], scale=scale)
    return out, write_cache(cache, key, value)


def _check_new_tokens(cache: KVCache, key: Array, value: Array) -> None:
    """New tokens' key [B, T, K, H] and value [B, T, Kv, Hv] match the cache and fit in it
    (a full cache, when its length is known)."""
    check_rank("key", key, (4,), "[B, T, K, H]")
    check_rank("value", value, (4,), "[B, T, Kv, Hv]")
    B, T = cache.key.shape[0], key.shape[1]
    check_shape("key", key, (B, T, *cache.key.shape[2:]), "BTKH")
    check_shape("value", value, (B, T, *cache.value.shape[2:]), "BTKV")
    slots = cache.key.shape[1]
    if cache.window is None and is_concrete(cache.length) and int(cache.length) + T > slots:
        raise ValueError(f"cache: {T} new tokens do not fit: {int(cache.length)} of {slots} "
                         "slots used (use a larger init_cache(max_length=...))")


def write_cache(cache: KVCache, key: Array, value: Array) -> KVCache:
    """The cache with T new tokens' key [B, T, K, H] and value [B, T, Kv, Hv] written at
    positions length .. length + T - 1 (into the ring when windowed). For layers that
    attend to the cache their own way (:func:`jattn.landmark_decode`);
    :func:`cached_attention` writes for itself. ValueError for shapes that do not match the
    cache or (full cache, known length) more tokens than slots left.

    >>> import jax.numpy as jnp
    >>> int(write_cache(init_cache(1, 8, 1, 4), jnp.ones((1, 3, 1, 4)),
    ...                 jnp.ones((1, 3, 1, 4))).length)
    3
    """
    _check_new_tokens(cache, key, value)
    T, slots = key.shape[1], cache.key.shape[1]
    key, value = key.astype(cache.key.dtype), value.astype(cache.value.dtype)
    if cache.window is None:
        # The start index in the slot axis, the others zeros of the length's own dtype (with
        # jax_enable_x64 a Python 0 would be int64 beside the int32 length).
        new_key = lax.dynamic_update_slice_in_dim(cache.key, key, cache.length, axis=1)
        new_value = lax.dynamic_update_slice_in_dim(cache.value, value, cache.length, axis=1)
    else:
        sinks, window = cache.sinks, cache.window
        p = cache.length + jnp.arange(T)
        slot = jnp.where(p < sinks, p, sinks + jnp.mod(p - sinks, window))
        # A ring position that a later new token overwrites is dropped (out-of-bounds slot):
        # each slot is written at most once, so the scatter is deterministic.
        superseded = (p >= sinks) & (p + window <= cache.length + T - 1)
        slot = jnp.where(superseded, slots, slot)
        new_key = cache.key.at[:, slot].set(key, mode="drop")
        new_value = cache.value.at[:, slot].set(value, mode="drop")
    return KVCache(new_key, new_value, cache.length + T, cache.window, cache.sinks)
