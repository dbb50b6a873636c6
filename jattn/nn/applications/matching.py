"""NNX modules for matching and contrastive objectives (``jattn.applications.matching``).

* :class:`InfoNCELoss` and :class:`FILIPLoss`: the dual-encoder and FILIP contrastive losses
  with a learnable temperature held as a log-parameter, clamped as in CLIP.
* :class:`ConditionalTransportAlignment`: PatchCT's patch and label projections into one
  space, then the CT navigators and cost (optionally a learnable navigator temperature).
* :class:`RecurrentCorrespondenceRegulator`: RCAR's iterative cross attention with its
  learned regulators of the attention factor and the query modulation.

References:
    P02 PatchCT, "PatchCT: Aligning Patch Set and Label Set with Conditional Transport for
    Multi-Label Image Classification".
    P20 FILIP, "FILIP: Fine-grained Interactive Language-Image Pre-Training".
    P28 ALIGN, "Scaling Up Visual and Vision-Language Representation Learning With Noisy Text
    Supervision".
    P30 RCAR, "Plug-and-Play Regulators for Image-Text Matching".
    P73 MagicLens, "MagicLens: Self-Supervised Image Retrieval with Open-Ended Instructions".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.applications.matching import (
    ConditionalTransport,
    IterativeCrossAttention,
    conditional_transport,
    filip_loss,
    info_nce,
    iterative_cross_attention,
)
from jattn.core.shapes import check_int
from jattn.nn.layers import torch_linear


class _LearnedTemperature(nnx.Module):
    """A temperature tau = 1 / min(exp(s), max_inverse_temperature) with s a parameter.

    CLIP's parametrisation: s = log(1 / tau) starts at log(1 / initial_temperature) (CLIP:
    tau = 0.07) and the scale exp(s) is clamped at ``max_inverse_temperature`` (CLIP: 100,
    i.e. tau >= 0.01). CLIP clamps the parameter in place after each step; here the clamp is
    applied in the forward pass (no gradient beyond it), which gives the same loss.
    ``learn=False`` keeps s as a non-trainable variable (a fixed temperature).
    """

    def __init__(self, initial_temperature: float, max_inverse_temperature: float | None,
                 learn: bool):
        if not initial_temperature > 0:
            raise ValueError(f"initial_temperature: expected a positive number, got "
                             f"{initial_temperature!r}")
        if max_inverse_temperature is not None and not max_inverse_temperature > 0:
            raise ValueError(f"max_inverse_temperature: expected a positive number or None, "
                             f"got {max_inverse_temperature!r}")
        value = jnp.asarray(math.log(1.0 / initial_temperature), jnp.float32)
        self.log_inverse_temperature = nnx.Param(value) if learn else nnx.Variable(value)
        self.max_inverse_temperature = max_inverse_temperature

    def temperature(self) -> jax.Array:
        """The current tau, a float32 scalar."""
        scale = jnp.exp(self.log_inverse_temperature[...])
        if self.max_inverse_temperature is not None:
            scale = jnp.minimum(scale, self.max_inverse_temperature)
        return 1.0 / scale


class InfoNCELoss(_LearnedTemperature):
    """Symmetric InfoNCE (``jattn.info_nce``) with a learnable temperature.

    The dual-encoder objective of ALIGN (and MagicLens' query-to-target form): the encoders
    are the user's; this module holds only log(1 / tau). Defaults as CLIP: tau starts at
    0.07, 1 / tau is clamped at 100.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> loss = InfoNCELoss(rngs=nnx.Rngs(0))
        >>> a = jax.random.normal(jax.random.key(0), (4, 8))
        >>> loss(a, a + 0.1).shape, round(float(loss.temperature()), 3)
        ((), 0.07)
    """

    def __init__(self, *, initial_temperature: float = 0.07,
                 max_inverse_temperature: float | None = 100.0, learn: bool = True,
                 normalize: bool = True, rngs: nnx.Rngs | None = None):
        super().__init__(initial_temperature, max_inverse_temperature, learn)
        self.normalize = normalize

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """a, b [B, D] paired embeddings -> the scalar loss."""
        return info_nce(a, b, temperature=self.temperature(), normalize=self.normalize)


class FILIPLoss(_LearnedTemperature):
    """FILIP's late-interaction contrastive loss (``jattn.filip_loss``) with a
    learnable temperature (CLIP's parametrisation and defaults, as :class:`InfoNCELoss`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> loss = FILIPLoss(rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (4, 9, 8))
        >>> y = jax.random.normal(jax.random.key(1), (4, 5, 8))
        >>> loss(x, y, text_mask=jnp.arange(5) < jnp.array([[5], [3], [4], [2]])).shape
        ()
    """

    def __init__(self, *, initial_temperature: float = 0.07,
                 max_inverse_temperature: float | None = 100.0, learn: bool = True,
                 normalize: bool = True, rngs: nnx.Rngs | None = None):
        super().__init__(initial_temperature, max_inverse_temperature, learn)
        self.normalize = normalize

    def __call__(self, image_tokens: jax.Array, text_tokens: jax.Array, *,
                 image_mask: jax.Array | None = None,
                 text_mask: jax.Array | None = None) -> jax.Array:
        """image_tokens [B, P, D], text_tokens [B, W, D], masks bool -> the scalar loss."""
        return filip_loss(image_tokens, text_tokens, temperature=self.temperature(),
                          image_mask=image_mask, text_mask=text_mask,
                          normalize=self.normalize)


class ConditionalTransportAlignment(_LearnedTemperature):
    """PatchCT's alignment: patches and labels projected into one ``dim``-space, then the
    conditional transport between the two sets (``jattn.conditional_transport``).

    ``patch_dim`` / ``label_dim`` None skips that projection (the embeddings are already in
    the shared space). The navigator temperature starts at ``initial_temperature`` and is
    learned with ``learn_temperature`` (log-parametrised, unclamped). Projections start as
    torch.nn.Linear. The call returns the :class:`jattn.ConditionalTransport`
    tuple; PatchCT trains on ``cost.mean()`` next to its classification loss.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> ct = ConditionalTransportAlignment(32, 16, dim=8, rngs=nnx.Rngs(0))
        >>> patches = jax.random.normal(jax.random.key(0), (2, 6, 32))
        >>> labels = jax.random.normal(jax.random.key(1), (5, 16))   # one per class
        >>> targets = jnp.array([[1.0, 0, 1, 0, 0], [0, 0, 0, 1, 1]])
        >>> ct(patches, labels, label_weights=targets).cost.shape
        (2,)
    """

    def __init__(self, patch_dim: int | None, label_dim: int | None, *, dim: int | None = None,
                 initial_temperature: float = 0.1, learn_temperature: bool = False,
                 similarity: str = "cosine", use_bias: bool = True, rngs: nnx.Rngs):
        super().__init__(initial_temperature, None, learn_temperature)
        if (patch_dim is not None or label_dim is not None) and dim is None:
            raise ValueError("dim: required when patch_dim or label_dim asks for a projection")
        self.similarity = similarity
        self.patch_proj = (None if patch_dim is None
                           else torch_linear(patch_dim, dim, rngs, use_bias=use_bias))
        self.label_proj = (None if label_dim is None
                           else torch_linear(label_dim, dim, rngs, use_bias=use_bias))

    def project(self, patches: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The two sets in the shared space."""
        x = patches if self.patch_proj is None else self.patch_proj(patches)
        y = labels if self.label_proj is None else self.label_proj(labels)
        return x, y

    def __call__(self, patches: jax.Array, labels: jax.Array, *,
                 patch_weights: jax.Array | None = None,
                 label_weights: jax.Array | None = None) -> ConditionalTransport:
        """patches [B, P, patch_dim], labels [B, L, label_dim] or [L, label_dim], weights
        [B, P] / [B, L] or [L] -> ConditionalTransport."""
        x, y = self.project(patches, labels)
        return conditional_transport(x, y, x_weights=patch_weights, y_weights=label_weights,
                                     temperature=self.temperature(),
                                     similarity=self.similarity)


def _xavier_linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """RCAR's initialisation: Xavier-uniform weights, zero bias."""
    return nnx.Linear(d_in, d_out, kernel_init=nnx.initializers.xavier_uniform(),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class _RegulatorStep(nnx.Module):
    """One round's learned update (RCAR's alignment vector and correspondence regulator)."""

    def __init__(self, dim: int, sim_dim: int, rngs: nnx.Rngs):
        self.alignment = _xavier_linear(dim, sim_dim, rngs)
        self.factor_hidden = _xavier_linear(sim_dim, sim_dim // 2, rngs)
        self.factor_out = _xavier_linear(sim_dim // 2, 1, rngs)
        self.modulation_hidden = _xavier_linear(sim_dim, 2 * sim_dim, rngs)
        self.modulation_out = _xavier_linear(2 * sim_dim, dim, rngs)


class RecurrentCorrespondenceRegulator(nnx.Module):
    """RCAR's Recurrent Correspondence Regulator around
    :func:`jattn.iterative_cross_attention`.

    Each of the ``num_steps`` rounds has its own parameters (as in RCAR's code). After round r
    attended a^(r), with q the raw query:

        h = normalize(W_h (q - a^(r))^2)                     (the alignment vector)
        lambda <- relu(lambda + MLP_lambda(h))               (Linear, tanh, Linear to 1)
        m <- clip(m + tanh(MLP_m(h)), -1, 1)                 (Linear, tanh, Linear to D)

    starting from lambda = ``initial_inverse_temperature`` (SCAN's lambda = 9 by default)
    and m = 1. RCAR's matching score is then mean_t cos(q_t, a_t) over the valid words
    (:meth:`similarity`). Linear layers start Xavier-uniform with zero biases, as RCAR's code.
    The attention's score form is the function's (cosine scores, no SCAN LeakyReLU
    normalisation): see its docstring.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> rcr = RecurrentCorrespondenceRegulator(8, num_steps=2, sim_dim=16,
        ...                                        rngs=nnx.Rngs(0))
        >>> words = jax.random.normal(jax.random.key(0), (2, 5, 8))
        >>> regions = jax.random.normal(jax.random.key(1), (2, 7, 8))
        >>> out = rcr(words, regions)
        >>> out.attended.shape, rcr.similarity(words, out.attended).shape
        ((2, 5, 8), (2,))
    """

    def __init__(self, dim: int, *, num_steps: int, sim_dim: int = 256,
                 initial_inverse_temperature: float = 9.0, rngs: nnx.Rngs):
        check_int("num_steps", num_steps, minimum=0)
        if sim_dim < 2:
            raise ValueError(f"sim_dim: expected an int >= 2, got {sim_dim!r}")
        if not initial_inverse_temperature > 0:
            raise ValueError(f"initial_inverse_temperature: expected a positive number, got "
                             f"{initial_inverse_temperature!r}")
        self.num_steps = num_steps
        self.initial_inverse_temperature = float(initial_inverse_temperature)
        self.steps = nnx.List([_RegulatorStep(dim, sim_dim, rngs) for _ in range(num_steps)])

    def regulate(self, step: int, query: jax.Array, attended: jax.Array,
                 inverse_temperature: jax.Array, modulation: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        """The regulator handed to :func:`jattn.iterative_cross_attention`."""
        p = self.steps[step]
        h = p.alignment(jnp.square(query - attended))
        h = h * jax.lax.rsqrt(jnp.maximum(jnp.sum(h * h, -1, keepdims=True), 1e-24))
        factor = p.factor_out(jnp.tanh(p.factor_hidden(h)))[..., 0]
        change = jnp.tanh(p.modulation_out(jnp.tanh(p.modulation_hidden(h))))
        return (jax.nn.relu(inverse_temperature + factor),
                jnp.clip(modulation + change, -1.0, 1.0))

    def __call__(self, query: jax.Array, context: jax.Array, *,
                 context_mask: jax.Array | None = None,
                 query_mask: jax.Array | None = None) -> IterativeCrossAttention:
        """query [B, T, dim] (words), context [B, S, dim] (regions), masks bool."""
        return iterative_cross_attention(
            query, context, num_steps=self.num_steps,
            inverse_temperature=self.initial_inverse_temperature, regulator=self.regulate,
            context_mask=context_mask, query_mask=query_mask)

    @staticmethod
    def similarity(query: jax.Array, attended: jax.Array, *,
                   query_mask: jax.Array | None = None) -> jax.Array:
        """RCAR's matching score: the mean over valid queries of cos(q_t, a_t), [B]."""
        num = jnp.sum(query * attended, -1)
        den = jnp.linalg.norm(query, axis=-1) * jnp.linalg.norm(attended, axis=-1)
        cos = num / jnp.maximum(den, 1e-8)
        if query_mask is None:
            return cos.mean(-1)
        m = query_mask.astype(cos.dtype)
        return (cos * m).sum(-1) / jnp.maximum(m.sum(-1), 1)
