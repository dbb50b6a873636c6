"""See inside an attention layer and change it: one interface for the functional primitive
and the NNX modules, pure and jit-safe.

An :class:`Intervention` pairs a static :class:`Capture` (what to read: which layers,
heads, query rows and tensors) with an array-valued :class:`Edits` pytree (what to change).
It is itself a pytree whose only leaves are the edits' arrays, so a jitted function that
takes it compiles once per capture spec and edit structure, whatever the edit values, and
``jax.grad`` with respect to the edits works: the gradient of a metric with respect to the
head gate at 1 is attribution patching.

Where the tensors live, for a layer with N query heads over [B, T] queries and [B, S] keys:

* ``"query"`` [B, T, N, H], ``"key"`` [B, S, K, H], ``"value"`` [B, S, Kv, Hv]: the
  projected heads that enter attention (after rotary embeddings);
* ``"weights"`` [B, N, T, S]: the softmax weights (exact, from the forward's log-sum-exp,
  only the captured rows: :func:`jattn.attention_weights`);
* ``"heads"`` [B, T, N, Hv]: each head's output before the output projection mixes them;
* block level (:class:`jattn.nn.TransformerLM`): ``"residual"`` [B, T, d], the block's
  input stream (layer ``num_layers``: the final stream, the input of the final norm);
  ``"attention"`` and ``"mlp"`` [B, T, d], what each branch adds to the stream.

Captured tensors keep only the captured heads (query-side tensors) and query rows; "key"
and "value" are returned whole (their heads are shared under GQA).

Edits, in the order applied: ``query``/``key``/``value`` patches, ``logit_bias`` added to
the logits, attention, ``sinks``/``sink_scale`` calibration of the weights, the ``heads``
patch, then the per-head ``gate``; in a model's block, ``residual`` before the layer and
``attention`` / ``mlp`` on what the branches add. A patch (:class:`Edit`) replaces a tensor by
``(1 - where) * x + where * values`` and adds ``delta``: with the run's own values it is the
identity, with a corrupted run's values it is activation patching, with where in (0, 1) an
interpolation.

References:
    P25 (capture, ablation and patching), P32 (path patching through q/k/v edits), P41
    (query-zero ablation), P50 (sink calibration), P62 (logit re-weighting); the design
    against the complaints of hook-based tools: ../shared/notes/analysis.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import masks as _masks
from jattn.core.attention import attention_weights, dot_product_attention
from jattn.core.shapes import Array, check_bool, check_floating, check_rank

#: The tensors a capture can read inside an attention layer.
ATTENTION_TENSORS = ("query", "key", "value", "weights", "heads")
#: The tensors a capture can read around a Transformer block.
BLOCK_TENSORS = ("residual", "attention", "mlp")
#: Every tensor name a :class:`Capture` accepts.
TENSORS = ATTENTION_TENSORS + BLOCK_TENSORS

# dot_product_attention's keywords that also define the weights (attention_weights takes them)
_WEIGHT_OPTIONS = ("scale", "is_causal", "query_seq_lengths", "key_value_seq_lengths",
                   "local_window_size", "query_segment_ids", "kv_segment_ids",
                   "logits_soft_cap")


def _index_tuple(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value,)
    out = tuple(int(v) for v in value)
    if not out or any(v < 0 for v in out) or len(set(out)) != len(out):
        raise ValueError(f"{name}: expected one or more distinct indices >= 0 (None for "
                         f"all), got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Capture:
    """What to read out of a run (static: part of the compiled program).

    Args:
        tensors: names from :data:`TENSORS`.
        layers: the layers to capture (models with layers); None = every layer (attention
            tensors from the layers that have softmax attention).
        heads: the query heads of "query", "weights" and "heads"; None = all.
        query_positions: the query rows of every tensor but "key" and "value"; None = all.

    Example:
        >>> Capture(("weights", "heads"), heads=[0, 2], query_positions=[7])
        Capture(tensors=('weights', 'heads'), layers=None, heads=(0, 2), query_positions=(7,))
    """

    tensors: tuple[str, ...] = ("weights",)
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    query_positions: tuple[int, ...] | None = None

    def __post_init__(self):
        tensors = (self.tensors,) if isinstance(self.tensors, str) else tuple(self.tensors)
        unknown = [t for t in tensors if t not in TENSORS]
        if unknown or not tensors:
            raise ValueError(f"tensors: expected names from {TENSORS}, got {self.tensors!r}")
        object.__setattr__(self, "tensors", tensors)
        for name in ("layers", "heads", "query_positions"):
            object.__setattr__(self, name, _index_tuple(name, getattr(self, name)))

    def check(self, *, num_heads: int, length: int, num_layers: int | None = None) -> None:
        """Raise ValueError naming the field that does not fit the model or the input."""
        for name, index, size in (("heads", self.heads, num_heads),
                                  ("query_positions", self.query_positions, length),
                                  ("layers", self.layers, num_layers)):
            if index is not None and size is not None and max(index) >= size:
                raise ValueError(f"capture.{name}: {max(index)} is out of range [0, {size})")

    def rows(self, x: Array, axis: int) -> Array:
        """``x`` at the captured query rows along ``axis``."""
        if self.query_positions is None:
            return x
        return jnp.take(x, jnp.asarray(self.query_positions, jnp.int32), axis=axis)

    def select_heads(self, x: Array, axis: int) -> Array:
        """``x`` at the captured heads along ``axis``."""
        if self.heads is None:
            return x
        return jnp.take(x, jnp.asarray(self.heads, jnp.int32), axis=axis)


class Edit(NamedTuple):
    """A patch of one tensor x: ``(1 - where) * x + where * values + delta``.

    Every field broadcasts against the tensor; ``where`` defaults to 1 (replace everywhere)
    when ``values`` is given. Build the ``where`` of chosen heads and positions with
    :func:`select`.
    """

    values: Array | None = None
    where: Array | None = None
    delta: Array | None = None

    def apply(self, x: Array) -> Array:
        dtype = x.dtype
        if self.values is not None:
            values = jnp.asarray(self.values, x.dtype)
            x = x + (values - x) if self.where is None else x + self.where * (values - x)
        if self.delta is not None:
            x = x + self.delta
        return x.astype(dtype)


class Edits(NamedTuple):
    """Array-valued changes to one attention layer (every field optional).

    Args:
        gate: per-head multiplicative gate on the head outputs, [N] or [B, N]; 0 ablates a
            head, 1 leaves it, and its gradient at 1 is attribution patching.
        logit_bias: added to the logits, broadcastable to [B, N, T, S] (e.g. [N, 1, S]: per
            head and key position).
        sinks: bool, broadcastable to [B, N, S]: keys whose weight ``sink_scale`` rescales.
        sink_scale: [N]: in each row the sink keys' weights are multiplied by it and the
            freed (or taken) mass is shared by the other keys in proportion to their
            weights (P50's calibration); 1 leaves a head alone.
        query, key, value: :class:`Edit` of the projected heads entering attention.
        heads: :class:`Edit` of the per-head outputs [B, T, N, Hv].
        residual: :class:`Edit` of a block's input stream [B, T, d] (models only).
        attention, mlp: :class:`Edit` of what a block's attention and MLP branches add to
            the stream [B, T, d] (models only; freezing them to a clean run's values keeps
            a patched signal on its direct path, as path patching needs).
    """

    gate: Array | None = None
    logit_bias: Array | None = None
    sinks: Array | None = None
    sink_scale: Array | None = None
    query: Edit | None = None
    key: Edit | None = None
    value: Edit | None = None
    heads: Edit | None = None
    residual: Edit | None = None
    attention: Edit | None = None
    mlp: Edit | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervention:
    """What to capture (static) and what to edit (arrays) in a run.

    ``edits`` is one :class:`Edits` for a single layer (:func:`attend`,
    :class:`jattn.nn.MultiHeadAttention`) or a mapping {layer: Edits} for a model
    (:class:`jattn.nn.TransformerLM`). A call given an intervention returns
    ``(what it returns without one, captures)``.

    Example:
        >>> import jax.numpy as jnp
        >>> iv = Intervention(capture=Capture("heads"), edits=Edits(gate=jnp.ones(4)))
        >>> [x.shape for x in jax.tree_util.tree_leaves(iv)]
        [(4,)]
    """

    edits: Any = None
    capture: Capture | None = dataclasses.field(default=None, metadata=dict(static=True))

    def for_layer(self, layer: int, num_layers: int) -> Intervention | None:
        """The single-layer intervention of ``layer`` in a model of ``num_layers`` layers."""
        edits = self.edits
        if edits is not None:
            if not isinstance(edits, Mapping):
                raise ValueError("intervention: a model's edits are a mapping {layer: Edits}, "
                                 f"got {type(edits).__name__}")
            bad = [k for k in edits if not (isinstance(k, int) and 0 <= k < num_layers)]
            if bad:
                raise ValueError(f"intervention: edits for layers {bad} that do not exist "
                                 f"(the model has {num_layers})")
            edits = edits.get(layer)
        capture = self.capture
        if capture is not None:
            capture.check(num_heads=None, length=None, num_layers=num_layers + 1)
            if capture.layers is not None and layer not in capture.layers:
                capture = None
        if edits is None and capture is None:
            return None
        return Intervention(edits=edits, capture=capture)


def select(shape: tuple[int, ...], **index) -> Array:
    """A float 0/1 ``where`` of ``shape`` that is 1 at the given indices of named axes.

    ``shape`` names its axes by position; pass each index as ``axis_number=indices``, e.g.
    heads 1 and 3 at position 5 of a [B, T, N, Hv] tensor:
    ``select((1, T, N, 1), a1=[5], a2=[1, 3])``.

    Example:
        >>> select((1, 3, 2, 1), a2=[1])[0, :, :, 0].tolist()
        [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
    """
    out = jnp.ones(shape, jnp.float32)
    for name, indices in index.items():
        axis = int(name.removeprefix("a"))
        if not name.startswith("a") or not 0 <= axis < len(shape):
            raise ValueError(f"{name}: expected a{{axis}} with axis in [0, {len(shape)})")
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and not (0 <= indices.min() and indices.max() < shape[axis]):
            raise ValueError(f"{name}: indices {indices.tolist()} out of range "
                             f"[0, {shape[axis]})")
        hit = jnp.zeros(shape[axis], jnp.float32).at[jnp.asarray(indices)].set(1.0)
        out = out * hit.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return out


def _check_edits(edits: Edits, *, B: int, N: int, T: int, S: int) -> None:
    if not isinstance(edits, Edits):
        raise ValueError(f"intervention: a layer's edits are an Edits, got {type(edits).__name__}")
    if edits.gate is not None:
        gate = jnp.asarray(edits.gate)
        if gate.shape not in ((N,), (B, N), (1, N)):
            raise ValueError(f"edits.gate: expected shape [{N}] or [{B}, {N}], got {gate.shape}")
    if edits.sink_scale is not None or edits.sinks is not None:
        if edits.sink_scale is None or edits.sinks is None:
            raise ValueError("edits.sinks, edits.sink_scale: give both or neither")
        if jnp.shape(edits.sink_scale) not in ((N,), (1,), ()):
            raise ValueError(f"edits.sink_scale: expected shape [{N}], got "
                             f"{jnp.shape(edits.sink_scale)}")
        sinks = jnp.asarray(edits.sinks)
        check_bool("edits.sinks", sinks)
        try:
            jnp.broadcast_shapes(sinks.shape, (B, N, S))
        except ValueError:
            raise ValueError(f"edits.sinks: expected a shape broadcastable to [{B}, {N}, {S}], "
                             f"got {sinks.shape}") from None
    if edits.logit_bias is not None:
        check_floating("edits.logit_bias", jnp.asarray(edits.logit_bias))


def _heads_last(x: Array, B: int) -> Array:
    """A per-head array [N] or [B, N] as [B | 1, 1, N, 1] (against [B, T, N, Hv])."""
    x = jnp.asarray(x)
    return x.reshape(x.shape[0] if x.ndim == 2 else 1, 1, x.shape[-1], 1)


def _calibrated(query, key, value, bias, mask, edits: Edits, options: dict):
    """Attention with the sinks' weights scaled per head (``edits.sinks``,
    ``edits.sink_scale``) and the freed mass given to the other keys in proportion.

    Two passes, over the sinks and over the other keys, so that neither part is a difference
    of nearly equal numbers when the sinks hold almost all of a row; a row with no other key
    is left as it is (nothing can take the mass).

    Returns:
        (output [B, T, N, Hv], the uncalibrated lse [B, N, T], (per-head scale [B|1, N, T],
        factor of the other keys' weights [B, N, T], sinks [B, N, S])).
    """
    B, _, N, _ = query.shape
    S = key.shape[1]
    sinks = jnp.broadcast_to(jnp.asarray(edits.sinks), (B, N, S))[:, :, None, :]
    parts = []
    for part in (sinks, ~sinks):
        part_mask = _masks.dense(part) if isinstance(mask, _masks.Mask) else part
        parts.append(dot_product_attention(
            query, key, value, bias, part_mask if mask is None else mask & part_mask,
            return_lse=True, **options))
    (sink_out, sink_lse), (rest_out, rest_lse) = parts
    # masses and lse from the two lse's, finite (and with finite gradients) in every case
    has_sink, has_rest = sink_lse > -jnp.inf, rest_lse > -jnp.inf
    both = has_sink & has_rest
    gap = jnp.where(both, sink_lse - rest_lse, 0.0)
    sink_mass = jnp.where(both, jax.nn.sigmoid(gap), has_sink.astype(gap.dtype))
    rest_mass = jnp.where(both, jax.nn.sigmoid(-gap), has_rest.astype(gap.dtype))
    base = jnp.where(has_rest, rest_lse, jnp.where(has_sink, sink_lse, 0.0))
    lse = jnp.where(has_sink | has_rest, base + jnp.where(both, jax.nn.softplus(gap), 0.0),
                    -jnp.inf)
    scale = jnp.broadcast_to(jnp.asarray(edits.sink_scale, gap.dtype), (N,))
    scale = jnp.where(has_rest, scale[None, :, None], 1.0)
    new_sink = scale * sink_mass
    new_rest = jnp.where(has_rest, 1.0 - new_sink, 0.0)
    factor = new_rest / jnp.where(rest_mass > 0, rest_mass, 1.0)
    a, r = (jnp.swapaxes(x, 1, 2)[..., None] for x in (new_sink, new_rest))
    out = a * sink_out.astype(a.dtype) + r * rest_out.astype(a.dtype)
    return out.astype(value.dtype), lse, (scale, factor, sinks[:, :, 0, :])


def attend(query, key, value, bias=None, mask=None, *, intervention: Intervention | None = None,
           **options):
    """:func:`jattn.dot_product_attention` with an :class:`Intervention`.

    Args:
        query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, Kv, Hv].
        bias, mask: as in :func:`jattn.dot_product_attention`.
        **options: as in :func:`jattn.dot_product_attention` (any implementation;
            ``return_lse``/``return_residual`` are not taken).
        intervention: None, or an :class:`Intervention` with a single layer's
            :class:`Edits` and a :class:`Capture` (whose ``layers`` must be None).

    Returns:
        The pair ``(output, captures)``: output [B, T, N, Hv] per head, before any output
        projection, and captures, a dict from tensor name to array.

    Raises:
        ValueError: heads or rows out of range, malformed edits.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> q = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
        >>> iv = Intervention(Edits(gate=jnp.array([1.0, 0.0])), Capture("weights", heads=[1]))
        >>> out, cap = attend(q, q, q, is_causal=True, intervention=iv)
        >>> float(jnp.abs(out[:, :, 1]).max()), cap["weights"].shape
        (0.0, (1, 1, 6, 6))

    References:
        P25, P32, P50, P62 (module docstring).
    """
    for name in ("return_lse", "return_residual"):
        if options.pop(name, False):
            raise ValueError(f"{name}: attend returns (output, captures); ask for "
                             "capture=Capture('weights') instead")
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_rank(name, x, (4,), "[B, T, N, H] (key, value: [B, S, K, H])")
    B, T, N, _ = query.shape
    S = key.shape[1]
    intervention = intervention or Intervention()
    edits = Edits() if intervention.edits is None else intervention.edits
    capture = intervention.capture
    _check_edits(edits, B=B, N=N, T=T, S=S)
    for name in ("residual", "attention", "mlp"):
        if getattr(edits, name) is not None:
            raise ValueError(f"edits.{name}: a block-level edit; give it to a model "
                             "(jattn.nn.TransformerLM), not to one attention layer")
    if capture is not None:
        if capture.layers is not None:
            raise ValueError("capture.layers: a single attention layer has no layers to "
                             "choose (give layers to a model)")
        capture.check(num_heads=N, length=T)
        block = [t for t in capture.tensors if t in BLOCK_TENSORS]
        if block:
            raise ValueError(f"capture.tensors: {block} are a model's block tensors, not one "
                             "attention layer's")

    if edits.query is not None:
        query = edits.query.apply(query)
    if edits.key is not None:
        key = edits.key.apply(key)
    if edits.value is not None:
        value = edits.value.apply(value)
    if edits.logit_bias is not None:
        logit_bias = jnp.asarray(edits.logit_bias)
        bias = logit_bias if bias is None else jnp.asarray(bias) + logit_bias
    if edits.sinks is None:
        out, lse = dot_product_attention(query, key, value, bias, mask, return_lse=True,
                                         **options)
        keep = None
    else:
        out, lse, keep = _calibrated(query, key, value, bias, mask, edits, options)
    weight_options = {k: v for k, v in options.items() if k in _WEIGHT_OPTIONS}

    captures = {}
    tensors = () if capture is None else capture.tensors
    if "weights" in tensors:
        weights = attention_weights(query, key, bias, mask, lse=lse, heads=capture.heads,
                                    query_positions=capture.query_positions,
                                    **weight_options)
        if keep is not None:
            scale, factor, sinks = (capture.select_heads(a, 1) for a in keep)
            scale, factor = (capture.rows(a, 2)[..., None] for a in (scale, factor))
            weights = weights * jnp.where(sinks[:, :, None, :], scale, factor)
        captures["weights"] = weights
    if edits.heads is not None:
        out = edits.heads.apply(out)
    if edits.gate is not None:
        out = out * _heads_last(edits.gate, B).astype(out.dtype)
    for name, x in (("query", query), ("key", key), ("value", value), ("heads", out)):
        if name in tensors:
            if name in ("query", "heads"):
                x = capture.rows(capture.select_heads(x, 2), 1)
            captures[name] = x
    return out, captures
