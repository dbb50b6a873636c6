"""NNX modules for channel and spatial attention over conv features
(``jattn.applications.channel``).

Feature maps are channels-last, ``[B, *spatial, C]``. Parameters start as the PyTorch layers of
the public implementations: ``torch.nn.Conv1d(1, 1, k, bias=False)`` for ECA, and
``torch.nn.Linear`` / 1x1 ``torch.nn.Conv2d`` (uniform in +-1/sqrt(fan_in), biases included)
for the rest; layer norms start at scale 1, bias 0; DANet's gamma starts at 0, so the
position and channel attention modules are the identity at initialisation.

References:
    P07 MPU-Net (position attention module), after DANet's position and channel attention
    modules.
    P26 Sentence Attention Blocks, "Sentence Attention Blocks for Answer Grounding".
    P49 ECA-Net, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
    Networks".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.applications.channel import (
    CHANNEL_FORMS,
    GATES,
    channel_attention,
    conditioned_channel_attention,
    eca,
    eca_kernel_size,
    position_attention,
    squeeze_excitation,
)
from jattn.core.shapes import check_int
from jattn.nn.layers import torch_linear, torch_uniform


def _check_channels(x: jax.Array, channels: int) -> None:
    if x.ndim < 3 or x.shape[-1] != channels:
        raise ValueError(f"x: expected [B, *spatial, C={channels}], got shape {x.shape}")


def _bias(linear: nnx.Linear):
    return None if linear.bias is None else linear.bias[...]


class ECA(nnx.Module):
    """Efficient channel attention (``jattn.eca``) with a learned 1-D kernel.

    The kernel size is ``kernel_size`` or the adaptive ``eca_kernel_size(channels, gamma, b)``
    (gamma=2, b=1 in the paper); the kernel starts uniform in +-1/sqrt(k) as
    torch.nn.Conv1d(1, 1, k).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = ECA(64, rngs=nnx.Rngs(0))
        >>> layer.kernel_size, layer(jnp.ones((2, 4, 4, 64))).shape
        (3, (2, 4, 4, 64))
    """

    def __init__(self, channels: int, *, kernel_size: int | None = None, gamma: float = 2,
                 b: float = 1, rngs: nnx.Rngs):
        self.channels = check_int("channels", channels)
        k = eca_kernel_size(channels, gamma, b) if kernel_size is None else kernel_size
        if check_int("kernel_size", k) % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size, got {k}")
        self.kernel_size = k
        self.kernel = torch_uniform(rngs, (k,), k)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, *spatial, C]`` -> ``[B, *spatial, C]``."""
        _check_channels(x, self.channels)
        return eca(x, self.kernel[...])


class SqueezeExcitation(nnx.Module):
    """Squeeze-and-excitation (``jattn.squeeze_excitation``): channels ->
    channels // reduction (at least 1) -> channels, with biases.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> SqueezeExcitation(32, rngs=nnx.Rngs(0))(jnp.ones((2, 4, 4, 32))).shape
        (2, 4, 4, 32)
    """

    def __init__(self, channels: int, *, reduction: int = 16, rngs: nnx.Rngs):
        self.channels = check_int("channels", channels)
        hidden = max(1, channels // check_int("reduction", reduction))
        self.fc1 = torch_linear(channels, hidden, rngs)
        self.fc2 = torch_linear(hidden, channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, *spatial, C]`` -> ``[B, *spatial, C]``."""
        _check_channels(x, self.channels)
        return squeeze_excitation(x, self.fc1.kernel[...], _bias(self.fc1),
                                  self.fc2.kernel[...], _bias(self.fc2))


class SentenceAttentionBlock(nnx.Module):
    """Sentence attention block (``jattn.conditioned_channel_attention``): a sentence
    embedding re-weights the channels of an image feature map.

    As the authors' code: Linear(sentence_dim, hidden_dim = 4 * sentence_dim), LayerNorm,
    ReLU, Linear(hidden_dim, channels), softmax over the channels. ``gate="sigmoid"``,
    ``pool_image=True`` (the pooled image channels join the sentence at the input) and
    ``layer_norm=False`` give the SE-like variants.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> block = SentenceAttentionBlock(32, sentence_dim=8, rngs=nnx.Rngs(0))
        >>> block(jnp.ones((2, 4, 4, 32)), jnp.ones((2, 8))).shape
        (2, 4, 4, 32)
    """

    def __init__(self, channels: int, sentence_dim: int, *, hidden_dim: int | None = None,
                 layer_norm: bool = True, gate: str = "softmax", pool_image: bool = False,
                 eps: float = 1e-5, rngs: nnx.Rngs):
        self.channels = check_int("channels", channels)
        check_int("sentence_dim", sentence_dim)
        hidden = 4 * sentence_dim if hidden_dim is None else hidden_dim
        check_int("hidden_dim", hidden)
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        self.gate = gate
        self.pool_image = pool_image
        self.eps = eps
        self.fc1 = torch_linear(sentence_dim + (channels if pool_image else 0), hidden, rngs)
        self.fc2 = torch_linear(hidden, channels, rngs)
        self.norm_scale = nnx.Param(jnp.ones((hidden,), jnp.float32)) if layer_norm else None
        self.norm_bias = nnx.Param(jnp.zeros((hidden,), jnp.float32)) if layer_norm else None

    def __call__(self, x: jax.Array, sentence: jax.Array) -> jax.Array:
        """x ``[B, *spatial, C]``, sentence [B, sentence_dim] -> ``[B, *spatial, C]``."""
        _check_channels(x, self.channels)
        norm = ({} if self.norm_scale is None else
                {"norm_scale": self.norm_scale[...], "norm_bias": self.norm_bias[...]})
        return conditioned_channel_attention(
            x, sentence, self.fc1.kernel[...], _bias(self.fc1), self.fc2.kernel[...],
            _bias(self.fc2), gate=self.gate, pool_image=self.pool_image, eps=self.eps, **norm)


class PositionAttention(nnx.Module):
    """DANet's position attention module (``jattn.position_attention``), the one in
    MPU-Net: 1x1 query/key projections to channels // reduction (8 in DANet), a 1x1 value
    projection to channels, all with biases, and gamma (initialised to 0) scaling the
    attention branch added to the input.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> PositionAttention(16, rngs=nnx.Rngs(0))(jnp.ones((2, 4, 4, 16))).shape
        (2, 4, 4, 16)
    """

    def __init__(self, channels: int, *, reduction: int = 8, scale: float = 1.0,
                 rngs: nnx.Rngs):
        self.channels = check_int("channels", channels)
        inner = max(1, channels // check_int("reduction", reduction))
        self.scale = scale
        self.query = torch_linear(channels, inner, rngs)
        self.key = torch_linear(channels, inner, rngs)
        self.value = torch_linear(channels, channels, rngs)
        self.gamma = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, *spatial, C]`` -> ``[B, *spatial, C]``."""
        _check_channels(x, self.channels)
        return position_attention(
            x, self.query.kernel[...], self.key.kernel[...], self.value.kernel[...],
            self.gamma[...], bq=_bias(self.query), bk=_bias(self.key), bv=_bias(self.value),
            scale=self.scale)


class ChannelAttention(nnx.Module):
    """DANet's channel attention module (``jattn.channel_attention``): no
    projections, one learned gamma (initialised to 0). ``form="paper"`` (softmax of the
    channel affinity, as written) or ``"max_minus"`` (the public code's softmax of
    max - affinity).

    Example:
        >>> import jax.numpy as jnp
        >>> ChannelAttention()(jnp.ones((2, 4, 4, 16))).shape
        (2, 4, 4, 16)
    """

    def __init__(self, *, form: str = "paper"):
        if form not in CHANNEL_FORMS:
            raise ValueError(f"form: expected one of {CHANNEL_FORMS}, got {form!r}")
        self.form = form
        self.gamma = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, *spatial, C]`` -> ``[B, *spatial, C]``."""
        return channel_attention(x, self.gamma[...], form=self.form)
