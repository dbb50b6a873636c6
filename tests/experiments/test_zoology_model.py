"""The figure-2 language model: wiring (quirk included), init, head, causality."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.zoology.model import FIGURE2, LanguageModel

V, D, L = 50, 16, 24


def _model(mixer="attention", faithful=True, num_layers=2, seed=0):
    return LanguageModel(vocab_size=V, d_model=D, num_layers=num_layers, max_len=L, mixer=mixer,
                         faithful=faithful, rngs=nnx.Rngs(seed))


def _tokens(seed=0, batch=3):
    return jax.random.randint(jax.random.key(seed), (batch, L), 0, V)


def _layer_norm(x, module):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * module.scale[...] + module.bias[...]


def _original_forward(model, tokens):
    """The original LMBackbone + tied head, written out from its definition."""
    E = model.embed.embedding[...]
    h = E[tokens]
    if model.positions is not None:
        h = h + model.positions.embedding[...][:L]
    residual = None
    for block in model.blocks:
        residual = h if residual is None else h + residual
        h = block.mixer(_layer_norm(residual, block.norm1))
        residual = h + residual
        h = _layer_norm(residual, block.norm2)  # state mixer: identity; returned with residual
    h = _layer_norm(h + residual, model.norm_f)
    return h @ E.T


def _clean_forward(model, tokens):
    E = model.embed.embedding[...]
    h = E[tokens] + (model.positions.embedding[...][:L] if model.positions is not None else 0)
    for block in model.blocks:
        h = h + block.mixer(_layer_norm(h, block.norm1))
        x = _layer_norm(h, block.norm2)
        hidden = jax.nn.gelu(x @ block.fc1.kernel[...] + block.fc1.bias[...], approximate=False)
        h = h + hidden @ block.fc2.kernel[...] + block.fc2.bias[...]
    return _layer_norm(h, model.norm_f) @ E.T


@pytest.mark.parametrize("mixer", ["attention", "base_conv"])
def test_faithful_wiring_matches_the_original_definition(mixer):
    model, tokens = _model(mixer), _tokens()
    np.testing.assert_allclose(model(tokens), _original_forward(model, tokens), atol=2e-5)


def test_clean_variant_is_the_standard_pre_ln_block():
    model, tokens = _model(faithful=False), _tokens()
    np.testing.assert_allclose(model(tokens), _clean_forward(model, tokens), atol=2e-5)
    assert not np.allclose(model(tokens), _original_forward(model, tokens), atol=1e-3)


def test_logits_at_targets_are_the_full_logits_there():
    model, tokens = _model(), _tokens()
    at = jnp.array([[0, 5, 23], [1, 1, 2], [22, 3, 7]])
    full = model(tokens)
    np.testing.assert_allclose(model(tokens, targets_at=at),
                               jnp.take_along_axis(full, at[..., None], axis=1), atol=1e-6)


def test_initialisation_follows_the_original():
    model = _model(num_layers=2)
    mha = model.blocks[0].mixer
    assert abs(float(model.embed.embedding[...].std()) - 0.02) < 0.002
    assert abs(float(mha.proj.qkv_proj.kernel[...].std()) - 0.02) < 0.003
    assert abs(float(mha.out_proj.kernel[...].std()) - 0.02 / 2) < 0.002  # 0.02/sqrt(2*2)
    assert float(jnp.abs(mha.proj.qkv_proj.bias[...]).max()) == 0.0
    np.testing.assert_array_equal(model.norm_f.scale[...], 1.0)
    conv = _model("base_conv").blocks[1].mixer.conv.filter  # implicit filter: linear layers
    assert abs(float(conv.w_inner[...].std()) - 0.02) < 0.005
    assert float(jnp.abs(conv.b_in[...]).max()) == 0.0


def test_position_embeddings_only_for_attention_like_mixers():
    assert _model("attention").positions is not None
    assert _model("base_conv").positions is None


@pytest.mark.parametrize("mixer", sorted(FIGURE2))
def test_every_mixer_is_causal_in_the_model(mixer):
    model, tokens = _model(mixer), _tokens(1, batch=2)
    t = 11
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % V)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-5)


def test_dropout_only_with_a_key():
    model, tokens = _model(), _tokens()
    np.testing.assert_array_equal(model(tokens), model(tokens))
    a = model(tokens, dropout_rng=jax.random.key(0))
    b = model(tokens, dropout_rng=jax.random.key(1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, model(tokens, dropout_rng=jax.random.key(0)))


def test_unknown_mixer():
    with pytest.raises(ValueError, match="mixer"):
        _model("nope")
