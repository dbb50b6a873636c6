"""NNX modules for local attention on ``[B, *spatial, d_model]`` grids (``jattn.efficient.local``).

References:
    P09 Attention Swin U-Net (Swin window / shifted-window attention blocks).
    P64 TextMonkey (shifted window attention with zero initialisation).
    P53 HaloNet (blocked local self-attention with halos).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.core.shapes import check_heads
from jattn.efficient.local import halo_attention, window_attention
from jattn.nn.layers import torch_linear


def _check_grid(x: jax.Array, spatial_dims: tuple[int, ...] | int, d_model: int,
                name: str = "x") -> None:
    ranks = (spatial_dims + 2,) if isinstance(spatial_dims, int) else (3, 4)
    if x.ndim not in ranks or x.shape[-1] != d_model:
        want = " or ".join(f"rank {r}" for r in ranks)
        raise ValueError(f"{name}: expected [B, *spatial, d_model={d_model}] ({want}), "
                         f"got {x.shape}")


def _qkv(proj: nnx.Linear, x: jax.Array, num_heads: int):
    """x [B, *spatial, d] -> q, k, v [B, *spatial, num_heads, d / num_heads]."""
    qkv = proj(x).reshape(*x.shape[:-1], 3, num_heads, -1)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


class WindowAttention(nnx.Module):
    """Swin (shifted) window self-attention (``jattn.window_attention``) with a learned
    relative position bias.

    A fused qkv projection and an output projection (initialised like torch.nn.Linear), and
    a relative position bias table [num_heads, prod(2 w - 1)] drawn from a normal with
    std 0.02 truncated at 2 std (as Swin); ``relative_position_bias=False`` drops it.
    ``zero_init_output=True`` starts the output projection at zero (weights and bias), so a
    block that adds this layer to a residual stream starts as the identity, as TextMonkey
    does for the shifted window attention it inserts into a pretrained encoder.

    Args:
        d_model: channels of the input and output.
        num_heads: heads, a divisor of d_model.
        window_size: an int or one int per spatial axis.
        shift: an int or one per axis, 0 <= shift < window (Swin: window // 2 every other
            block).
        spatial_dims: 1 or 2 when window_size is an int (a tuple gives its own length).
        relative_position_bias: learn the bias table.
        zero_init_output: zero the output projection at initialisation.
        qkv_bias: a bias in the qkv projection.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = WindowAttention(16, num_heads=2, window_size=4, shift=2,
        ...                         rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 8, 8, 16))).shape
        (1, 8, 8, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, window_size: int | tuple = 7, *,
                 shift: int | tuple = 0, spatial_dims: int = 2,
                 relative_position_bias: bool = True, zero_init_output: bool = False,
                 qkv_bias: bool = True, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        if isinstance(window_size, int):
            if spatial_dims not in (1, 2):
                raise ValueError(f"spatial_dims: expected 1 or 2, got {spatial_dims}")
            window_size = (window_size,) * spatial_dims
        window_size = tuple(window_size)
        if len(window_size) not in (1, 2) or any(w < 1 for w in window_size):
            raise ValueError(f"window_size: expected one or two ints >= 1, got {window_size}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift = shift
        self.qkv_proj = torch_linear(d_model, 3 * d_model, rngs, use_bias=qkv_bias)
        if zero_init_output:
            self.out_proj = nnx.Linear(d_model, d_model, kernel_init=nnx.initializers.zeros,
                                       bias_init=nnx.initializers.zeros, rngs=rngs)
        else:
            self.out_proj = torch_linear(d_model, d_model, rngs)
        if relative_position_bias:
            entries = math.prod(2 * w - 1 for w in window_size)
            table = 0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                                       (num_heads, entries), jnp.float32)
            self.relative_position_bias = nnx.Param(table)
        else:
            self.relative_position_bias = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d_model] or [B, L1, L2, d_model] (as many axes as the window) -> same."""
        _check_grid(x, len(self.window_size), self.d_model)
        q, k, v = _qkv(self.qkv_proj, x, self.num_heads)
        table = self.relative_position_bias
        bias = None if table is None else table[...]
        y = window_attention(q, k, v, window_size=self.window_size, shift=self.shift,
                             relative_position_bias=bias)
        return self.out_proj(y.reshape(x.shape))


class SkipWindowAttention(nnx.Module):
    """Attention on a U-Net skip connection (Attention Swin U-Net): the decoder's tokens
    read the encoder's skip features by window cross attention (``jattn.window_attention``
    with queries from the decoder, keys and values from the skip, the same windows and
    shift), and a linear layer fuses [decoder; attended skip] back to d_model, in place of
    Swin-UNet's plain concatenation of [decoder; skip] and its linear layer.

    Our reading of P09: the abstract says the skip path's "classical concatenation" is
    improved "by incorporating an attention mechanism"; the public code carries several
    variants (CrossViT-style token exchange, cross-covariance attention on the skip). This
    module is the cross-attention form: each decoder position attends to the skip features
    of its window. Layer norms on both inputs, torch.nn.Linear-style initialisation.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = SkipWindowAttention(16, num_heads=2, window_size=4, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 8, 8, 16)), jnp.ones((1, 8, 8, 16))).shape
        (1, 8, 8, 16)

    References:
        P09 Attention Swin U-Net, "Attention Swin U-Net: Cross-Contextual Attention Mechanism
        for Skin Lesion Segmentation".
    """

    def __init__(self, d_model: int, num_heads: int = 1, window_size: int | tuple = 7, *,
                 shift: int | tuple = 0, rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.d_model = d_model
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift = shift
        self.decoder_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.skip_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.q_proj = torch_linear(d_model, d_model, rngs)
        self.kv_proj = torch_linear(d_model, 2 * d_model, rngs)
        self.out_proj = torch_linear(d_model, d_model, rngs)
        self.fuse = torch_linear(2 * d_model, d_model, rngs)

    def __call__(self, decoder: jax.Array, skip: jax.Array) -> jax.Array:
        """decoder, skip ``[B, *spatial, d_model]`` (1 or 2 spatial axes, the same grid) ->
        ``[B, *spatial, d_model]``."""
        _check_grid(decoder, (3, 4), self.d_model, "decoder")
        if skip.shape != decoder.shape:
            raise ValueError(f"skip: expected the decoder's shape {decoder.shape}, got "
                             f"{skip.shape}")
        heads = (*decoder.shape[:-1], self.num_heads, -1)
        q = self.q_proj(self.decoder_norm(decoder)).reshape(heads)
        k, v = (a.reshape(heads) for a in jnp.split(self.kv_proj(self.skip_norm(skip)), 2, -1))
        read = window_attention(q, k, v, window_size=self.window_size, shift=self.shift)
        read = self.out_proj(read.reshape(decoder.shape))
        return self.fuse(jnp.concatenate([decoder, read], axis=-1))


class HaloAttention(nnx.Module):
    """HaloNet blocked local self-attention (``jattn.halo_attention``) over 1-D or 2-D grids.

    A fused qkv projection and an output projection, initialised like torch.nn.Linear.
    HaloNet's relative position embeddings are not included.

    Args:
        d_model: channels of the input and output.
        num_heads: heads, a divisor of d_model.
        block_size: an int or one per spatial axis (HaloNet: 8).
        halo_size: an int or one per spatial axis (HaloNet: 3).
        is_causal: causal attention (1-D inputs only).
        qkv_bias: a bias in the qkv projection.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = HaloAttention(16, num_heads=2, block_size=4, halo_size=1,
        ...                       rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((1, 8, 8, 16))).shape
        (1, 8, 8, 16)
    """

    def __init__(self, d_model: int, num_heads: int = 1, block_size: int | tuple = 8,
                 halo_size: int | tuple = 3, *, is_causal: bool = False, qkv_bias: bool = True,
                 rngs: nnx.Rngs):
        check_heads(d_model, num_heads)
        self.d_model = d_model
        self.num_heads = num_heads
        self.block_size = block_size
        self.halo_size = halo_size
        self.is_causal = is_causal
        self.qkv_proj = torch_linear(d_model, 3 * d_model, rngs, use_bias=qkv_bias)
        self.out_proj = torch_linear(d_model, d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d_model] or [B, L1, L2, d_model] -> same shape."""
        _check_grid(x, (1, 2), self.d_model)
        q, k, v = _qkv(self.qkv_proj, x, self.num_heads)
        y = halo_attention(q, k, v, block_size=self.block_size, halo_size=self.halo_size,
                           is_causal=self.is_causal)
        return self.out_proj(y.reshape(x.shape))
