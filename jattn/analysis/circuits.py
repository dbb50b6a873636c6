"""Circuit analysis on any model that takes an :class:`~jattn.analysis.Intervention`:
direct logit attribution, head ablation, activation and attribution patching, path patching
and the overlap of two tasks' circuits.

The model-level tools take a ``forward(intervention) -> (output, captures)`` function, e.g.
``lambda iv: model(tokens, intervention=iv)`` for :class:`jattn.nn.TransformerLM`, and a
``metric(output) -> scalar`` (a logit difference, a log-probability of the answer). They
build :class:`~jattn.analysis.Edits` and never touch the model, so they work on any model
that honours the interface, under ``jax.jit``. Edits for several heads are batched with
``jax.vmap`` over the edit arrays: one compiled program per layer, not per head.

References:
    P25 Lieberum et al., "Does circuit analysis interpretability scale? Evidence from
    multiple choice capabilities in Chinchilla" (direct logit attribution, attention
    patterns, activation patching); P32 Merullo et al., "Circuit component reuse across
    tasks in transformer language models" (path patching, shared heads between tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.analysis.intervene import Capture, Edit, Edits, Intervention, select
from jattn.core.shapes import Array, check_rank

Forward = Callable[[Intervention], tuple[Array, dict]]
Metric = Callable[[Array], Array]
ABLATIONS = ("zero", "mean", "query")


def _check_heads(name: str, heads, num_heads: int) -> list[int]:
    heads = [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad:
        raise ValueError(f"{name}: heads {bad} are out of range [0, {num_heads})")
    return heads


def head_ablation(heads: Mapping[int, Sequence[int]], num_heads: int, *, kind: str = "zero",
                  reference: Mapping[int, Mapping[str, Array]] | None = None
                  ) -> dict[int, Edits]:
    """Edits that ablate the given heads of the given layers.

    Args:
        heads: {layer: [head, ...]}.
        num_heads: query heads per layer.
        kind: "zero" (the head's output is 0: gate 0), "mean" (its output is its mean over a
            reference batch, per position: ``reference[layer]["heads"]`` [B, T, N, Hv], as
            captured with ``Capture("heads")``), or "query" (its query is 0, so its attention
            is uniform over the keys it may see: the retrieval-heads paper's masking, P41).

    Returns:
        {layer: Edits}, to pass as ``Intervention(edits=...)``.

    Example:
        >>> edits = head_ablation({1: [0, 2]}, 4)
        >>> edits[1].gate.tolist()
        [0.0, 1.0, 0.0, 1.0]

    References:
        P25 (zero and mean ablation), P41 (query-zero masking).
    """
    if kind not in ABLATIONS:
        raise ValueError(f"kind: expected one of {ABLATIONS}, got {kind!r}")
    out = {}
    for layer, chosen in heads.items():
        chosen = _check_heads(f"heads[{layer}]", chosen, num_heads)
        if kind == "zero":
            out[layer] = Edits(gate=1.0 - select((num_heads,), a0=chosen))
        elif kind == "query":
            out[layer] = Edits(query=Edit(values=jnp.zeros(()),
                                          where=select((1, 1, num_heads, 1), a2=chosen)))
        else:
            if reference is None or layer not in reference or "heads" not in reference[layer]:
                raise ValueError(f"reference: mean ablation needs reference[{layer}]['heads'] "
                                 "(capture 'heads' on a reference batch)")
            ref = jnp.asarray(reference[layer]["heads"])
            check_rank(f"reference[{layer}]['heads']", ref, (4,), "[B, T, N, Hv]")
            out[layer] = Edits(heads=Edit(values=ref.mean(0, keepdims=True),
                                          where=select((1, 1, num_heads, 1), a2=chosen)))
    return out


def activation_patching(forward: Forward, source: Mapping[int, Mapping[str, Array]],
                        metric: Metric, *, layers: Sequence[int], num_heads: int | None = None,
                        over: str = "heads") -> Array:
    """The metric of runs with one component replaced by its value from another run.

    Run ``forward`` (say, on corrupted input) with, in turn, each head's output
    (``over="heads"``) or each position of the residual stream entering a layer
    (``over="positions"``) set to its value in ``source`` (the captures of, say, the
    clean run: ``Capture(("heads", "residual"))``).

    Args:
        forward: ``intervention -> (output, captures)``.
        source: {layer: {"heads": [B, T, N, Hv]} or {"residual": [B, T, d]}}.
        metric: ``output -> scalar``.
        layers: the layers to patch.
        num_heads: query heads per layer (``over="heads"``).
        over: "heads" or "positions".

    Returns:
        [len(layers), N] for heads, [len(layers), T] for positions, float32.

    References:
        P25 (activation patching), P32.
    """
    if over not in ("heads", "positions"):
        raise ValueError(f"over: expected 'heads' or 'positions', got {over!r}")
    tensor = "heads" if over == "heads" else "residual"
    rows = []
    for layer in layers:
        if layer not in source or tensor not in source[layer]:
            raise ValueError(f"source: no {tensor!r} captured for layer {layer}")
        values = jnp.asarray(source[layer][tensor])
        if over == "heads":
            if num_heads is None:
                raise ValueError("num_heads: needed to patch over heads")
            wheres = jnp.stack([select((1, 1, num_heads, 1), a2=[h]) for h in range(num_heads)])

            def run(where, layer=layer, values=values):
                edit = Edits(heads=Edit(values=values, where=where))
                return metric(forward(Intervention(edits={layer: edit}))[0])
        else:
            T = values.shape[1]
            wheres = jnp.stack([select((1, T, 1), a1=[t]) for t in range(T)])

            def run(where, layer=layer, values=values):
                edit = Edits(residual=Edit(values=values, where=where))
                return metric(forward(Intervention(edits={layer: edit}))[0])
        rows.append(jax.vmap(run)(wheres))
    return jnp.stack(rows).astype(jnp.float32)


def gate_attribution(forward: Forward, metric: Metric, *, layers: Sequence[int],
                     num_heads: int) -> Array:
    """Attribution patching for free: d metric / d gate of every head at gate 1.

    To first order, a head's entry is the change of the metric when the head is ablated,
    negated (metric(gate 0) - metric(gate 1) ~ -attribution), for the cost of one backward
    pass over all heads.

    Returns:
        [len(layers), N] float32.

    References:
        P25; the continuous gate of ../shared/notes/analysis.md.
    """
    def run(gates):
        edits = {layer: Edits(gate=g) for layer, g in zip(layers, gates, strict=True)}
        return metric(forward(Intervention(edits=edits))[0])

    return jax.grad(run)(jnp.ones((len(layers), num_heads), jnp.float32))


def direct_logit_attribution(components: Array, final_residual: Array, unembed: Array, *,
                             norm: str = "layernorm", norm_scale: Array | None = None,
                             epsilon: float = 1e-6) -> Array:
    r"""Each component's direct contribution to the logits, through the final norm with its
    scale frozen at the value the whole stream gave it.

    The residual stream before the final norm is a sum of components (embedding, each
    head's output projected by its slice of W_O, the MLPs' outputs, biases). LayerNorm is
    linear in its input once the standard deviation :math:`\sigma` of the full stream is
    fixed: component :math:`c` contributes
    :math:`((c - \bar c) / \sigma) \odot g \, W_U` (RMSNorm: :math:`c / \mathrm{rms} \odot g
    \, W_U`), and the components' contributions plus the norm's bias term sum to the logits.

    Args:
        components: [..., C, d]: C components of the stream at the same positions.
        final_residual: [..., d]: the full stream (their sum, and anything not listed).
        unembed: [d, V].
        norm: "layernorm" or "rmsnorm".
        norm_scale: [d] (g); None = ones.
        epsilon: the norm's epsilon.

    Returns:
        [..., C, V] float32.

    Example:
        >>> import jax.numpy as jnp
        >>> c = jnp.array([[1.0, 0.0], [0.0, 3.0]])
        >>> direct_logit_attribution(c, c.sum(0), jnp.eye(2), epsilon=0.0).tolist()
        [[0.5, -0.5], [-1.5, 1.5]]

    References:
        P25 (direct logit attribution with the final norm's scale frozen).
    """
    if norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm: expected 'layernorm' or 'rmsnorm', got {norm!r}")
    components, final_residual, unembed = (jnp.asarray(x, jnp.float32)
                                           for x in (components, final_residual, unembed))
    check_rank("unembed", unembed, (2,), "[d, V]")
    d = unembed.shape[0]
    if components.shape[-1] != d or final_residual.shape[-1] != d:
        raise ValueError(f"components, final_residual: expected a last axis of d={d}, got "
                         f"{components.shape} and {final_residual.shape}")
    if norm == "layernorm":
        centred = final_residual - final_residual.mean(-1, keepdims=True)
        sigma = jnp.sqrt((centred ** 2).mean(-1) + epsilon)
        components = components - components.mean(-1, keepdims=True)
    else:
        sigma = jnp.sqrt((final_residual ** 2).mean(-1) + epsilon)
    scaled = components / sigma[..., None, None]
    if norm_scale is not None:
        scaled = scaled * jnp.asarray(norm_scale, jnp.float32)
    return scaled @ unembed


def path_patching(forward: Forward, clean: Mapping[int, Mapping[str, Array]],
                  corrupt: Mapping[int, Mapping[str, Array]], metric: Metric, *,
                  sender: tuple[int, int], receiver: tuple[int, int], tensor: str = "query",
                  num_heads: int) -> Array:
    """The metric of the clean run when only the path sender head -> receiver head's
    query, key or value carries the corrupted signal.

    Two runs. First, the sender's output is set to its corrupted value while everything
    between sender and receiver that could carry the change further (the attention and MLP
    branches of the sender's layer after it and of the layers in between) is frozen to the
    clean run: the receiver's input then differs from the clean one by the sender's direct
    path only; its ``tensor`` is captured. Second, the clean run with only the receiver's
    ``tensor`` replaced by that capture.

    Args:
        forward: ``intervention -> (output, captures)`` of the clean input.
        clean, corrupt: captures {layer: {"heads", "attention", "mlp"}} of the clean and the
            corrupted runs (``Capture(("heads", "attention", "mlp"))``, all rows).
        metric: ``output -> scalar``.
        sender: (layer, query head); receiver: (layer, head) with a later layer; the head
            is a query head for "query" and a key/value head for "key"/"value" (GQA).
        tensor: "query", "key" or "value".
        num_heads: query heads per layer.

    Returns:
        The metric, a float32 scalar.

    References:
        P32 (path patching: sender -> receiver q/k/v), P25.
    """
    if tensor not in ("query", "key", "value"):
        raise ValueError(f"tensor: expected 'query', 'key' or 'value', got {tensor!r}")
    (ls, hs), (lr, hr) = sender, receiver
    if not ls < lr:
        raise ValueError(f"receiver: its layer must come after the sender's, got sender "
                         f"{sender}, receiver {receiver}")
    _check_heads("sender", [hs], num_heads)
    needed = [("corrupt", corrupt, ls, "heads"), ("clean", clean, ls, "mlp")]
    needed += [("clean", clean, layer, name) for layer in range(ls + 1, lr)
               for name in ("attention", "mlp")]
    for run, captures, layer, name in needed:
        if layer not in captures or name not in captures[layer]:
            raise ValueError(f"{run}: no {name!r} captured for layer {layer}")
    edits = {ls: Edits(heads=Edit(values=corrupt[ls]["heads"],
                                  where=select((1, 1, num_heads, 1), a2=[hs])),
                       mlp=Edit(values=clean[ls]["mlp"]))}
    for layer in range(ls + 1, lr):
        edits[layer] = Edits(attention=Edit(values=clean[layer]["attention"]),
                             mlp=Edit(values=clean[layer]["mlp"]))
    _, captured = forward(Intervention(edits=edits, capture=Capture(tensor, layers=(lr,))))
    patched = captured[lr][tensor]
    n = num_heads if tensor == "query" else patched.shape[2]
    _check_heads("receiver", [hr], n)
    edit = Edit(values=patched, where=select((1, 1, n, 1), a2=[hr]))
    output, _ = forward(Intervention(edits={lr: Edits(**{tensor: edit})}))
    return jnp.asarray(metric(output), jnp.float32)


def top_heads(scores: Array, k: int) -> set[tuple[int, int]]:
    """The k (layer, head) pairs of largest ``|score|`` in a [L, N] table."""
    scores = np.abs(np.asarray(scores, np.float64))
    if scores.ndim != 2:
        raise ValueError(f"scores: expected [L, N], got shape {scores.shape}")
    if not 1 <= k <= scores.size:
        raise ValueError(f"k: expected 1 <= k <= {scores.size}, got {k}")
    order = np.argsort(-scores, axis=None, kind="stable")[:k]
    return {tuple(int(i) for i in np.unravel_index(j, scores.shape)) for j in order}


def circuit_overlap(scores_a: Array, scores_b: Array, k: int) -> float:
    """The fraction of shared heads among two tasks' top-k heads by ``|score|`` (e.g. patching
    effects or attributions, [L, N] each): ``|top_a & top_b| / k``.

    Example:
        >>> circuit_overlap([[3.0, 0.0], [1.0, 2.0]], [[0.0, 3.0], [1.0, 2.0]], 2)
        0.5

    References:
        P32 (78% of the important heads shared between two tasks).
    """
    if np.shape(scores_a) != np.shape(scores_b):
        raise ValueError(f"scores_a, scores_b: expected the same [L, N] shape, got "
                         f"{np.shape(scores_a)} and {np.shape(scores_b)}")
    return len(top_heads(scores_a, k) & top_heads(scores_b, k)) / k
