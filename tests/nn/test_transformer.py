"""The Transformer with any mixer: a block equals its definition, decoding with the layers'
states equals the full causal forward, generate() equals a naive loop, the encoder-decoder's
masks, auxiliary losses, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn.transformer import (
    EncoderDecoder,
    TransformerBlock,
    TransformerLM,
    generate,
)

V, D, L = 23, 16, 24


def _tokens(seed, shape, vocab=V):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_block_is_prenorm_residual_mixer_then_mlp():
    block = TransformerBlock(D, "attention", num_heads=2, norm="rmsnorm", mlp="swiglu",
                             rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, D))
    h = x + block.mixer(block.mixer_norm(x))
    m = block.mlp
    z = block.mlp_norm(h)
    want = h + m.down(jax.nn.silu(m.gate(z)) * m.up(z))
    np.testing.assert_allclose(block(x), want, atol=1e-5)


DECODABLE = {
    "attention": dict(mixer="attention"),
    "window": dict(mixer="attention", mixer_options={"window": 3}),
    "gqa_diffqkv": dict(mixer="attention", mixer_options={"num_kv_heads": 1,
                                                          "num_value_heads": 2}),
    "rope": dict(mixer="attention", positions=None, mixer_options={"rope_base": 100.0,
                                                                   "rope_fraction": 0.5}),
    "linear": dict(mixer="linear"),
    "cosformer": dict(mixer="linear", mixer_options={"feature_map": "cosformer"}),
    "based": dict(mixer="based", positions="sinusoidal"),
    "hybrid": dict(mixer=["attention", "linear", "based"]),
    "moh": dict(mixer="moh", mixer_options={"num_shared": 1, "top_k": 1}),
    "base_conv": dict(mixer="base_conv"),
    "base_conv_long": dict(mixer="base_conv", mixer_options={"kernel_size": -1}),
    "hyena": dict(mixer="hyena", mixer_options={"filter_order": 8}),
    "h3": dict(mixer="h3", mixer_options={"d_state": 4}),
    "mamba": dict(mixer="mamba", mixer_options={"d_state": 4}),
    "rwkv": dict(mixer="rwkv", positions=None),
    "titans_lmm": dict(mixer="titans_lmm", positions=None,
                       mixer_options={"chunk_size": 1, "num_persistent": 2}),
    "titans_mag": dict(mixer="titans_mag", positions=None,
                       mixer_options={"chunk_size": 1, "window": 3, "num_persistent": 2}),
    "titans_mac": dict(mixer="titans_mac", positions=None,
                       mixer_options={"chunk_size": 1, "segment_size": 4, "num_persistent": 2}),
    "titans_mal": dict(mixer="titans_mal", positions=None,
                       mixer_options={"implementation": "sequential", "window": 3}),
}


@pytest.mark.parametrize("name", DECODABLE)
def test_decoding_with_states_equals_the_full_forward(name):
    options = DECODABLE[name]
    layers = len(options["mixer"]) if isinstance(options["mixer"], list) else 2
    lm = TransformerLM(V, D, layers, num_heads=2, max_length=L, rngs=nnx.Rngs(3), **options)
    tokens = _tokens(4, (2, 11))
    full = jax.jit(lambda m, t: m(t))(lm, tokens)
    # Prefill 5 tokens, then one at a time, then a block of 3 (teacher forcing).
    logits, states = nnx.jit(lambda m, t: m.prefill(t))(lm, tokens[:, :5])
    pieces = [logits]
    step = nnx.jit(lambda m, t, s, p: m.step(t, s, p))
    for t in range(5, 8):
        logits, states = step(lm, tokens[:, t:t + 1], states, jnp.int32(t))
        pieces.append(logits)
    logits, states = step(lm, tokens[:, 8:], states, jnp.int32(8))
    pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-4, rtol=1e-4)


def test_decoding_and_generate_with_x64_enabled():
    """MultiHeadAttention's prefill/step and generate() under jax_enable_x64 (int64 Python
    scalars beside the int32 cache length) give what they give without it."""
    lm = TransformerLM(V, D, 2, num_heads=2, max_length=L, rngs=nnx.Rngs(9))
    prompt = _tokens(10, (2, 4))
    want = generate(lm, prompt, max_new_tokens=4)
    tokens = _tokens(11, (2, 7))
    full = jax.jit(lambda m, t: m(t))(lm, tokens)
    with jax.enable_x64(True):
        np.testing.assert_array_equal(generate(lm, prompt, max_new_tokens=4), want)
        logits, states = lm.prefill(tokens[:, :5])
        pieces = [logits]
        for t in (5, 6):
            logits, states = lm.step(tokens[:, t:t + 1], states, t)
            pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=2e-4, rtol=1e-4)


def _naive_greedy(lm, prompt, n, **kwargs):
    """Greedy decoding by running the whole causal forward on the growing sequence (jitted:
    op-by-op it costs several times as much as compiling one program per length)."""
    forward = nnx.jit(lambda m, t: m(t, **kwargs))
    tokens = prompt
    for _ in range(n):
        nxt = jnp.argmax(forward(lm, tokens)[:, -1], axis=-1).astype(jnp.int32)
        tokens = jnp.concatenate([tokens, nxt[:, None]], 1)
    return tokens


@pytest.mark.parametrize("mixer", ["attention", ["linear", "attention"]])
def test_greedy_generate_equals_the_naive_loop(mixer):
    lm = TransformerLM(V, D, 2, mixer=mixer, num_heads=2, max_length=L, rngs=nnx.Rngs(5))
    prompt = _tokens(6, (3, 4))
    got = generate(lm, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(got, _naive_greedy(lm, prompt, 6))


def test_sampling_respects_top_k_and_the_key():
    lm = TransformerLM(V, D, 1, num_heads=2, max_length=L, rngs=nnx.Rngs(7))
    prompt = _tokens(8, (4, 3))
    one = generate(lm, prompt, max_new_tokens=5, temperature=1.0, top_k=1,
                   rng=jax.random.key(0))
    np.testing.assert_array_equal(one, generate(lm, prompt, max_new_tokens=5))
    a = generate(lm, prompt, max_new_tokens=8, temperature=2.0, top_k=3, rng=jax.random.key(1))
    b = generate(lm, prompt, max_new_tokens=8, temperature=2.0, top_k=3, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    logits = lm(a[:, :-1])  # every sampled token is among the 3 most likely at its step
    top3 = jax.lax.top_k(logits[:, 2:], 3)[1]
    assert bool(jnp.all(jnp.any(top3 == a[:, 3:, None], axis=-1)))
    c = generate(lm, prompt, max_new_tokens=8, temperature=2.0, rng=jax.random.key(2))
    assert not np.array_equal(a, c)


def test_encoder_decoder_masks_and_generation():
    model = EncoderDecoder(V, V + 4, D, num_heads=2, max_length=L, rngs=nnx.Rngs(9))
    source, target = _tokens(10, (2, 9)), _tokens(11, (2, 6), V + 4)
    mask = jnp.arange(9)[None, :] < jnp.array([[9], [5]])
    base = model(source, target, source_mask=mask)
    # The decoder is causal: later target tokens do not change earlier logits.
    later = target.at[:, 4:].set(0)
    np.testing.assert_allclose(model(source, later, source_mask=mask)[:, :4], base[:, :4],
                               atol=1e-5)
    # Padded source tokens reach the encoder (no mask there) but not the cross attention of
    # a sequence whose memory is otherwise unchanged: check through the decoder directly.
    memory = model.encode(source)
    moved = memory.at[1, 5:].add(3.0)
    np.testing.assert_allclose(model.decoder(target, context=moved, context_mask=mask)[1],
                               model.decoder(target, context=memory, context_mask=mask)[1],
                               atol=1e-5)
    got = generate(model.decoder, target[:, :2], max_new_tokens=4, context=memory,
                   context_mask=mask)
    np.testing.assert_array_equal(got, _naive_greedy(model.decoder, target[:, :2], 4,
                                                     context=memory, context_mask=mask))


def test_mixture_of_heads_losses_add_up_and_conv_mixers_generate():
    lm = TransformerLM(V, D, 2, mixer="moh", num_heads=4, max_length=L,
                       mixer_options={"num_shared": 2, "top_k": 1}, rngs=nnx.Rngs(12))
    tokens = _tokens(13, (2, 8))
    logits, aux = lm(tokens, return_aux=True)
    np.testing.assert_array_equal(logits, lm(tokens))
    x, want = lm.embed(tokens), 0.0
    for block in lm.blocks:  # each layer's MoH balance loss, from the layer itself
        want += float(block.mixer(block.mixer_norm(x))[1])
        x = block(x)
    np.testing.assert_allclose(float(aux), want, rtol=1e-5)
    assert want > 0
    hybrid = TransformerLM(V, D, 4, mixer=["base_conv", "hyena", "mamba", "h3"],
                           max_length=L, positions=None, rngs=nnx.Rngs(14))
    prompt = _tokens(16, (1, 3))
    np.testing.assert_array_equal(generate(hybrid, prompt, max_new_tokens=3),
                                  _naive_greedy(hybrid, prompt, 3))
    # Routing attention's balanced clusters span the whole sequence: no decoding state.
    routing = TransformerLM(V, D, 1, mixer="routing", max_length=L, rngs=nnx.Rngs(17))
    with pytest.raises(NotImplementedError, match="routing"):
        generate(routing, prompt, max_new_tokens=2)


def test_training_step_with_dropout():
    lm = TransformerLM(V, D, 2, mixer=["attention", "linear"], num_heads=2, max_length=L,
                       dropout_rate=0.2, rngs=nnx.Rngs(params=0, dropout=1))
    tokens = _tokens(17, (2, 10))

    def loss(model):
        logits = model(tokens[:, :-1])
        return -jnp.mean(jax.nn.log_softmax(logits)[
            jnp.arange(2)[:, None], jnp.arange(9)[None, :], tokens[:, 1:]])

    grads = nnx.grad(loss)(lm)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert not np.allclose(lm(tokens), lm(tokens))  # dropout is on in train mode
    lm.eval()
    np.testing.assert_array_equal(lm(tokens), lm(tokens))


def test_logits_at_gathers_the_full_logits():
    lm = TransformerLM(V, D, 2, mixer=["attention", "linear"], num_heads=2, max_length=L,
                       rngs=nnx.Rngs(0))
    tokens = _tokens(3, (2, 11))
    at = jnp.asarray([[10, 0, 4], [2, 2, 7]], jnp.int32)
    full = np.asarray(lm(tokens))
    want = np.stack([full[b, np.asarray(at[b])] for b in range(2)])
    np.testing.assert_allclose(lm(tokens, logits_at=at), want, atol=1e-6)


def test_titans_decoding_needs_token_by_token_writes():
    lm = TransformerLM(V, D, 1, mixer="titans_lmm", mixer_options={"chunk_size": 4},
                       rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="chunk_size=4"):
        lm.prefill(_tokens(0, (1, 5)))
    lm = TransformerLM(V, D, 1, mixer="titans_mac", mixer_options={"chunk_size": 2},
                       rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="chunk_size=2"):
        lm.prefill(_tokens(0, (1, 5)))


def test_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="mixer"):
        TransformerLM(V, D, 1, mixer="flash", rngs=rngs)
    with pytest.raises(ValueError, match="mixer"):
        TransformerLM(V, D, 2, mixer=["attention"], rngs=rngs)
    with pytest.raises(ValueError, match="positions"):
        TransformerLM(V, D, 1, positions="rope", rngs=rngs)
    with pytest.raises(ValueError, match="norm"):
        TransformerBlock(D, norm="batchnorm", rngs=rngs)
    with pytest.raises(ValueError, match="mlp"):
        TransformerBlock(D, mlp="relu", rngs=rngs)
    with pytest.raises(ValueError, match="mixer"):  # no bidirectional convolution
        EncoderDecoder(V, V, D, encoder_mixer="base_conv", max_length=L, rngs=rngs)
    lm = TransformerLM(V, D, 1, max_length=8, rngs=rngs)
    with pytest.raises(ValueError, match="tokens"):
        lm(_tokens(0, (1, 9)))
    with pytest.raises(TypeError, match="tokens"):
        lm(jnp.zeros((1, 3)))
    with pytest.raises(TypeError, match="logits_at"):
        lm(_tokens(0, (1, 4)), logits_at=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="logits_at"):
        lm(_tokens(0, (1, 4)), logits_at=jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, _tokens(0, (1, 4)), max_new_tokens=5)
    with pytest.raises(ValueError, match=r"^rng"):
        generate(lm, _tokens(0, (1, 4)), max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(lm, _tokens(0, (1, 4)), max_new_tokens=2, top_k=0)
    with pytest.raises(ValueError, match="context"):
        EncoderDecoder(V, V, D, max_length=L, rngs=rngs).decoder(_tokens(0, (1, 3)))


def test_composite_visual_lm_skips_visual_pairs_and_equals_the_dense_mask():
    """P17 EE-MLLM: projected image features go before the text through the LM's own
    weights; with composite attention the visual tokens do not attend to each other (each
    sees itself). The chunked path skips the visual x visual tiles off the diagonal and
    equals the forward and gradients under the dense mask written out here."""
    import functools

    from jattn import masks
    from jattn.core.chunked import chunked_attention, tile_schedule
    from tests.conftest import SMALL_BLOCKS

    Tp, T = 32, 8
    n = Tp + T
    is_visual = np.arange(n) < Tp
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (j <= i) & ~(is_visual[:, None] & is_visual[None, :] & (i != j))
    chunked = functools.partial(chunked_attention, block_sizes=SMALL_BLOCKS)
    mask = masks.composite_visual(is_visual)
    np.testing.assert_array_equal(np.asarray(mask.materialize(n, n))[0, 0], allowed)

    bq, bk = SMALL_BLOCKS.block_q, SMALL_BLOCKS.block_kv
    visited = np.asarray(tile_schedule(mask, n, n, bq, bk).counts).reshape(-1)
    padded = np.zeros((-(-n // bq) * bq, -(-n // bk) * bk), bool)
    padded[:n, :n] = allowed
    tiles = padded.reshape(len(padded) // bq, bq, -1, bk).any(axis=(1, 3))
    np.testing.assert_array_equal(visited, tiles.sum(1))
    causal = np.asarray(tile_schedule(masks.causal(), n, n, bq, bk).counts).sum()
    assert visited.sum() < causal  # the visual x visual tiles off the diagonal are skipped

    prefix = jax.random.normal(jax.random.key(4), (2, Tp, D))
    tokens = _tokens(5, (2, T))

    def model(implementation):
        return TransformerLM(V, D, 2, num_heads=2, max_length=n, rngs=nnx.Rngs(6),
                             mixer_options={"implementation": implementation})

    def loss(lm, prefix, m):
        return (lm(tokens, prefix=prefix, mask=m) ** 2).mean()

    value_and_grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
    got = value_and_grad(model(chunked), prefix, mask)
    want = value_and_grad(model("xla"), prefix, jnp.asarray(allowed))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    lm = model("xla")
    logits = nnx.jit(lambda lm, m: lm(tokens, prefix=prefix, mask=m))
    plain = logits(lm, None)
    assert plain.shape == (2, n, V)
    assert not np.allclose(plain, logits(lm, mask), atol=1e-3)
    with pytest.raises(ValueError, match="only softmax attention"):
        TransformerLM(V, D, 1, mixer="linear", max_length=n, rngs=nnx.Rngs(0))(
            tokens, prefix=prefix, mask=mask)
    with pytest.raises(ValueError, match="prefix"):
        model("xla")(tokens, prefix=prefix[:1])
