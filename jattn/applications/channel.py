"""Channel and spatial attention for convolutional feature maps.

Feature maps are channels-last, ``x [B, *spatial, C]`` with one or more spatial axes
(``[B, H, W, C]`` for images, ``[B, D, H, W, C]`` for volumes as in MPU-Net): the JAX/Flax
convention. Every function returns an array of x's shape and dtype; pooled statistics,
gates and softmaxes are computed in float32 (or wider).

* ``eca`` (P49 ECA-Net): global average pooling, a 1-D convolution of odd size k across the
  channels (no dimensionality reduction, local cross-channel interaction), sigmoid, rescale.
  ``eca_kernel_size`` is the paper's adaptive ``k = psi(C) = |log2(C) / gamma + b / gamma|_odd``.
* ``squeeze_excitation`` (P26's starting point, SENet): pooling, a bottleneck MLP
  (ReLU), sigmoid, rescale.
* ``conditioned_channel_attention`` (P26 Sentence Attention Blocks): the channel weights come
  from a sentence embedding instead of (or together with) the pooled image.
* ``position_attention`` and ``channel_attention`` (P07 MPU-Net, the DANet position and
  channel attention modules): self-attention over the spatial positions (through
  :func:`jattn.dot_product_attention`) or over the channels, added back to the input with a
  learned scale gamma (0 at initialisation in the modules).

Of CAB's four patterns, the position and channel attention modules are noncausal
self-attention over an unordered set (the pixels of one image, or its channels); a causal
order or a second source is not defined by the papers, so none is offered. The others are
not attention over a sequence but gates computed from pooled statistics.

Dense plain references for all five are in :mod:`jattn.reference`.

References:
    P07 MPU-Net, "3D Medical Image Segmentation based on multi-scale MPU-Net" (position
    attention module; DANet's position and channel attention modules, Fu et al., "Dual
    Attention Network for Scene Segmentation").
    P26 Sentence Attention Blocks, "Sentence Attention Blocks for Answer Grounding".
    P49 ECA-Net, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
    Networks".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jattn.core.attention import dot_product_attention
from jattn.core.shapes import (
    Array,
    accumulation_dtype,
    check_floating,
    check_int,
    check_rank,
    check_shape,
)

GATES = ("softmax", "sigmoid")
CHANNEL_FORMS = ("paper", "max_minus")


def _check_features(name: str, x: Array) -> int:
    """x [B, *spatial, C] with at least one spatial axis, floating; return C."""
    if x.ndim < 3:
        raise ValueError(f"{name}: expected [B, *spatial, C] with at least one spatial axis, "
                         f"got shape {x.shape}")
    check_floating(name, x)
    if x.shape[-1] == 0 or math.prod(x.shape[1:-1]) == 0:
        raise ValueError(f"{name}: expected non-empty spatial and channel axes, got {x.shape}")
    return x.shape[-1]


def _check_param(name: str, w, shape: tuple[int, ...], letters: str) -> Array:
    w = jnp.asarray(w)
    check_shape(name, w, shape, letters)
    check_floating(name, w)
    return w


def _check_gamma(gamma) -> Array:
    gamma = jnp.asarray(gamma)
    if gamma.ndim != 0:
        raise ValueError(f"gamma: expected a scalar (shape ()), got shape {gamma.shape}")
    check_floating("gamma", gamma)
    return gamma


def _channel_means(x: Array) -> Array:
    """Global average pooling: [B, *spatial, C] -> [B, C] in float32 (or wider)."""
    dtype = accumulation_dtype(x.dtype)
    return jnp.mean(x.astype(dtype), axis=tuple(range(1, x.ndim - 1)))


def _rescale(x: Array, weights: Array) -> Array:
    """x * weights[b, c] broadcast over the spatial axes, in x's dtype."""
    weights = weights.reshape(x.shape[0], *(1,) * (x.ndim - 2), x.shape[-1])
    return (x.astype(weights.dtype) * weights).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# P49 ECA-Net


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    r"""ECA's adaptive kernel size: the odd number nearest to (log2(C) + b) / gamma.

    .. math::
        k = \psi(C) = \left| \frac{\log_2 C}{\gamma} + \frac{b}{\gamma} \right|_{odd}

    where ``|t|_odd`` is the nearest odd number to t, ties (t an even integer) rounding up; this
    is the official code's ``t = int(abs((log2(C) + b) / gamma)); k = t if t % 2 else t + 1``
    (for instance C = 64 gives 3, 128 and 256 give 5, 512 and 1024 give 5, 2048 gives 7).

    Args:
        channels: C, a positive int.
        gamma: positive.
        b: offset.

    Returns:
        An odd int >= 1.

    Raises:
        ValueError: channels not a positive int, gamma not positive.

    >>> [eca_kernel_size(c) for c in (16, 64, 128, 256, 512, 2048)]
    [3, 3, 5, 5, 5, 7]

    References:
        P49 ECA-Net (section 3.3, adaptive selection of the kernel size).
    """
    check_int("channels", channels)
    if not gamma > 0:
        raise ValueError(f"gamma: expected a positive number, got {gamma!r}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def eca(x: Array, conv_kernel: Array) -> Array:
    r"""Efficient channel attention: sigmoid(conv1d_k(avgpool(x))) rescales the channels.

    .. math::
        z_c = \frac{1}{|\Omega|}\sum_{p \in \Omega} x_{p,c}, \qquad
        y_c = \sum_{j=0}^{k-1} w_j\, z_{c + j - (k-1)/2}, \qquad
        \mathrm{out}_{p,c} = x_{p,c}\, \sigma(y_c)

    with z zero outside 0..C-1 (a "same" cross-correlation without bias, as PyTorch's
    ``Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)``), one kernel shared by all channels.
    Not attention over a sequence (none of CAB's four patterns): a gate from pooled features.

    Args:
        x: ``[B, *spatial, C]`` feature map (channels last).
        conv_kernel: [k], k odd (``eca_kernel_size(C)`` in the paper).

    Returns:
        ``[B, *spatial, C]`` in x's dtype.

    Raises:
        ValueError: x without a spatial axis or empty, a kernel that is not 1-D of odd size.
        TypeError: non-floating x or kernel.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 2, 2, 3))
    >>> eca(x, jnp.zeros(3))[0, 0, 0]  # sigmoid(0) = 0.5 on every channel
    Array([0.5, 0.5, 0.5], dtype=float32)

    References:
        P49 ECA-Net, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
        Networks".
    """
    _check_features("x", x)
    w = jnp.asarray(conv_kernel)
    check_rank("conv_kernel", w, (1,), "[k]")
    check_floating("conv_kernel", w)
    k = w.shape[0]
    if k % 2 == 0:
        raise ValueError(f"conv_kernel: expected an odd size k (centred 'same' convolution), "
                         f"got shape {w.shape}")
    z = _channel_means(x)
    # Channels as the one spatial axis of a 1-in, 1-out convolution: [B, C, 1] * [k, 1, 1].
    y = lax.conv_general_dilated(
        z[:, :, None], w.astype(z.dtype)[:, None, None], window_strides=(1,),
        padding=[((k - 1) // 2, (k - 1) // 2)], dimension_numbers=("NWC", "WIO", "NWC"),
        precision=lax.Precision.HIGHEST)[:, :, 0]
    return _rescale(x, jax.nn.sigmoid(y))


# --------------------------------------------------------------------------------------------
# P26: squeeze-and-excitation and the sentence attention block


def squeeze_excitation(x: Array, w1: Array, b1: Array | None, w2: Array,
                       b2: Array | None) -> Array:
    r"""Squeeze-and-excitation: a bottleneck MLP of the pooled channels gates the channels.

    .. math::
        z = \mathrm{avgpool}(x), \qquad
        s = \sigma\big(W_2^\top \mathrm{relu}(W_1^\top z + b_1) + b_2\big), \qquad
        \mathrm{out}_{p,c} = x_{p,c}\, s_c

    The block the Sentence Attention Block starts from. Not attention over a sequence (none
    of CAB's four patterns).

    Args:
        x: ``[B, *spatial, C]``.
        w1: [C, R] (R = C / reduction, 16 in SENet), b1: [R] or None.
        w2: [R, C], b2: [C] or None.

    Returns:
        ``[B, *spatial, C]`` in x's dtype.

    Raises:
        ValueError: x without a spatial axis, weights whose shapes do not fit C.
        TypeError: non-floating inputs.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 2, 2, 4))
    >>> squeeze_excitation(x, jnp.zeros((4, 2)), None, jnp.zeros((2, 4)), None)[0, 0, 0]
    Array([0.5, 0.5, 0.5, 0.5], dtype=float32)

    References:
        P26 Sentence Attention Blocks (built on squeeze-and-excitation, Hu et al.,
        "Squeeze-and-Excitation Networks").
    """
    C = _check_features("x", x)
    w1 = jnp.asarray(w1)
    check_rank("w1", w1, (2,), "[C, R]")
    R = w1.shape[1]
    w1 = _check_param("w1", w1, (C, R), "CR")
    w2 = _check_param("w2", w2, (R, C), "RC")
    z = _channel_means(x)
    h = z @ w1.astype(z.dtype)
    if b1 is not None:
        h = h + _check_param("b1", b1, (R,), "R").astype(z.dtype)
    s = jax.nn.relu(h) @ w2.astype(z.dtype)
    if b2 is not None:
        s = s + _check_param("b2", b2, (C,), "C").astype(z.dtype)
    return _rescale(x, jax.nn.sigmoid(s))


def conditioned_channel_attention(x: Array, sentence: Array, w1: Array, b1: Array | None,
                                  w2: Array, b2: Array | None, *,
                                  norm_scale: Array | None = None,
                                  norm_bias: Array | None = None, gate: str = "softmax",
                                  pool_image: bool = False, eps: float = 1e-5) -> Array:
    r"""Sentence attention block: channel weights computed from a sentence embedding.

    .. math::
        u = s \;\; (\text{or } [\mathrm{avgpool}(x);\, s] \text{ with pool\_image}), \qquad
        h = \mathrm{relu}\big(\mathrm{LN}(W_1^\top u + b_1)\big), \qquad
        a = \mathrm{gate}(W_2^\top h + b_2), \qquad \mathrm{out}_{p,c} = x_{p,c}\, a_c

    The block re-calibrates the channels of the image feature map according to the sentence
    (the question), filtering out channels irrelevant to it. The abstract leaves the exact
    layers open; this follows the authors' public code (``SentenceAttention`` in
    khoshsirat/embedding-attention-blocks, the repository of their follow-up "Embedding
    Attention Blocks", whose README cites this paper; the paper text itself was not
    available here): the excitation MLP reads the sentence embedding only, its hidden layer
    (4 x the sentence size there) is layer-normalised before the ReLU, and the gate is a
    softmax over the channels. ``gate="sigmoid"`` gives the
    squeeze-and-excitation gate instead, ``pool_image=True`` concatenates the pooled image
    channels before the sentence (an SE block conditioned on the sentence), and leaving out
    ``norm_scale``/``norm_bias`` drops the layer norm. Not attention over a sequence (none of
    CAB's four patterns).

    Args:
        x: ``[B, *spatial, C]`` image features.
        sentence: [B, D] sentence embedding.
        w1: [D, M] (or [C + D, M] with ``pool_image``), b1: [M] or None.
        w2: [M, C], b2: [C] or None.
        norm_scale: [M] layer-norm scale; with ``norm_bias`` [M]; both or neither.
        norm_bias: [M].
        gate: ``"softmax"`` over the channels (the weights sum to 1) or ``"sigmoid"``.
        pool_image: also feed the channel means of x to the MLP.
        eps: layer-norm epsilon (PyTorch's default).

    Returns:
        ``[B, *spatial, C]`` in x's dtype.

    Raises:
        ValueError: shapes that do not fit, an unknown gate, only one of the norm parameters.
        TypeError: non-floating inputs.

    >>> import jax.numpy as jnp
    >>> x, s = jnp.ones((1, 2, 2, 4)), jnp.ones((1, 3))
    >>> out = conditioned_channel_attention(x, s, jnp.zeros((3, 8)), None,
    ...                                     jnp.zeros((8, 4)), None)
    >>> out[0, 0, 0]  # equal logits: softmax weights 1/C
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)

    References:
        P26 Sentence Attention Blocks, "Sentence Attention Blocks for Answer Grounding".
    """
    C = _check_features("x", x)
    sentence = jnp.asarray(sentence)
    check_rank("sentence", sentence, (2,), "[B, D]")
    check_floating("sentence", sentence)
    if sentence.shape[0] != x.shape[0]:
        raise ValueError(f"sentence: expected batch {x.shape[0]} as x {x.shape}, "
                         f"got shape {sentence.shape}")
    if gate not in GATES:
        raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
    if (norm_scale is None) != (norm_bias is None):
        raise ValueError("norm_scale, norm_bias: give both (layer norm) or neither")
    d_in = sentence.shape[1] + (C if pool_image else 0)
    w1 = jnp.asarray(w1)
    check_rank("w1", w1, (2,), "[D, M]")
    M = w1.shape[1]
    w1 = _check_param("w1", w1, (d_in, M), "DM" if not pool_image else ["C + D", "M"])
    w2 = _check_param("w2", w2, (M, C), "MC")

    dtype = accumulation_dtype(jnp.result_type(x.dtype, sentence.dtype))
    u = sentence.astype(dtype)
    if pool_image:
        u = jnp.concatenate([_channel_means(x).astype(dtype), u], axis=-1)
    h = u @ w1.astype(dtype)
    if b1 is not None:
        h = h + _check_param("b1", b1, (M,), "M").astype(dtype)
    if norm_scale is not None:
        scale = _check_param("norm_scale", norm_scale, (M,), "M").astype(dtype)
        bias = _check_param("norm_bias", norm_bias, (M,), "M").astype(dtype)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * lax.rsqrt(var + eps) * scale + bias
    a = jax.nn.relu(h) @ w2.astype(dtype)
    if b2 is not None:
        a = a + _check_param("b2", b2, (C,), "C").astype(dtype)
    a = jax.nn.softmax(a, axis=-1) if gate == "softmax" else jax.nn.sigmoid(a)
    return _rescale(x, a)


# --------------------------------------------------------------------------------------------
# P07: DANet position and channel attention modules


def position_attention(x: Array, wq: Array, wk: Array, wv: Array, gamma: Array, *,
                       bq: Array | None = None, bk: Array | None = None,
                       bv: Array | None = None, scale: float = 1.0) -> Array:
    r"""Position attention module: every position attends to all positions of the map.

    .. math::
        q = x W_q + b_q,\; k = x W_k + b_k,\; v = x W_v + b_v, \qquad
        \mathrm{out}_j = \gamma \sum_i \mathrm{softmax}_i(\mathrm{scale}\; q_j \cdot k_i)\, v_i
            + x_j

    over the flattened positions i, j of ``*spatial`` (1x1 convolutions are per-position
    linear maps; DANet uses C/8 query/key channels, C value channels, biases, no 1/sqrt(d)
    scale, gamma initialised to 0). The attention is :func:`jattn.dot_product_attention`
    with one head over the H*W (or D*H*W) positions. CAB pattern: noncausal self-attention
    only (an image has no causal order).

    Args:
        x: ``[B, *spatial, C]``.
        wq: [C, Cq]; wk: [C, Cq]; wv: [C, Cv] (Cv == C for the residual).
        gamma: scalar weight of the attention branch.
        bq: [Cq] or None; bk: [Cq] or None; bv: [Cv] or None.
        scale: logits scale, 1 as in DANet.

    Returns:
        ``[B, *spatial, C]`` in x's dtype.

    Raises:
        ValueError: x without a spatial axis, weight shapes that do not fit C, a non-scalar
            gamma.
        TypeError: non-floating inputs.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(8.0).reshape(1, 2, 2, 2)
    >>> w = jnp.eye(2)
    >>> position_attention(x, w, w, w, 0.0).shape  # gamma = 0: the input itself
    (1, 2, 2, 2)

    References:
        P07 MPU-Net (position attention module), after Fu et al., "Dual Attention Network for
        Scene Segmentation" (PAM).
    """
    C = _check_features("x", x)
    wq = jnp.asarray(wq)
    check_rank("wq", wq, (2,), "[C, Cq]")
    Cq = wq.shape[1]
    wq = _check_param("wq", wq, (C, Cq), ["C", "Cq"])
    wk = _check_param("wk", wk, (C, Cq), ["C", "Cq"])
    wv = _check_param("wv", wv, (C, C), ["C", "Cv=C"])
    gamma = _check_gamma(gamma)
    B, L = x.shape[0], math.prod(x.shape[1:-1])
    flat = x.reshape(B, L, C)

    def project(w, b, name, size, letter):
        y = flat @ w.astype(x.dtype)
        if b is not None:
            y = y + _check_param(name, b, (size,), [letter]).astype(x.dtype)
        return y[:, :, None, :]  # one head: [B, L, 1, size]

    q = project(wq, bq, "bq", Cq, "Cq")
    k = project(wk, bk, "bk", Cq, "Cq")
    v = project(wv, bv, "bv", C, "C")
    attended = dot_product_attention(q, k, v, scale=scale)[:, :, 0]
    out = gamma.astype(attended.dtype) * attended + flat
    return out.reshape(x.shape).astype(x.dtype)


def channel_attention(x: Array, gamma: Array, *, form: str = "paper") -> Array:
    r"""Channel attention module: every channel map attends to all channel maps.

    .. math::
        E = A A^\top \in \mathbb{R}^{C \times C}, \qquad
        \mathrm{out}_j = \gamma \sum_i \mathrm{softmax}_i(E_{ji})\, A_i + A_j

    with A_i the i-th channel flattened over the positions (no projections, no scale). With
    ``form="paper"`` the softmax is of E as written in the DANet paper; ``form="max_minus"``
    is what the public DANet code computes, softmax_i(max_i' E_ji' - E_ji), which (softmax
    being shift invariant) is softmax_i(-E_ji): it weights *dissimilar* channels most. Both
    are :func:`jattn.dot_product_attention` with the channels as tokens (the max-minus form
    with the query negated), computed in float32 (or wider) whatever x's dtype. CAB pattern:
    noncausal self-attention only (channels have no order).

    Args:
        x: ``[B, *spatial, C]``.
        gamma: scalar weight of the attention branch.
        form: ``"paper"`` or ``"max_minus"``.

    Returns:
        ``[B, *spatial, C]`` in x's dtype.

    Raises:
        ValueError: x without a spatial axis, a non-scalar gamma, an unknown form.
        TypeError: non-floating inputs.

    >>> import jax.numpy as jnp
    >>> x = jnp.zeros((1, 2, 2, 3)).at[..., 0].set(1.0)
    >>> # E_00 = 4, E_0i = 0 else: channel 0 mostly reads itself; channels 1, 2 (E_ji = 0)
    >>> # read the mean of the three maps, 1/3 here.
    >>> [round(float(v), 3) for v in channel_attention(x, 1.0)[0, 0, 0]]
    [1.965, 0.333, 0.333]

    References:
        P07 MPU-Net (channel attention module), after Fu et al., "Dual Attention Network for
        Scene Segmentation" (CAM).
    """
    C = _check_features("x", x)
    gamma = _check_gamma(gamma)
    if form not in CHANNEL_FORMS:
        raise ValueError(f"form: expected one of {CHANNEL_FORMS}, got {form!r}")
    B, L = x.shape[0], math.prod(x.shape[1:-1])
    # The C x C affinity sums products over every position: its inputs go to float32 (or
    # wider) as well as its statistics. (A bfloat16 dot of these transposed tokens also
    # fails to run on XLA:CPU under jit: "Unsupported element type for DotThunk".)
    flat = x.reshape(B, L, C).astype(accumulation_dtype(x.dtype))
    channels = jnp.swapaxes(flat, 1, 2)[:, :, None, :]  # [B, C, 1, L]
    query = channels if form == "paper" else -channels
    attended = dot_product_attention(query, channels, channels, scale=1.0)[:, :, 0]
    out = gamma.astype(attended.dtype) * attended + channels[:, :, 0]
    return jnp.swapaxes(out, 1, 2).reshape(x.shape).astype(x.dtype)
