"""NNX modules for pointer networks (``jattn.applications.pointer``).

References:
    P67 Pointer Networks, Vinyals, Fortunato and Jaitly, "Pointer Networks" (NeurIPS 2015).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.applications.pointer import additive_scores, greedy_pointer_decode, pointer_distribution
from jattn.core.shapes import (
    check_bool,
    check_floating,
    check_int,
    check_integer,
    check_rank,
    check_shape,
)
from jattn.nn.layers import torch_uniform


class PointerAttention(nnx.Module):
    """The pointer: additive scores of decoder states against encoder states
    (``jattn.additive_scores``) turned into log-probabilities over the input
    positions (``jattn.pointer_distribution``).

    W_q [query_dim, attention_dim] and W_k [key_dim, attention_dim] start as bias-free
    torch.nn.Linear layers, v [attention_dim] as torch.nn.Linear(attention_dim, 1).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> pointer = PointerAttention(8, 6, 16, rngs=nnx.Rngs(0))
        >>> pointer(jnp.ones((2, 3, 8)), jnp.ones((2, 5, 6))).shape
        (2, 3, 5)
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int, *, rngs: nnx.Rngs):
        for name, value in (("query_dim", query_dim), ("key_dim", key_dim),
                            ("attention_dim", attention_dim)):
            check_int(name, value)
        self.w_q = torch_uniform(rngs, (query_dim, attention_dim), query_dim)
        self.w_k = torch_uniform(rngs, (key_dim, attention_dim), key_dim)
        self.v = torch_uniform(rngs, (attention_dim,), attention_dim)

    def scores(self, query: jax.Array, keys: jax.Array) -> jax.Array:
        """query [B, T, query_dim], keys [B, S, key_dim] -> scores [B, T, S]."""
        return additive_scores(query, keys, self.w_q[...], self.w_k[...], self.v[...])

    def __call__(self, query: jax.Array, keys: jax.Array, *, mask: jax.Array | None = None,
                 chosen: jax.Array | None = None) -> jax.Array:
        """Log-probabilities [B, T, S]; ``mask`` and ``chosen`` as in
        ``jattn.pointer_distribution``."""
        return pointer_distribution(self.scores(query, keys), mask=mask, chosen=chosen)


class PointerNetwork(nnx.Module):
    """Vinyals et al.'s Ptr-Net: an LSTM encoder, an LSTM decoder and a pointer.

    The encoder LSTM reads the input vectors x_1..x_S ([B, S, input_dim], fed directly as
    in the paper) into states e_j; the decoder LSTM starts from the encoder's final state,
    reads a learned "go" vector at the first step and the input element pointed to at the
    previous step afterwards; the pointer scores v^T tanh(W_k e_j + W_q d_i) give the
    distribution over the input positions (positions already chosen are masked: the output
    is a permutation, as for sorting). Training uses teacher forcing (``__call__`` with the
    target positions); ``decode`` is greedy (the paper uses a beam search). ``mask`` marks
    real inputs; padding must come after them (the encoder's final state is the one at the
    last real input).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> net = PointerNetwork(1, 16, rngs=nnx.Rngs(0))
        >>> x = jnp.array([[[0.3], [0.1], [0.2]]])
        >>> net(x, jnp.array([[1, 2, 0]])).shape
        (1, 3, 3)
        >>> chosen, log_probs = net.decode(x)
        >>> chosen.shape, log_probs.shape
        ((1, 3), (1, 3, 3))
    """

    def __init__(self, input_dim: int, hidden_dim: int, *, attention_dim: int | None = None,
                 rngs: nnx.Rngs):
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim)):
            check_int(name, value)
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.encoder = nnx.RNN(nnx.OptimizedLSTMCell(input_dim, hidden_dim, rngs=rngs),
                               return_carry=True)
        self.decoder = nnx.RNN(nnx.OptimizedLSTMCell(input_dim, hidden_dim, rngs=rngs))
        self.go = torch_uniform(rngs, (input_dim,), input_dim)
        self.pointer = PointerAttention(hidden_dim, hidden_dim,
                                        hidden_dim if attention_dim is None else attention_dim,
                                        rngs=rngs)

    def _check(self, inputs: jax.Array, mask: jax.Array | None) -> jax.Array:
        check_rank("inputs", inputs, (3,), "[B, S, input_dim]")
        check_floating("inputs", inputs)
        if inputs.shape[2] != self.input_dim or inputs.shape[1] == 0:
            raise ValueError(f"inputs: expected [B, S >= 1, input_dim={self.input_dim}], "
                             f"got shape {inputs.shape}")
        if mask is None:
            return jnp.ones(inputs.shape[:2], bool)
        check_shape("mask", mask, inputs.shape[:2], "BS")
        check_bool("mask", mask)
        return mask

    def encode(self, inputs: jax.Array, *, mask: jax.Array | None = None):
        """inputs [B, S, input_dim] -> (encoder states [B, S, hidden_dim], final LSTM carry)."""
        mask = self._check(inputs, mask)
        carry, states = self.encoder(inputs, seq_lengths=mask.sum(1))
        return states, carry

    def __call__(self, inputs: jax.Array, targets: jax.Array, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """Teacher-forced log-probabilities [B, T, S] of pointing at each input position at
        each of the T steps; ``targets`` int [B, T] are the positions to output (-1 for
        padding steps), fed back as the decoder inputs and masked from the later steps."""
        mask = self._check(inputs, mask)
        check_rank("targets", targets, (2,), "[B, T]")
        check_integer("targets", targets)
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"targets: expected batch {inputs.shape[0]} as inputs, "
                             f"got shape {targets.shape}")
        states, carry = self.encode(inputs, mask=mask)
        B = inputs.shape[0]
        pointed = jnp.take_along_axis(inputs, jnp.maximum(targets[:, :-1], 0)[..., None], 1)
        go = jnp.broadcast_to(self.go[...].astype(inputs.dtype), (B, 1, self.input_dim))
        decoded = self.decoder(jnp.concatenate([go, pointed], axis=1), initial_carry=carry)
        return self.pointer(decoded, states, mask=mask, chosen=targets)

    def decode(self, inputs: jax.Array, *, mask: jax.Array | None = None,
               num_steps: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Greedy decoding (``jattn.greedy_pointer_decode``): (chosen int32
        [B, num_steps], log_probs [B, num_steps, S]); num_steps defaults to S."""
        mask = self._check(inputs, mask)
        states, carry = self.encode(inputs, mask=mask)
        go = self.go[...].astype(inputs.dtype)
        cell = self.decoder.cell

        def step(carry, previous):
            pointed = jnp.take_along_axis(inputs, jnp.maximum(previous, 0)[:, None, None], 1)
            x = jnp.where(previous[:, None] < 0, go, pointed[:, 0])
            carry, hidden = cell(carry, x)
            return self.pointer.scores(hidden[:, None], states)[:, 0], carry

        return greedy_pointer_decode(step, carry, mask, num_steps=num_steps)
