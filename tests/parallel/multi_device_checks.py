"""Context-parallel attention on 8 simulated CPU devices against single-device float64
attention, forward and gradients. Run by tests/parallel/test_context.py in a subprocess
(the device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.parallel.multi_device_checks
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn import reference
from jattn.nn import MultiHeadAttention
from jattn.parallel import context_parallel, context_parallel_attention
from tests.conftest import check_against_reference, normal


def _inputs(B, T, S, N, K, H=8, Hv=6, segments=False):
    q, k, v = normal(0, (B, T, N, H)), normal(1, (B, S, K, H)), normal(2, (B, S, K, Hv))
    if not segments:
        return (q, k, v), {}
    ids = jnp.asarray(np.sort(np.random.default_rng(3).integers(0, 4, (B, T))), jnp.int32)
    return (q, k, v), {"query_segment_ids": ids}


def check(name, mesh, *, T=64, S=None, N=4, K=2, B=2, segments=False, **kw):
    S = T if S is None else S
    args, ids = _inputs(B, T, S, N, K, segments=segments)
    options = {k: v for k, v in kw.items()
               if k in ("is_causal", "logits_soft_cap", "local_window_size")}

    def fn(q, k, v):
        return context_parallel_attention(q, k, v, mesh=mesh, return_lse=True, **ids, **kw)

    def ref(q, k, v):
        return reference.dot_product_attention(q, k, v, return_lse=True, **ids, **options)

    check_against_reference(fn, ref, args)
    print("ok", name, flush=True)


def _dropout_by_pairs(q, k, v, *, chunks, rate, rng):
    """Causal attention with dropout drawn per (query chunk i, key chunk j <= i) from
    fold_in(fold_in(rng, i), j), each pair a separate softmax merged through its lse."""
    import jattn

    size = q.shape[1] // chunks
    outs = []
    for i in range(chunks):
        qi = q[:, i * size:(i + 1) * size]
        parts = [jattn.dot_product_attention(
            qi, k[:, j * size:(j + 1) * size], v[:, j * size:(j + 1) * size],
            is_causal=i == j, dropout_rate=rate, return_lse=True, implementation="xla",
            dropout_rng=jax.random.fold_in(jax.random.fold_in(rng, i), j))
            for j in range(i + 1)]
        lse = jax.nn.logsumexp(jnp.stack([lse for _, lse in parts]), axis=0)
        outs.append(sum(out * jnp.moveaxis(jnp.exp(l - lse), 1, 2)[..., None]
                        for out, l in parts))
    return jnp.concatenate(outs, axis=1)


def main() -> int:
    assert jax.device_count() == 8, jax.devices()
    devices = np.asarray(jax.devices())
    ring8 = Mesh(devices, ("seq",))
    grid = Mesh(devices.reshape(2, 4), ("data", "seq"))
    check("ring causal zig-zag, segments, GQA, on a (data, seq) mesh, batch sharded", grid,
          strategy="ring", batch_axis="data", is_causal=True, segments=True)
    check("ring causal natural order, soft cap", ring8, strategy="ring", is_causal=True,
          load_balance=False, logits_soft_cap=3.0)
    check("ring cross attention (S != T)", ring8, strategy="ring", S=32)
    check("all-to-all causal, segments, GQA", grid, strategy="all_to_all", N=8, K=4,
          batch_axis="data", is_causal=True, segments=True)
    check("all-to-all with a window (auto picks it)", ring8, N=8, K=8, strategy="auto",
          is_causal=True, local_window_size=(5, 0))

    # Dropout on the ring: each (query chunk, key chunk) pair draws its own mask from the key
    # folded with both chunk indices; written out pair by pair and merged by hand here.
    # (float32 on both sides: the float64 reference would draw other masks.)
    args = _inputs(2, 64, 64, 4, 2)[0]
    cotangent = normal(9, (2, 64, 4, 6))
    ring = functools.partial(context_parallel_attention, mesh=Mesh(devices[:2], ("seq",)),
                             strategy="ring", is_causal=True, load_balance=False,
                             dropout_rate=0.3, dropout_rng=jax.random.key(5))
    pairs = functools.partial(_dropout_by_pairs, chunks=2, rate=0.3, rng=jax.random.key(5))
    for fn in (ring, pairs):
        out, pullback = jax.vjp(jax.jit(fn), *args)
        got = (out, *pullback(cotangent))
        if fn is ring:
            first = got
    for a, b in zip(first, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(first[0] - jnp.asarray(reference.dot_product_attention(
        *args, is_causal=True))).max()) > 0.1  # dropout did act
    print("ok ring dropout equals its chunk-pair definition", flush=True)

    # ALiBi through a score_mod on the all-to-all: each device sees the global head index.
    slopes = 2.0 ** -jnp.arange(1.0, 9.0)
    args = _inputs(2, 64, 64, 8, 8)[0]
    rel = jnp.arange(64)[None, :] - jnp.arange(64)[:, None]
    check_against_reference(  # the slopes learned: their gradient too
        lambda q, k, v, slopes: context_parallel_attention(
            q, k, v, mesh=grid, batch_axis="data", strategy="all_to_all", is_causal=True,
            score_mod=lambda s, b, h, i, j: s + slopes[h] * (j - i)),
        lambda q, k, v, slopes: reference.dot_product_attention(
            q, k, v, bias=(slopes[:, None, None] * rel)[None], is_causal=True),
        (*args, slopes))
    print("ok all-to-all with ALiBi as a score_mod", flush=True)

    # A learned relative table and per-row weights through a score_mod on the zig-zag ring,
    # batch sharded: global positions and rows, gradients reaching both arrays.
    table, weight = normal(11, (4, 127)), 1.0 + 0.5 * normal(12, (2,))

    def scaled(q, k, v, table, weight):
        logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(8)
        logits = (logits + table[:, rel + 63][None]) * weight[:, None, None, None]
        logits = jnp.where(rel <= 0, logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", probs, jnp.repeat(v, 2, axis=2))

    rel = jnp.arange(64)[None, :] - jnp.arange(64)[:, None]
    check_against_reference(
        lambda q, k, v, table, weight: context_parallel_attention(
            q, k, v, mesh=grid, batch_axis="data", strategy="ring", is_causal=True,
            score_mod=lambda s, b, h, i, j: (s + table[h, j - i + 63]) * weight[b]),
        scaled, (*_inputs(2, 64, 64, 4, 2)[0], table, weight))
    print("ok ring with a learned score_mod (table and row weights)", flush=True)

    # As an implementation: a causal sliding-window layer (all-to-all) and a causal one
    # (ring) of jattn.nn.MultiHeadAttention, parameters and input gradients included.
    for name, options in (("ring", dict(window=None)), ("all_to_all", dict(window=9))):
        impl = context_parallel(grid, batch_axis="data", strategy=name)
        plain = nnx.split(MultiHeadAttention(16, 4, rngs=nnx.Rngs(0), **options))
        sharded = nnx.split(MultiHeadAttention(16, 4, rngs=nnx.Rngs(0), implementation=impl,
                                               **options))
        x = normal(4, (2, 64, 16))

        def loss(state, x, graph):
            return (nnx.merge(graph, state)(x) ** 2).sum()

        run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
        want = run(plain[1], x, plain[0])
        got = run(sharded[1], x, sharded[0])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        print(f"ok MultiHeadAttention(implementation=context_parallel(..., {name!r}))",
              flush=True)

    # Zig-zag on all 8 devices, sharded in and out under jit: the value, and the output
    # keeps the sequence sharding.
    q, k, v = _inputs(2, 64, 64, 4, 2)[0]
    sharding = NamedSharding(ring8, P(None, "seq"))
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
    out = jax.jit(functools.partial(context_parallel_attention, mesh=ring8, strategy="ring",
                                    is_causal=True))(q, k, v)
    assert out.sharding.spec == P(None, "seq"), out.sharding
    want = reference.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, want, atol=2e-5)
    print("ok sharded in, sharded out", flush=True)

    # The trainer on a (data, seq) mesh: an LM whose attention is context-parallel over
    # "seq" trains as on a data-only mesh (same log to float32 tolerance).
    import tempfile
    from pathlib import Path

    from experiments.common.lm import task_functions
    from experiments.common.trainer import TrainConfig, fit, make_mesh, sequence_parallel
    from experiments.zoology.run import RunConfig, RunSettings, make_data
    from jattn.nn import TransformerLM

    data = make_data(RunConfig(mixer="attention", seq_len=32, num_kv_pairs=4, d_model=16,
                               learning_rate=3e-3, batch_size=16, settings=RunSettings(
                                   vocab_size=64, num_train=48, num_test=16)))
    logs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ("data=8", "data=2,seq=4"):
            mesh = make_mesh(spec)
            impl = sequence_parallel(mesh)
            model = TransformerLM(64, 16, 2, num_heads=4, max_length=32, rngs=nnx.Rngs(0),
                                  mixer_options={} if impl is None else {"implementation": impl})
            params, loss_fn, eval_fn = task_functions(model)
            config = TrainConfig(learning_rate=3e-3, batch_size=16, max_epochs=1,
                                 log_every=1, progress=False, mesh=spec)
            fit(params, loss_fn=loss_fn, eval_fn=eval_fn, train=data[0], valid=data[1],
                config=config, workdir=Path(tmp) / spec)
            logs[spec] = [json.loads(line) for line in
                          (Path(tmp) / spec / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(*logs.values(), strict=True):
        for key in a.keys() - {"time", "lr"}:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
    print("ok the trainer on a (data, seq) mesh", flush=True)

    # The ring's memory is O(T / D): the same tokens per device on 2 and 8 devices compile
    # to the same per-device memory (the benchmark's measurement, at a small size).
    from experiments.benchmarks.context_parallel import compiled_memory

    memory = [compiled_memory(d, d * 256, "ring") for d in (2, 8)]
    assert max(memory) <= 1.02 * min(memory), memory
    print("ok ring memory per device independent of the device count", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
