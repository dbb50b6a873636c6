"""Ground truth of Titans' neural memory (:mod:`jattn.memory`), one token at a time."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def neural_memory(params, x, *, chunk_size=1, initial_state=None, retrieve="after",
                  max_grad_norm=None):
    """Titans neural memory (P37), one token at a time from the paper's equations:
    S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||^2, M_t = (1 - alpha_t) M_{t-1} + S_t,
    y_t = M_t(q_t) (``retrieve="after"``) or M_{t-1}(q_t) ("before").

    The gradient of token t is taken at the weights the memory had before the first token of
    t's chunk (chunk_size = 1: at M_{t-1}, the plain recurrence; chunk_size = c: frozen per
    chunk, paper Eqs. 16-18). A Python loop over tokens, weights with leading [B, N] axes,
    ``jax.grad`` of the summed inner loss (each (b, n) weight set only meets its own loss).

    Args: as :func:`jattn.memory.neural_memory` (``params`` a NeuralMemoryParams, ``x``
    [B, T, D], ``initial_state`` a NeuralMemoryState or None).

    Returns:
        (y [B, T, N, H] in x's dtype, final weight leaves, final momentum leaves, final
        convolution history or None); leaves in MemoryWeights order (matrices, scale, bias).
    """
    cfg = params.config
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    B, T, _ = x.shape
    N, H = cfg.num_heads, cfg.head_dim
    xf = x.astype(dtype)
    f = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731

    # Projections, causal depthwise convolution (last tap on the current token), SiLU, l2.
    u = jnp.concatenate([xf @ f(params.w_q), xf @ f(params.w_k), xf @ f(params.w_v)], -1)
    conv_out = None
    if params.conv is not None:
        kernel = f(params.conv)
        width = kernel.shape[0] - 1
        hist = (jnp.zeros((B, width, u.shape[-1]), dtype) if initial_state is None
                else f(initial_state.conv))
        full = jnp.concatenate([hist, u], 1)
        u = sum(kernel[j] * full[:, j:j + T] for j in range(width + 1))
        conv_out = full[:, full.shape[1] - width:]
    if cfg.activation == "silu":
        u = u * jax.nn.sigmoid(u)
    q, k, v = (u[..., i * N * H:(i + 1) * N * H].reshape(B, T, N, H) for i in range(3))
    if cfg.normalize_qk:
        q = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
        k = k / jnp.sqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)
    theta = cfg.max_lr * jax.nn.sigmoid(xf @ f(params.w_lr) + f(params.b_lr))
    eta = (jax.nn.sigmoid(xf @ f(params.w_momentum) + f(params.b_momentum))
           if params.w_momentum is not None else jnp.zeros((B, T, N), dtype))
    alpha = (jax.nn.sigmoid(jnp.einsum("btd,dnc->btnc", xf, f(params.w_forget))
                            + f(params.b_forget))
             if params.w_forget is not None else jnp.zeros((B, T, N, 1), dtype))

    # Memory weights as a flat list: matrices..., then LayerNorm gain and bias (deep memory).
    depth = cfg.memory_depth
    if initial_state is None:
        weights = [jnp.broadcast_to(f(w), (B, *w.shape)) for w in
                   jax.tree_util.tree_leaves(params.memory)]
        momentum = [jnp.zeros_like(w) for w in weights]
    else:
        weights = [f(w) for w in jax.tree_util.tree_leaves(initial_state.weights)]
        momentum = [f(w) for w in jax.tree_util.tree_leaves(initial_state.momentum)]

    def memory(ws, inp):  # ws leaves [B, N, ...], inp [B, N, H]
        h = inp
        for i in range(depth):
            if i:
                h = 0.5 * h * (1 + jax.scipy.special.erf(h / math.sqrt(2)))
            h = jnp.einsum("bnp,bnpq->bnq", h, ws[i])
        if depth == 1:
            return h
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return inp + (h - mu) / jnp.sqrt(var + 1e-5) * ws[depth] + ws[depth + 1]

    # Forget gate per leaf: one per head ([B, N, 1]) or per output unit of each leaf.
    sizes = [w.shape[-1] for w in weights]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def leaf_gate(a, i):  # a [B, N, C] -> broadcastable to leaf i
        g = a if a.shape[-1] == 1 else a[..., offsets[i]:offsets[i] + sizes[i]]
        return g.reshape(B, N, *([1] * (weights[i].ndim - 3)), g.shape[-1])

    def expand(a, leaf):  # [B, N] -> [B, N, 1, ...]
        return a.reshape(B, N, *([1] * (leaf.ndim - 2)))

    ys = []
    frozen = weights
    for t in range(T):
        if t % chunk_size == 0:
            frozen = weights
        k_t, v_t = k[:, t], v[:, t]
        grads = jax.grad(lambda ws, k_t=k_t, v_t=v_t: jnp.sum((memory(ws, k_t) - v_t) ** 2))(
            frozen)
        theta_t = theta[:, t]
        if max_grad_norm is not None:
            norm = jnp.sqrt(sum(jnp.sum(g ** 2, axis=tuple(range(2, g.ndim))) for g in grads))
            theta_t = theta_t * jnp.minimum(1.0, max_grad_norm / norm)
        momentum = [expand(eta[:, t], s) * s - expand(theta_t, g) * g
                    for s, g in zip(momentum, grads, strict=True)]
        previous = weights
        weights = [(1 - leaf_gate(alpha[:, t], i)) * w + s
                   for i, (w, s) in enumerate(zip(weights, momentum, strict=True))]
        ys.append(memory(weights if retrieve == "after" else previous, q[:, t]))
    return jnp.stack(ys, 1).astype(x.dtype), weights, momentum, conv_out
