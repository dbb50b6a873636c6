"""RWKV-4 time mixing as an NNX module (the "RWKV" mixer of Zoology's figure 2).

    x_prev   = token_shift(x)                          (the previous token; 0 at t = 0)
    k, v, r  = key(lerp_k), value(lerp_v), receptance(lerp_r),
               lerp_* = mu_* x + (1 - mu_*) x_prev     (per channel)
    y        = output(sigmoid(r) * wkv(exp(time_decay), time_first, k, v))

with ``jattn.mixers.rwkv.wkv`` and ``token_shift`` doing the maths.

Initialisation, as RWKV-4's time mixing (and Zoology's copy of it) for layer l of n, with
r0 = l / (n - 1) (0 when n = 1, where the original divides by zero), r1 = 1 - l / n and
channels i = 0..d-1:

* mu_k = (i/d)^r1, mu_v = (i/d)^r1 + 0.3 r0, mu_r = (i/d)^(0.5 r1);
* time_decay_i = -5 + 8 (i/(d-1))^(0.7 + 1.3 r0) (0^p = 0; i/(d-1) is 0 when d = 1);
* time_first_i = log(0.3) + 0.5 ((i+1) mod 3 - 1): the paper code's "zigzag"
  0, 0.5, -0.5, 0, 0.5, ... around log 0.3;
* key, value, receptance, output: linear without bias, initialised like torch.nn.Linear
  (RWKV-4's own trainer zero-initialises key/receptance/output and makes value orthogonal;
  the Zoology figure-2 model re-initialises every linear layer with normal(0.02) anyway).

References:
    P24 Zoology; RWKV, "RWKV: Reinventing RNNs for the Transformer Era" (RWKV-4).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.mixers.rwkv import WKVState, token_shift, wkv
from jattn.nn._init import torch_linear
from jattn.nn.mixers import RecurrentMixer
from jattn.typing import check_rank, check_shape


class RWKVState(NamedTuple):
    """Decoding state of :class:`RWKV4TimeMix`."""

    last: jax.Array  # [B, d_model]: the last input token (for the token shift)
    wkv: WKVState  # [B, d_model] each: the WKV running sums (float32 or wider)


def rwkv4_time_mix_init(d_model: int, layer: int, num_layers: int) -> dict[str, jax.Array]:
    """RWKV-4's layer-dependent initial mu_k, mu_v, mu_r, time_decay, time_first ([d_model]
    each, float32); see the module docstring."""
    ratio_0_to_1 = layer / (num_layers - 1) if num_layers > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer / num_layers
    i = jnp.arange(d_model, dtype=jnp.float32)
    x = i / d_model
    spread = i / (d_model - 1) if d_model > 1 else jnp.zeros_like(i)
    zigzag = 0.5 * (((jnp.arange(d_model) + 1) % 3) - 1).astype(jnp.float32)
    return {
        "mu_k": x ** ratio_1_to_almost0,
        "mu_v": x ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1,
        "mu_r": x ** (0.5 * ratio_1_to_almost0),
        "time_decay": -5.0 + 8.0 * spread ** (0.7 + 1.3 * ratio_0_to_1),
        "time_first": math.log(0.3) + zigzag,
    }


class RWKV4TimeMix(RecurrentMixer):
    """RWKV-4 time mixing: token-shift lerps, key/value/receptance projections, WKV gated by
    sigmoid(receptance), output projection. Input and output [B, T, d_model]; decoding
    (``prefill``/``step``) carries an :class:`RWKVState`.

    ``implementation`` picks :func:`jattn.mixers.rwkv.wkv`'s ("scan" or "sequential").
    """

    def __init__(self, d_model: int, *, layer: int = 0, num_layers: int = 2,
                 implementation: str = "scan", rngs: nnx.Rngs):
        if d_model < 1:
            raise ValueError(f"d_model: expected >= 1, got {d_model}")
        if num_layers < 1 or not 0 <= layer < num_layers:
            raise ValueError(f"layer, num_layers: expected 0 <= layer < num_layers, "
                             f"got layer={layer}, num_layers={num_layers}")
        self.d_model = d_model
        self.implementation = implementation
        init = rwkv4_time_mix_init(d_model, layer, num_layers)
        self.mu_k = nnx.Param(init["mu_k"])
        self.mu_v = nnx.Param(init["mu_v"])
        self.mu_r = nnx.Param(init["mu_r"])
        self.time_decay = nnx.Param(init["time_decay"])
        self.time_first = nnx.Param(init["time_first"])
        self.key = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.value = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.receptance = torch_linear(d_model, d_model, rngs, use_bias=False)
        self.output = torch_linear(d_model, d_model, rngs, use_bias=False)

    def _mix(self, u: jax.Array, state: RWKVState | None, return_state: bool):
        check_rank("u", u, (3,), "[B, T, d_model]")
        if u.shape[-1] != self.d_model:
            raise ValueError(f"u: expected [B, T, d_model={self.d_model}], got {u.shape}")
        if state is not None:
            check_shape("state.last", state.last, (u.shape[0], self.d_model), "BD")
        shifted = token_shift(u, None if state is None else state.last)

        def lerp(mu):
            mu = mu[...].astype(u.dtype)
            return u * mu + shifted * (1 - mu)

        k = self.key(lerp(self.mu_k))
        v = self.value(lerp(self.mu_v))
        r = self.receptance(lerp(self.mu_r))
        result = wkv(jnp.exp(self.time_decay[...]), self.time_first[...], k, v,
                     implementation=self.implementation,
                     initial_state=None if state is None else state.wkv,
                     return_state=return_state)
        mixed, wkv_state = result if return_state else (result, None)
        y = self.output(jax.nn.sigmoid(r) * mixed)
        return (y, RWKVState(u[:, -1], wkv_state)) if return_state else (y, None)
