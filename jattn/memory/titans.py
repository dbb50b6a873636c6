"""Titans neural long-term memory: an MLP whose weights are trained at test time.

The memory M is a small per-head MLP. Each token writes (k_t, v_t) by one step of gradient
descent with momentum and weight decay on the associative loss, and reads with a query:

    l(M; x_t)  = || M(k_t) - v_t ||^2
    S_t        = eta_t S_{t-1} - theta_t grad_M l(M_{t-1}; x_t)
    M_t        = (1 - alpha_t) M_{t-1} + S_t
    y_t        = M_t(q_t)                      (see "Order of operations")

(paper Sec. 3.1, Eqs. 11-15), with q_t, k_t, v_t projections of x_t (SiLU, short causal
depthwise convolution, l2-normalised q and k) and data-dependent gates theta_t = max_lr
sigmoid(.) (inner learning rate), eta_t = sigmoid(.) (momentum), alpha_t = sigmoid(.)
(forgetting; one scalar per head, or one value per output unit of every memory layer with
``channelwise_forget``). The gates are per token, or with ``gate_granularity="chunk"`` per
chunk: every token of a chunk uses the gates of the chunk's first token (causal, unlike a
chunk mean; see :func:`chunk_gates`).

Memory network (``memory_depth`` L_M): L_M = 1 is a matrix, M(x) = x W (the linear memory,
a delta rule with momentum and decay); L_M >= 2 is the paper's default
M(x) = x + LN(W_L gelu(... gelu(x W_1) ...)) with hidden width ``memory_expansion * H`` and
a LayerNorm whose gain and bias are memory weights too (updated by the inner loop). The
initial memory weights are outer-loop parameters, one set per head.

Order of operations (the reading chosen here, ``retrieve="after"``, the default): token t
first writes (k_t, v_t), then reads y_t = M_t(q_t) with the weights that include its own
update, as linear attention, DeltaNet and TTT do and as the paper's chunk-wise Eqs. 16-18
produce M_t from the gradients of tokens <= t. ``retrieve="before"`` reads y_t = M_{t-1}(q_t)
(the paper's MAC retrieval h_t = M*_{t-1}(q_t)).

Implementations:

* ``"sequential"``: the token-by-token recurrence above, a ``lax.scan`` over tokens with
  ``jax.grad`` of the inner loss at M_{t-1}.
* ``"chunked"`` (paper Eqs. 16-18): the sequence is cut into chunks of ``chunk_size`` tokens
  and every gradient in a chunk is taken at the chunk-start weights M_{t'} (t' = t - t mod b);
  chunk_size = 1 is exactly the sequential recurrence. Inside a chunk every weight
  matrix's per-token gradient is an outer product a_j^T delta_j (layer input times the
  gradient at the layer's output), so nothing per token is materialised. With
  w_j = -theta_j c_j u_j (token j's gradient u_j times its learning rate and clamp factor,
  which depend on the chunk-start weights), the momentum recurrence S_i = eta_i S_{i-1} + w_i
  is solved for its coefficients on the basis (S_0, w_1..w_b) with
  ``jax.lax.associative_scan``, and the decay is folded in by a second scan
  (M_i = (1 - alpha_i) M_{i-1} + S_i) on the basis (M_0, S_0, w_1..w_b): these coefficients
  depend on the gates only, so with a per-head forget gate they are computed for all chunks
  at once before the chunk scan (inside it with a channel-wise gate, whose coefficients for
  all chunks would be T C (b + 2) numbers per head). M_i(q_i) is evaluated layer by layer in
  the dual form q_i M_i = c^M_i q_i M_0 + c^S_i q_i S_0 - sum_j c_ij (q_i . a_j) theta_j c_j
  delta_j, which costs O(b^2 (H + E)) per layer and chunk. A ``lax.scan`` (rematerialised
  per chunk) carries (M, S) across chunks. A last partial chunk is zero-padded and its state
  read at its last real token: row i of the coefficients involves tokens <= i only, so the
  padding never reaches the state or the outputs (no token is dropped, none is invented).
  With ``chunk_size=1`` (the exact recurrence) the same machinery runs in chunks of
  ``EXACT_CHUNK`` tokens, but token i's gradient is taken at M_{i-1}: a scan over the
  chunk's tokens reads M_{i-1}(k_i) in the dual form from the earlier tokens' factors
  (a_j, theta_j c_j delta_j), so no weight-sized array is written per token (the
  token-by-token scan writes M and S at every token: forward+backward is about 3x faster
  at 4k tokens, docs/titans.md).

GELU is evaluated as h (1 + erf(h / sqrt(2))) / 2 (``jax.nn.gelu(approximate=False)``
uses erfc, which costs several times as much on CPU; they differ by rounding only).

Numerical guards: gates are sigmoids, so every coefficient of the chunked form is a product
of numbers in [0, 1] or a sum of at most b + 1 of them (no division, no ratio of cumulative
products that could overflow on its own; a gate equal to 0 is exact). The inner dynamics can
still diverge: gradient descent with momentum diverges when theta * curvature / (1 - eta) is
too large, the frozen gradients of a chunk add up (a chunk
acts like one step with the sum of its tokens' learning rates), and the deep memory's
LayerNorm scales its weight gradients by 1 / std of its input, which grows without bound as
forgetting shrinks the weights (seen with this module's initialisation at D = 64, 4 heads of
16, random inputs, theta = 0.01, eta = 0.9, chunk 16: inf after a few hundred tokens).
``max_grad_norm`` clamps every token's gradient to that global norm (over all memory weights
of the head) before it enters the momentum, which bounds ``|S| <= theta c / (1 - eta)`` and
``|M| <= |M_0| + theta c / ((1 - eta) alpha)``: use it for long sequences (tested finite at
16k tokens in float32). It bounds the forward pass, not the outer gradient: on a long run of one
repeated token the clamped steps of the deep memory keep overshooting the pair's minimum,
and the outer gradient grows with every write (8e18 after 1024 writes of one pair at
theta 0.1, eta 0.9, against 45 without the clamp and 21 at theta 0.01; docs/titans.md).

References:
    P37 Titans: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn.core.shapes import Array, check_floating, check_int, check_rank, check_shape
from jattn.mixers.conv import conv_history, short_causal_conv

GATE_GRANULARITIES = ("token", "chunk")
LAYER_NORM_EPS = 1e-5  # the memory's LayerNorm: (h - mean) / sqrt(var + eps)
L2_NORM_EPS = 1e-6  # q / sqrt(|q|^2 + eps)
# "chunked" with chunk_size = 1 (the exact recurrence) works in chunks of this many tokens:
# one weight-sized write per chunk, O(EXACT_CHUNK) dual-form work per token.
EXACT_CHUNK = 16


class MemoryWeights(NamedTuple):
    """Weights of the memory MLP (or its momentum), with leading dims ``lead`` ([N] in the
    parameters, [B, N] in a state).

    - matrices: L_M matrices, x @ W: ``[*lead, H, E]``, ``[*lead, E, E]``, ...,
      ``[*lead, E, H]`` (L_M = 1: one ``[*lead, H, H]``).
    - scale, bias: ``[*lead, H]``, the LayerNorm gain and bias (None when L_M = 1).
    """

    matrices: tuple[Array, ...]
    scale: Array | None = None
    bias: Array | None = None


class NeuralMemoryState(NamedTuple):
    """What a call leaves for the next one.

    - weights: MemoryWeights with leaves [B, N, ...], the memory M_T.
    - momentum: MemoryWeights with leaves [B, N, ...], the surprise S_T.
    - conv: [B, conv_size - 1, 3 N H], the last pre-convolution q|k|v projections (None
      without a convolution).
    """

    weights: MemoryWeights
    momentum: MemoryWeights
    conv: Array | None


class MemoryInputs(NamedTuple):
    """Per-token inputs of the memory recurrence.

    query, key, value: [B, T, N, H]. theta (inner learning rate), eta (momentum): [B, T, N].
    keep: [B, T, N, C], 1 - alpha (C = 1: one forget gate per head; C = the sum of the
    output sizes of the memory's leaves with a channel-wise forget gate).
    """

    query: Array
    key: Array
    value: Array
    theta: Array
    eta: Array
    keep: Array


@dataclasses.dataclass(frozen=True)
class NeuralMemoryConfig:
    """Static hyperparameters of a neural memory (see :func:`init_neural_memory`)."""

    dim: int
    num_heads: int
    head_dim: int
    memory_depth: int = 2
    memory_expansion: int = 4
    conv_size: int | None = 4
    activation: str | None = "silu"
    normalize_qk: bool = True
    momentum: bool = True
    forget: bool = True
    channelwise_forget: bool = False
    max_lr: float = 1.0
    num_persistent: int = 0

    @property
    def hidden(self) -> int:
        return self.memory_expansion * self.head_dim

    @property
    def leaf_channels(self) -> tuple[int, ...]:
        """Output size of every memory leaf, in MemoryWeights' flattening order."""
        H, E, L = self.head_dim, self.hidden, self.memory_depth
        if L == 1:
            return (H,)
        return (E,) * (L - 1) + (H, H, H)

    @property
    def forget_channels(self) -> int:
        return sum(self.leaf_channels) if self.channelwise_forget else 1


@dataclasses.dataclass(frozen=True)
class NeuralMemoryParams:
    """Outer-loop parameters (a pytree; ``config`` is static).

    w_q, w_k, w_v: [D, N H]. conv: [conv_size, 3 N H] depthwise causal kernels for q|k|v
    (last tap on the current token) or None. w_lr, b_lr: [D, N], [N] (theta).
    w_momentum, b_momentum: [D, N], [N] (eta; None without momentum). w_forget, b_forget:
    [D, N, C], [N, C] (alpha; None without forgetting). memory: the initial memory weights,
    leaves [N, ...]. persistent: [N_p, D] persistent memory tokens.
    """

    config: NeuralMemoryConfig
    w_q: Array
    w_k: Array
    w_v: Array
    conv: Array | None
    w_lr: Array
    b_lr: Array
    w_momentum: Array | None
    b_momentum: Array | None
    w_forget: Array | None
    b_forget: Array | None
    memory: MemoryWeights
    persistent: Array


jax.tree_util.register_dataclass(
    NeuralMemoryParams,
    data_fields=["w_q", "w_k", "w_v", "conv", "w_lr", "b_lr", "w_momentum", "b_momentum",
                 "w_forget", "b_forget", "memory", "persistent"],
    meta_fields=["config"])


def _logit(p: float) -> float:
    return float(jnp.log(p) - jnp.log1p(-p))


def init_neural_memory(rng: Array, *, dim: int, num_heads: int, head_dim: int,
                       memory_depth: int = 2, memory_expansion: int = 4,
                       conv_size: int | None = 4, activation: str | None = "silu",
                       normalize_qk: bool = True, momentum: bool = True, forget: bool = True,
                       channelwise_forget: bool = False, max_lr: float = 1.0,
                       num_persistent: int = 0, initial_lr: float = 0.01,
                       initial_momentum: float = 0.9, initial_forget: float = 0.01,
                       dtype=jnp.float32) -> NeuralMemoryParams:
    """Initial outer-loop parameters of a Titans neural memory.

    Projections are LeCun-normal; gate projections are LeCun-normal times 0.1 with biases set
    so that theta ~ ``initial_lr``, eta ~ ``initial_momentum``, alpha ~ ``initial_forget``;
    the convolution starts near the identity (last tap 1 plus 0.1 N(0, 1)); a linear memory
    starts empty (zeros), a deep one LeCun-normal with LayerNorm gain 1 and bias 0;
    persistent tokens are 0.02 N(0, 1).

    Args:
        key: PRNG key.
        dim: model width D. num_heads: N. head_dim: H (keys, values and queries).
        memory_depth: L_M >= 1 (1: linear memory). memory_expansion: hidden width E / H.
        conv_size: taps of the short causal depthwise convolution on q, k, v (None: none).
        activation: "silu" after the projections (and convolution), or None.
        normalize_qk: l2-normalise queries and keys.
        momentum, forget: use the eta (momentum) and alpha (forgetting) gates; False gives
            eta = 0 (plain gradient steps) or alpha = 0 (no decay): the paper's ablations.
        channelwise_forget: one forget gate per output unit of every memory leaf instead of
            one per head.
        max_lr: theta_t = max_lr * sigmoid(x w_lr + b_lr).
        num_persistent: N_p persistent memory tokens (see
            :func:`jattn.memory.titans.prepend_persistent`).
        initial_lr, initial_momentum, initial_forget: gate values at zero input, in (0, 1)
            (``initial_lr`` in (0, max_lr)).
        dtype: parameter dtype.

    Returns:
        :class:`NeuralMemoryParams`.

    Raises:
        ValueError: a size or option out of range.
    """
    for name, value in (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim),
                        ("memory_depth", memory_depth), ("memory_expansion", memory_expansion)):
        check_int(name, value)
    check_int("num_persistent", num_persistent, minimum=0)
    if conv_size is not None:
        check_int("conv_size", conv_size)
    if activation not in (None, "silu"):
        raise ValueError(f"activation: expected 'silu' or None, got {activation!r}")
    if not max_lr > 0:
        raise ValueError(f"max_lr: expected > 0, got {max_lr!r}")
    for name, value, high in (("initial_lr", initial_lr, max_lr),
                              ("initial_momentum", initial_momentum, 1.0),
                              ("initial_forget", initial_forget, 1.0)):
        if not 0 < value < high:
            raise ValueError(f"{name}: expected a value in (0, {high}), got {value!r}")
    cfg = NeuralMemoryConfig(dim, num_heads, head_dim, memory_depth, memory_expansion,
                             conv_size, activation, normalize_qk, momentum, forget,
                             channelwise_forget, float(max_lr), num_persistent)
    D, N, H, E, C = dim, num_heads, head_dim, cfg.hidden, cfg.forget_channels
    keys = iter(jax.random.split(rng, 16))

    def lecun(shape, fan_in, gain=1.0):
        return (gain / fan_in ** 0.5) * jax.random.normal(next(keys), shape, dtype)

    if memory_depth == 1:
        memory = MemoryWeights((jnp.zeros((N, H, H), dtype),))
    else:
        sizes = [H] + [E] * (memory_depth - 1) + [H]
        memory = MemoryWeights(
            tuple(lecun((N, p, q), p) for p, q in itertools.pairwise(sizes)),
            jnp.ones((N, H), dtype), jnp.zeros((N, H), dtype))
    conv = None
    if conv_size is not None:
        conv = 0.1 * jax.random.normal(next(keys), (conv_size, 3 * N * H), dtype)
        conv = conv.at[-1].add(1.0)
    return NeuralMemoryParams(
        config=cfg,
        w_q=lecun((D, N * H), D), w_k=lecun((D, N * H), D), w_v=lecun((D, N * H), D),
        conv=conv,
        w_lr=lecun((D, N), D, 0.1), b_lr=jnp.full((N,), _logit(initial_lr / max_lr), dtype),
        w_momentum=lecun((D, N), D, 0.1) if momentum else None,
        b_momentum=jnp.full((N,), _logit(initial_momentum), dtype) if momentum else None,
        w_forget=lecun((D, N, C), D, 0.1) if forget else None,
        b_forget=jnp.full((N, C), _logit(initial_forget), dtype) if forget else None,
        memory=memory,
        persistent=0.02 * jax.random.normal(next(keys), (num_persistent, D), dtype))


def prepend_persistent(params: NeuralMemoryParams, x: Array) -> Array:
    """[persistent || x]: the N_p persistent memory tokens before every sequence.

    Args:
        x: [B, T, D].

    Returns:
        [B, N_p + T, D] in x's dtype.
    """
    check_rank("x", x, (3,), "[B, T, D]")
    p = jnp.broadcast_to(params.persistent.astype(x.dtype),
                         (x.shape[0], *params.persistent.shape))
    return jnp.concatenate([p, x], axis=1)


# ----------------------------------------------------------------------------------------------
# The memory network


def _layer_norm(h: Array) -> Array:
    mean = jnp.mean(h, -1, keepdims=True)
    centred = h - mean
    return centred * lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + LAYER_NORM_EPS)


def _gelu(h: Array) -> Array:
    """Exact GELU, h Phi(h) = h (1 + erf(h / sqrt(2))) / 2. The same function as
    ``jax.nn.gelu(h, approximate=False)`` (which evaluates erfc, several times the cost of erf
    on CPU and the largest part of a chunk step); they differ by rounding only."""
    return h * (0.5 + 0.5 * lax.erf(h * math.sqrt(0.5)))


def _mlp(layer, depth: int, x: Array, scale=None, bias=None, probes: MemoryWeights | None = None):
    """The memory network on x [..., H] with its matrix products given: ``layer(i, h)`` is
    h times matrix i (plain weights, or weights in the dual form of a chunk); ``scale``,
    ``bias`` the LayerNorm gain and bias (None: L_M = 1). ``probes`` (zeros) are added to
    every layer output and to the gain and bias, so that their gradients are the gradients
    at those points. Returns (M(x), the input of every matrix)."""
    inputs, h = [], x
    for i in range(depth):
        if i:
            h = _gelu(h)
        inputs.append(h)
        h = layer(i, h)
        if probes is not None:
            h = h + probes.matrices[i]
    if scale is None:
        return h, inputs
    if probes is not None:
        scale, bias = scale + probes.scale, bias + probes.bias
    return x + _layer_norm(h) * scale + bias, inputs


def _memory_forward(weights: MemoryWeights, x: Array, probes: MemoryWeights | None = None):
    """M(x) for one head (x [..., H]) with plain weights; see :func:`_mlp`."""
    return _mlp(lambda i, h: h @ weights.matrices[i], len(weights.matrices), x, weights.scale,
                weights.bias, probes)


def apply_memory(weights: MemoryWeights, x: Array) -> Array:
    """Read a memory without writing: y[b, t, n] = M_{b, n}(x[b, t, n]).

    Args:
        weights: MemoryWeights with leaves [B, N, ...] (e.g. ``state.weights``).
        x: [B, T, N, H].

    Returns:
        [B, T, N, H] in x's dtype.
    """
    check_rank("x", x, (4,), "[B, T, N, H]")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    w = jax.tree_util.tree_map(lambda a: a.astype(dtype), weights)
    read = jax.vmap(jax.vmap(lambda m, h: _memory_forward(m, h)[0], (0, 1), 1), (0, 0), 0)
    return read(w, x.astype(dtype)).astype(x.dtype)


def _clip_factor(sq_norm: Array, max_norm: float) -> Array:
    """min(1, max_norm / sqrt(sq_norm)) with a finite gradient at sq_norm = 0."""
    over = sq_norm > max_norm ** 2
    return jnp.where(over, max_norm * lax.rsqrt(jnp.where(over, sq_norm, 1.0)), 1.0)


# ----------------------------------------------------------------------------------------------
# Sequential: the token-by-token recurrence


def _sequential_single(M: MemoryWeights, S: MemoryWeights, q, k, v, theta, eta, keep, *,
                       retrieve: str, max_grad_norm: float | None, channels: tuple[int, ...]):
    """One (batch, head): q, k, v [T, H], theta, eta [T], keep [T, C]."""

    def step(carry, inputs):
        M, S = carry
        q_t, k_t, v_t, theta_t, eta_t, keep_t = inputs
        grad = jax.grad(lambda w: jnp.sum(jnp.square(_memory_forward(w, k_t)[0] - v_t)))(M)
        if max_grad_norm is not None:
            sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grad))
            theta_t = theta_t * _clip_factor(sq, max_grad_norm)
        S = jax.tree_util.tree_map(lambda s, g: eta_t * s - theta_t * g, S, grad)
        leaves, treedef = jax.tree_util.tree_flatten(M)
        keeps = [c[..., 0] for c in _per_leaf(keep_t[:, None], channels)]  # [] or [Q]
        new = jax.tree_util.tree_unflatten(treedef, [
            kp * m + s for kp, m, s in zip(keeps, leaves, jax.tree_util.tree_leaves(S),
                                           strict=True)])
        y = _memory_forward(new if retrieve == "after" else M, q_t)[0]
        return (new, S), y

    (M, S), y = lax.scan(step, (M, S), (q, k, v, theta, eta, keep))
    return y, M, S


# ----------------------------------------------------------------------------------------------
# Chunks: the state (M, S) materialised at chunk boundaries, the dual form inside a chunk


def _affine_compose(first, second):
    """Compose x -> a1 x + b1 then x -> a2 x + b2 (elementwise a, vectors b)."""
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


def _gate_coefficients(eta, keep, last):
    """The coefficients of one chunk that depend on the gates only (eta [b], keep [b, C]).

    With w_j = -theta_j c_j u_j (token j's gradient u_j, scaled by its learning rate and
    clamp factor c_j, which are applied by the caller):

    * momentum, rows i = 0..b on the basis (S_0, w_1..w_b): S_i = eta_i S_{i-1} + w_i, so
      row i is (prod_{0<l<=i} eta_l, prod_{j<l<=i} eta_l for j <= i, 0 after);
    * memory, rows i = 0..b on the basis (M_0, S_0, w_1..w_b) and per channel:
      M_i = keep_i M_{i-1} + S_i.

    Both are solved by associative scans of affine maps (products and sums of gates, no
    division). Row i involves tokens <= i only. ``last`` is the row of the chunk's last valid
    token.

    Returns:
        (momentum row ``last`` [1 + b], memory rows [b + 1, C, 2 + b], memory row ``last``
        [C, 2 + b]).
    """
    b, C = keep.shape
    dtype = keep.dtype
    drive = jnp.concatenate([jnp.zeros((b, 1), dtype), jnp.eye(b, dtype=dtype)], 1)
    cum_eta, mom = lax.associative_scan(_affine_compose, (eta[:, None], drive))
    mom = mom.at[:, 0].add(cum_eta[:, 0])
    mom = jnp.concatenate([jnp.eye(1, 1 + b, dtype=dtype), mom], 0)  # [b + 1, 1 + b]
    drive = jnp.broadcast_to(
        jnp.concatenate([jnp.zeros((b, 1), dtype), mom[1:]], 1)[:, None, :], (b, C, 2 + b))
    cum_keep, coef = lax.associative_scan(_affine_compose, (keep[..., None], drive))
    coef = coef.at[..., 0].add(cum_keep[..., 0])
    start = jnp.zeros((1, C, 2 + b), dtype).at[..., 0].set(1.0)
    coef = jnp.concatenate([start, coef], 0)  # [b + 1, C, 2 + b]
    take = functools.partial(lax.dynamic_index_in_dim, index=last, axis=0, keepdims=False)
    return take(mom), coef, take(coef)


def _per_leaf(coef: Array, channels: tuple[int, ...]) -> list[Array]:
    """coef [..., C, X] -> one [..., X] (C = 1, shared) or [..., Q_leaf, X] per memory leaf."""
    if coef.shape[-2] == 1:
        return [coef[..., 0, :]] * len(channels)
    offsets = [sum(channels[:i]) for i in range(len(channels) + 1)]
    return [coef[..., lo:hi, :] for lo, hi in itertools.pairwise(offsets)]


def _dual_product(z, zW, zS, a, d, r):
    """z_i M_i for the matrix M_i = c^M_i M_0 + c^S_i S_0 + sum_j c_ij a_j^T d_j of every row i,
    given zW = z M_0 and zS = z S_0: z [n, in], a [b, in], d [b, out], r [n, 2 + b] (one
    coefficient per row) or [n, out, 2 + b] (per output channel)."""
    scores = z @ a.T  # (z_i . a_j)
    if r.ndim == 2:
        return r[:, :1] * zW + r[:, 1:2] * zS + (scores * r[:, 2:]) @ d
    return r[..., 0] * zW + r[..., 1] * zS + jnp.einsum("ij,iqj,jq->iq", scores, r[..., 2:], d)


def _dual_vector(v0, s0, g, r):
    """The same for a vector leaf (LayerNorm gain or bias): v0, s0 [H], g [b, H], r as above."""
    if r.ndim == 2:
        return r[:, :1] * v0 + r[:, 1:2] * s0 + r[:, 2:] @ g
    return r[..., 0] * v0 + r[..., 1] * s0 + jnp.einsum("iqj,jq->iq", r[..., 2:], g)


def _dual_forward(M, S, inputs, w, rows, z, probes=None, first=None):
    """M_i(z_i) for every row i in the dual form (rows: per leaf, as :func:`_per_leaf`);
    ``first``: (z M_0, z S_0) of the first matrix when the caller has them."""
    n_mat = len(M.matrices)
    scale = bias = None
    if M.scale is not None:
        scale = _dual_vector(M.scale, S.scale, w.scale, rows[n_mat])
        bias = _dual_vector(M.bias, S.bias, w.bias, rows[n_mat + 1])

    def layer(i, h):
        zW, zS = first if i == 0 and first is not None else (h @ M.matrices[i],
                                                             h @ S.matrices[i])
        return _dual_product(h, zW, zS, inputs[i], w.matrices[i], rows[i])

    return _mlp(layer, n_mat, z, scale, bias, probes)


def _scaled_updates(grads: MemoryWeights, inputs: list[Array], theta: Array,
                    max_grad_norm: float | None) -> MemoryWeights:
    """w = -theta c u for tokens whose gradient u has the matrix parts inputs[l]^T grads[l]
    (outer products) and the vector parts grads.scale, grads.bias; c clamps |u| to
    ``max_grad_norm`` (|a^T d|_F = |a| |d| for a rank-one matrix). Leaves [..., out]."""
    if max_grad_norm is not None:
        sq = sum(jnp.sum(jnp.square(a), -1) * jnp.sum(jnp.square(d), -1)
                 for a, d in zip(inputs, grads.matrices, strict=True))
        if grads.scale is not None:
            sq = sq + jnp.sum(jnp.square(grads.scale), -1) + jnp.sum(jnp.square(grads.bias), -1)
        theta = theta * _clip_factor(sq, max_grad_norm)
    return jax.tree_util.tree_map(lambda g: -theta[..., None] * g, grads)


def _frozen_gradients(M, S, k, v, theta, rows, *, max_grad_norm):
    """Every token's gradient at the chunk-start weights M_0 (paper Eqs. 16-18), batched."""
    del S, rows
    b = k.shape[0]
    probes = jax.tree_util.tree_map(lambda w: jnp.zeros((b, w.shape[-1]), k.dtype), M)

    def inner_loss(p):
        out, inputs = _memory_forward(M, k, p)
        return jnp.sum(jnp.square(out - v)), inputs

    grads, inputs = jax.grad(inner_loss, has_aux=True)(probes)
    return inputs, _scaled_updates(grads, inputs, theta, max_grad_norm)


def _exact_gradients(M, S, k, v, theta, rows, *, max_grad_norm):
    """Token i's gradient at M_{i-1}, the weights after the tokens before it (the sequential
    recurrence): a scan over the chunk's tokens that reads M_{i-1} in the dual form from the
    earlier tokens' factors, so no weight-sized array is written per token. ``rows``: per
    leaf, the coefficients of M_0..M_{b-1} ([b, 2 + b] or [b, Q, 2 + b])."""
    b, dtype = k.shape[0], k.dtype
    inputs = [jnp.zeros((b, w.shape[-2]), dtype) for w in M.matrices]
    w = jax.tree_util.tree_map(lambda a: jnp.zeros((b, a.shape[-1]), dtype), M)

    def token(carry, xs):
        inputs, w = carry
        i, k_i, v_i, theta_i, r, kW, kS = xs
        probes = jax.tree_util.tree_map(lambda a: jnp.zeros((1, a.shape[-1]), dtype), M)

        def inner_loss(p):
            out, acts = _dual_forward(M, S, inputs, w, [x[None] for x in r], k_i[None], p,
                                      first=(kW[None], kS[None]))
            return jnp.sum(jnp.square(out - v_i)), acts

        grads, acts = jax.grad(inner_loss, has_aux=True)(probes)
        new = _scaled_updates(grads, acts, theta_i[None], max_grad_norm)
        inputs = [buf.at[i].set(a[0]) for buf, a in zip(inputs, acts, strict=True)]
        w = jax.tree_util.tree_map(lambda buf, x: buf.at[i].set(x[0]), w, new)
        return (inputs, w), None

    # The keys' products with the first matrices are known before the scan: one matrix
    # product each (inside, every token would also add a weight-sized outer product to
    # their gradients).
    first = (k @ M.matrices[0], k @ S.matrices[0])
    (inputs, w), _ = lax.scan(token, (inputs, w), (jnp.arange(b), k, v, theta, rows, *first))
    return inputs, w


def _chunk_step(M: MemoryWeights, S: MemoryWeights, q, k, v, theta, coefficients, *,
                exact: bool, retrieve: str, max_grad_norm: float | None,
                channels: tuple[int, ...]):
    """One chunk of one (batch, head): q, k, v [b, H], theta [b], ``coefficients`` from
    :func:`_gate_coefficients` (padding tokens of a last, partial chunk only enter rows
    after its last valid token, so they never reach the returned state). ``exact``: each
    token's gradient at the weights before it (else all at the chunk start)."""
    mom_end, coef, end = coefficients
    coef, end = _per_leaf(coef, channels), _per_leaf(end, channels)

    # 1. Per-token updates w_j, factored: matrix l of token j moves by inputs[l][j]^T times
    # w.matrices[l][j]; the LayerNorm gain and bias by w.scale[j], w.bias[j].
    gradients = _exact_gradients if exact else _frozen_gradients
    inputs, w = gradients(M, S, k, v, theta, [c[:-1] for c in coef],
                          max_grad_norm=max_grad_norm)

    # 2. Read: every token i through its own weights M_i (or M_{i-1}), layer by layer:
    # z_i M_i = c^M_i z_i M_0 + c^S_i z_i S_0 + sum_j c_ij (z_i . a_j) w_j.
    rows = [c[1:] if retrieve == "after" else c[:-1] for c in coef]
    y = _dual_forward(M, S, inputs, w, rows, q)[0]

    # 3. Weights and momentum after the last valid token.
    def end_terms(e):  # memory row ``last``: (c^M, c^S, per-token coefficients [b, 1 or Q])
        return (e[0], e[1], e[2:, None]) if e.ndim == 1 else (e[:, 0], e[:, 1], e[:, 2:].T)

    s_last, s_tokens = mom_end[0], mom_end[1:, None]
    n_mat = len(M.matrices)
    new_w, new_s = [], []
    for i, (W0, S0, a, d) in enumerate(zip(M.matrices, S.matrices, inputs, w.matrices,
                                           strict=True)):
        e0, e1, eu = end_terms(end[i])
        new_w.append(e0 * W0 + e1 * S0 + a.T @ (d * eu))
        new_s.append(s_last * S0 + a.T @ (d * s_tokens))
    if M.scale is None:
        return y, MemoryWeights(tuple(new_w)), MemoryWeights(tuple(new_s))
    vec = []
    for e, w0, s0, g in ((end[n_mat], M.scale, S.scale, w.scale),
                         (end[n_mat + 1], M.bias, S.bias, w.bias)):
        # (a vector-matrix product where the row is per head: several times faster on
        # CPU at b = 64 than the equal sum of products)
        e0, e1 = end_terms(e)[:2]
        add = e[2:] @ g if e.ndim == 1 else jnp.sum(g * e[:, 2:].T, 0)
        vec.append((e0 * w0 + e1 * s0 + add, s_last * s0 + mom_end[1:] @ g))
    return (y, MemoryWeights(tuple(new_w), vec[0][0], vec[1][0]),
            MemoryWeights(tuple(new_s), vec[0][1], vec[1][1]))


def _chunked_single(M, S, q, k, v, theta, eta, keep, *, chunk_size: int, exact: bool,
                    retrieve: str, max_grad_norm: float | None, channels: tuple[int, ...]):
    """One (batch, head): a rematerialised lax.scan over chunks; a last partial chunk is
    padded and its state read at its last valid token (one compiled chunk step).

    The gate-only coefficients of every chunk are computed before the scan, batched over
    chunks, when the forget gate is one per head; with a channel-wise one they are computed
    inside (for all chunks at once they would be T C (b + 2) numbers per head)."""
    T = q.shape[0]
    b = min(chunk_size, T)  # one chunk either way
    n = -(-T // b)
    pad = n * b - T
    xs = tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in
               (q, k, v, theta, eta, keep))
    q, k, v, theta, eta, keep = (a.reshape(n, b, *a.shape[1:]) for a in xs)
    last = jnp.full((n,), b, jnp.int32).at[-1].set(b - pad)
    before = keep.shape[-1] == 1
    coefficients = (jax.vmap(_gate_coefficients)(eta, keep, last) if before
                    else (eta, keep, last))
    step = functools.partial(_chunk_step, exact=exact, retrieve=retrieve,
                             max_grad_norm=max_grad_norm, channels=channels)

    @jax.checkpoint
    def body(carry, chunk):
        *inputs, coefs = chunk
        y, M, S = step(*carry, *inputs, coefs if before else _gate_coefficients(*coefs))
        return (M, S), y

    (M, S), y = lax.scan(body, (M, S), (q, k, v, theta, coefficients))
    return y.reshape(n * b, -1)[:T], M, S


# ----------------------------------------------------------------------------------------------
# Public functions


def _check_weights(name: str, weights: MemoryWeights, cfg: NeuralMemoryConfig, B: int) -> None:
    H, E, L = cfg.head_dim, cfg.hidden, cfg.memory_depth
    sizes = [H, H] if L == 1 else [H] + [E] * (L - 1) + [H]
    if not isinstance(weights, MemoryWeights) or len(weights.matrices) != L:
        raise ValueError(f"{name}: expected MemoryWeights with {L} matrices, got {weights!r:.200}")
    for i, w in enumerate(weights.matrices):
        check_shape(f"{name}.matrices[{i}]", w, (B, cfg.num_heads, sizes[i], sizes[i + 1]))
    for field in ("scale", "bias"):
        leaf = getattr(weights, field)
        if (L == 1) != (leaf is None):
            raise ValueError(f"{name}.{field}: expected {'None' if L == 1 else 'an array'} "
                             f"for memory_depth={L}, got {leaf!r:.100}")
        if leaf is not None:
            check_shape(f"{name}.{field}", leaf, (B, cfg.num_heads, H))


def memory_inputs(params: NeuralMemoryParams, x: Array, *,
                  conv_state: Array | None = None) -> tuple[MemoryInputs, Array | None]:
    """Queries, keys, values and gates of the memory from the input sequence.

    q, k, v = act(conv([x W_Q | x W_K | x W_V])), q and k l2-normalised;
    theta = max_lr sigmoid(x w_lr + b_lr); eta = sigmoid(x w_momentum + b_momentum) (0 without
    momentum); 1 - alpha = sigmoid(-(x w_forget + b_forget)) (1 without forgetting).

    Args:
        params: :class:`NeuralMemoryParams`.
        x: [B, T, D].
        conv_state: [B, conv_size - 1, 3 N H], the convolution history from a previous call
            (None: zeros).

    Returns:
        (:class:`MemoryInputs` in ``promote_types(x.dtype, float32)``, the new convolution
        history or None without a convolution).

    Raises:
        ValueError: x not [B, T, D] with D = params.config.dim and T > 0, or a conv_state of
            the wrong shape. TypeError: x not floating.
    """
    cfg = params.config
    check_rank("x", x, (3,), "[B, T, D]")
    check_floating("x", x)
    B, T, D = x.shape
    if D != cfg.dim or T == 0:
        raise ValueError(f"x: expected [B, T > 0, D={cfg.dim}], got {x.shape}")
    N, H = cfg.num_heads, cfg.head_dim
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    p = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    xf = x.astype(dtype)
    # one product for q|k|v: [B, T, 3 N H]
    u = xf @ jnp.concatenate([p.w_q, p.w_k, p.w_v], -1)
    new_conv = None
    if p.conv is not None:
        width = p.conv.shape[0] - 1
        if conv_state is None:  # zeros before position 0: no concatenated copy
            new_conv = conv_history(u, width)
            u = short_causal_conv(u, p.conv)
        else:
            check_shape("conv_state", conv_state, (B, width, 3 * N * H), "BWC")
            full = jnp.concatenate([conv_state.astype(dtype), u], 1)
            u = short_causal_conv(full, p.conv)[:, width:]
            new_conv = conv_history(full, width)
    if cfg.activation == "silu":
        u = jax.nn.silu(u)
    q, k, v = (a.reshape(B, T, N, H) for a in jnp.split(u, 3, -1))
    if cfg.normalize_qk:
        q, k = (a * lax.rsqrt(jnp.sum(jnp.square(a), -1, keepdims=True) + L2_NORM_EPS)
                for a in (q, k))
    theta = cfg.max_lr * jax.nn.sigmoid(xf @ p.w_lr + p.b_lr)
    eta = (jax.nn.sigmoid(xf @ p.w_momentum + p.b_momentum) if p.w_momentum is not None
           else jnp.zeros((B, T, N), dtype))
    keep = (jax.nn.sigmoid(-(jnp.einsum("btd,dnc->btnc", xf, p.w_forget) + p.b_forget))
            if p.w_forget is not None else jnp.ones((B, T, N, 1), dtype))
    return MemoryInputs(q, k, v, theta, eta, keep), new_conv


def chunk_gates(inputs: MemoryInputs, chunk_size: int) -> MemoryInputs:
    """Per-chunk gates: every token of a chunk of ``chunk_size`` tokens takes theta, eta and
    1 - alpha of the chunk's first token (chunks start at token 0).

    The first token, not a summary of the chunk (a mean would make token i's update, and so
    its output, depend on the later tokens of its chunk): it precedes every other token of
    its chunk, so the recurrence stays causal and y_i depends on x_0..x_i only.

    Args:
        inputs: :class:`MemoryInputs` (theta, eta [B, T, N]; keep [B, T, N, C]).
        chunk_size: tokens per chunk (>= 1; 1 returns the gates unchanged).

    Returns:
        ``inputs`` with theta, eta and keep repeated from every chunk's first token.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(5.0).reshape(1, 5, 1)
    >>> inputs = MemoryInputs(*[x[..., None]] * 3, x, x, x[..., None])
    >>> chunk_gates(inputs, 2).theta[0, :, 0]
    Array([0., 0., 2., 2., 4.], dtype=float32)
    """
    check_int("chunk_size", chunk_size)
    if chunk_size == 1:
        return inputs
    T = inputs.theta.shape[1]

    def repeat(a):
        return jnp.repeat(a[:, ::chunk_size], chunk_size, axis=1)[:, :T]

    return inputs._replace(theta=repeat(inputs.theta), eta=repeat(inputs.eta),
                           keep=repeat(inputs.keep))


def memory_recurrence(weights: MemoryWeights, momentum: MemoryWeights, inputs: MemoryInputs, *,
                      chunk_size: int, implementation: str = "chunked",
                      retrieve: str = "after", max_grad_norm: float | None = None,
                      gate_granularity: str = "token",
                      ) -> tuple[Array, MemoryWeights, MemoryWeights]:
    """Write every (k_t, v_t) into the memory and read every q_t: the recurrence of
    :func:`neural_memory` on given queries, keys, values and gates (for architectures that
    build them differently, e.g. MAC writing attention outputs).

    Args:
        weights, momentum: MemoryWeights with leaves [B, N, ...] (M_0 and S_0).
        inputs: :class:`MemoryInputs` (query, key, value [B, T, N, H]; theta, eta [B, T, N];
            keep = 1 - alpha [B, T, N, 1 or C]).
        chunk_size, implementation, retrieve, max_grad_norm, gate_granularity: as
            :func:`neural_memory`.

    Returns:
        (y [B, T, N, H], final weights, final momentum), in the dtype of ``inputs.query``
        promoted to float32.

    Raises:
        ValueError: an option out of range (named), inputs of mismatched shapes.
    """
    check_int("chunk_size", chunk_size)
    if implementation not in ("chunked", "sequential"):
        raise ValueError(f"implementation: expected 'chunked' or 'sequential', "
                         f"got {implementation!r}")
    if retrieve not in ("after", "before"):
        raise ValueError(f"retrieve: expected 'after' or 'before', got {retrieve!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm: expected None or > 0, got {max_grad_norm!r}")
    if gate_granularity not in GATE_GRANULARITIES:
        raise ValueError(f"gate_granularity: expected one of {GATE_GRANULARITIES}, "
                         f"got {gate_granularity!r}")
    q = inputs.query
    check_rank("inputs.query", q, (4,), "[B, T, N, H]")
    B, T, N, _ = q.shape
    for name in ("key", "value"):
        check_shape(f"inputs.{name}", getattr(inputs, name), q.shape, "BTNH")
    for name in ("theta", "eta"):
        check_shape(f"inputs.{name}", getattr(inputs, name), (B, T, N), "BTN")
    check_rank("inputs.keep", inputs.keep, (4,), "[B, T, N, C]")
    if inputs.keep.shape[:3] != (B, T, N):
        raise ValueError(f"inputs.keep: expected [B={B}, T={T}, N={N}, C], "
                         f"got {inputs.keep.shape}")
    leaves = jax.tree_util.tree_leaves(weights)
    channels = tuple(w.shape[-1] for w in leaves)
    if inputs.keep.shape[3] not in (1, sum(channels)):
        raise ValueError(f"inputs.keep: expected C = 1 or {sum(channels)} (the memory's output "
                         f"units), got {inputs.keep.shape}")
    if jax.tree_util.tree_structure(momentum) != jax.tree_util.tree_structure(weights) or any(
            m.shape != w.shape for m, w in zip(jax.tree_util.tree_leaves(momentum), leaves,
                                               strict=True)):
        raise ValueError("momentum: expected the structure and shapes of weights")
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    cast = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(dtype))
    weights, momentum, inputs = cast(weights), cast(momentum), cast(inputs)
    if gate_granularity == "chunk":
        inputs = chunk_gates(inputs, chunk_size)
    heads_first = [jnp.moveaxis(a, 2, 1) for a in inputs]  # [B, N, T, ...]
    if implementation == "chunked":
        # Chunks of 1 token are the exact recurrence, computed in chunks of EXACT_CHUNK
        # tokens (each token's gradient at the weights before it, in the dual form).
        exact = chunk_size == 1
        single = functools.partial(_chunked_single, exact=exact, retrieve=retrieve,
                                   chunk_size=EXACT_CHUNK if exact else chunk_size,
                                   max_grad_norm=max_grad_norm, channels=channels)
    else:
        single = functools.partial(_sequential_single, retrieve=retrieve,
                                   max_grad_norm=max_grad_norm, channels=channels)
    # One vmap over B N (heads): nested vmaps over B = 1 leave a size-1 axis on every array
    # of the chunk step, and XLA:CPU reduces such arrays ~4x slower than without it.
    fold = functools.partial(jax.tree_util.tree_map, lambda a: a.reshape(B * N, *a.shape[2:]))
    y, w, m = jax.vmap(single)(*fold((weights, momentum, *heads_first)))
    y, w, m = jax.tree_util.tree_map(lambda a: a.reshape(B, N, *a.shape[1:]), (y, w, m))
    return jnp.moveaxis(y, 1, 2), w, m


def initial_memory_state(params: NeuralMemoryParams, batch_size: int) -> NeuralMemoryState:
    """The state before any token: learned initial weights, zero momentum, zero history."""
    check_int("batch_size", batch_size)
    cfg = params.config
    weights = jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, (batch_size, *a.shape)), params.memory)
    momentum = jax.tree_util.tree_map(jnp.zeros_like, weights)
    conv = None
    if params.conv is not None:
        conv = jnp.zeros((batch_size, params.conv.shape[0] - 1,
                          3 * cfg.num_heads * cfg.head_dim), params.conv.dtype)
    return NeuralMemoryState(weights, momentum, conv)


def neural_memory(params: NeuralMemoryParams, x: Array, *, chunk_size: int,
                  implementation: str = "chunked", initial_state: NeuralMemoryState | None = None,
                  return_state: bool = False, retrieve: str = "after",
                  max_grad_norm: float | None = None, gate_granularity: str = "token"):
    """Titans long-term memory over a sequence: write every token, read every query.

    y_t = M_t(q_t) with M_t = (1 - alpha_t) M_{t-1} + S_t,
    S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||^2 taken at M_{t-1} ("sequential")
    or at the chunk start M_{t - t mod chunk_size} ("chunked"); see the module docstring for
    the projections, gates, memory network and order of operations.

    Patterns: causal self (y_t depends on x_0..x_t only, and with ``retrieve="before"`` on
    x_t only through q_t). Cross and noncausal patterns do not apply to a recurrence.

    Outer-loop gradients (projections, gates, initial memory, convolution) flow through
    every inner update; both implementations are pure functions (jit, vmap, grad).

    Args:
        params: :class:`NeuralMemoryParams` from :func:`init_neural_memory`.
        x: [B, T, D].
        chunk_size: tokens per chunk whose gradients share the chunk-start weights (paper:
            16). Ignored by "sequential" (which is chunk_size = 1), validated anyway.
        implementation: "chunked" (parallel inside chunks) or "sequential" (token by token).
        initial_state: a :class:`NeuralMemoryState` from a previous call (leaves [B, N, ...]),
            or None for :func:`jattn.memory.titans.initial_memory_state`. Chunks restart at
            every call, so two calls equal one when the first call's length is a multiple of
            chunk_size.
        return_state: also return the final :class:`NeuralMemoryState`.
        retrieve: "after" (y_t = M_t(q_t), the default) or "before" (y_t = M_{t-1}(q_t)).
        max_grad_norm: clamp each token's inner gradient to this global norm (None: no clamp).
        gate_granularity: "token" (every token's own theta_t, eta_t, alpha_t) or "chunk"
            (every token of a chunk of ``chunk_size`` tokens uses the gates of the chunk's
            first token, which keeps the output causal; see
            :func:`jattn.memory.titans.chunk_gates`). The chunks are those of "chunked" and,
            with "chunk", also apply to "sequential" (which then equals "chunked" with
            chunk_size = 1 fed the same repeated gates).

    Returns:
        y [B, T, N, H] in x's dtype; with ``return_state`` (y, state).

    Raises:
        ValueError: x not [B, T, D] with D = config.dim, chunk_size < 1, an unknown
            implementation, retrieve or gate_granularity, max_grad_norm <= 0, an
            initial_state of the wrong shapes (each named). TypeError: x not floating.

    >>> import jax, jax.numpy as jnp
    >>> params = init_neural_memory(jax.random.key(0), dim=8, num_heads=2, head_dim=4)
    >>> y, state = neural_memory(params, jnp.ones((1, 5, 8)), chunk_size=2, return_state=True)
    >>> y.shape, state.weights.matrices[0].shape, state.momentum.scale.shape
    ((1, 5, 2, 4), (1, 2, 4, 16), (1, 2, 4))

    References:
        P37 Titans: "Titans: Learning to Memorize at Test Time" (Sec. 3, Eqs. 11-18).
    """
    check_rank("x", x, (3,), "[B, T, D]")
    cfg = params.config
    B = x.shape[0]
    fresh = initial_state is None
    if fresh:
        initial_state = initial_memory_state(params, B)
    elif not isinstance(initial_state, NeuralMemoryState):
        raise ValueError(f"initial_state: expected a NeuralMemoryState, "
                         f"got {type(initial_state).__name__}")
    else:
        _check_weights("initial_state.weights", initial_state.weights, cfg, B)
        _check_weights("initial_state.momentum", initial_state.momentum, cfg, B)
        if (initial_state.conv is None) != (params.conv is None):
            raise ValueError("initial_state.conv: expected "
                             f"{'None' if params.conv is None else 'an array'} "
                             f"(conv_size={cfg.conv_size}), got {initial_state.conv!r:.100}")
    y, state = _neural_memory(params, x, initial_state, fresh, chunk_size, implementation,
                              retrieve, max_grad_norm, gate_granularity)
    return (y, state) if return_state else y


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _neural_memory(params: NeuralMemoryParams, x: Array, initial_state: NeuralMemoryState,
                   fresh: bool, chunk_size, implementation, retrieve, max_grad_norm,
                   gate_granularity) -> tuple[Array, NeuralMemoryState]:
    """:func:`neural_memory` after its checks, as one program (called eagerly, the
    projections, gates and scans would otherwise compile operation by operation)."""
    # (no initial state: zeros before position 0 without a concatenated copy)
    inputs, conv = memory_inputs(params, x, conv_state=None if fresh else initial_state.conv)
    y, weights, momentum = memory_recurrence(
        initial_state.weights, initial_state.momentum, inputs, chunk_size=chunk_size,
        implementation=implementation, retrieve=retrieve, max_grad_norm=max_grad_norm,
        gate_granularity=gate_granularity)
    return y.astype(x.dtype), NeuralMemoryState(weights, momentum, conv)
