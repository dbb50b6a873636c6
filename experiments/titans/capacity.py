"""Capacity of a Titans memory without outer training (issue 7, experiment 1).

Store N random unit pairs (k_i, v_i) in R^d by streaming them through a memory with fixed
gates, then read every stored key and compare M(k_i) with v_i. Memories:

* ``hebbian``: linear attention, W <- W + k^T v (M(x) = x W, so M(k_i) = sum_j (k_i . k_j) v_j
  = v_i + crosstalk), with the same momentum and decay options as the others
  (S_t = eta S_{t-1} + theta k_t^T v_t, W_t = (1 - alpha) W_{t-1} + S_t, theta = (1 - eta) /
  passes, so that the plain variant is exactly sum_i v_i k_i^T). Written here, not
  with :mod:`jattn.memory.titans`: it is the baseline.
* ``linear``: the Titans linear memory (L_M = 1), one gradient step of
  ||k_t W - v_t||^2 per token (a delta rule), :func:`jattn.memory.titans.memory_recurrence`.
* ``deep``: the Titans MLP memory (L_M = 2, residual + LayerNorm), same recurrence; its
  initial weights are :func:`jattn.memory.titans.init_neural_memory`'s, but the LayerNorm gain
  starts at 1 / sqrt(d) (``deep_output_scale``) so that the LayerNorm branch, like the unit
  values, has norm ~1. Its step size is small (``deep_lr`` 0.03): at 0.3 the inner loop
  diverges (the LayerNorm scales the weight gradients by 1 / std of its input).

Variants (fixed gates, the same for every token): ``plain`` (eta = 0, alpha = 0),
``momentum`` (eta = ``momentum``), ``forget`` (alpha = ``forget``), ``momentum+forget``. The
step size with momentum is ``lr * (1 - eta)`` so that a constant gradient moves the memory by
the same amount per token in the steady state (theta / (1 - eta) = lr) in every variant.

The stream is the N pairs in order, repeated ``passes`` times (test-time training may see its
data more than once); chunk size ``chunk_size`` freezes the gradient point per chunk (paper
Eqs. 16-18; 1 = token by token). The inner loss ||M(k) - v||^2 of every chunk's tokens is
measured with the weights at the chunk start ("before") and at its end ("after").

Metrics: ``error`` = mean_i ||M(k_i) - v_i||^2 (relative: the values are unit vectors, so an
empty memory scores 1), ``mse`` = error / d (mean over coordinates) and ``cosine`` =
mean_i cos(M(k_i), v_i), each averaged over ``trials`` independent draws of the pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from experiments.common.config import save_config
from experiments.common.plots import panels, save
from jattn.memory.titans import (
    MemoryInputs,
    MemoryWeights,
    apply_memory,
    init_neural_memory,
    memory_recurrence,
)

MEMORIES = ("hebbian", "linear", "deep")
VARIANTS = ("plain", "momentum", "forget", "momentum+forget")


@dataclasses.dataclass(frozen=True)
class CapacityConfig:
    """Capacity experiment settings (every field is a command-line flag)."""

    dim: int = 32  # d: key, value and memory width
    num_pairs: tuple[int, ...] = (8, 16, 32, 64, 128, 256)  # N grid
    memories: tuple[str, ...] = MEMORIES
    variants: tuple[str, ...] = VARIANTS
    chunk_size: int = 1  # tokens whose gradients share the chunk-start weights
    passes: int = 8  # times the N pairs are streamed
    trials: int = 8  # independent draws of the pairs, averaged
    lr: float = 0.5  # linear memory: theta (0.5 writes a unit key's value exactly)
    deep_lr: float = 0.03  # deep memory: theta (0.3 diverges at d = 32)
    momentum: float = 0.5  # eta of the momentum variants
    forget: float = 0.01  # alpha of the forgetting variants
    memory_expansion: int = 4  # deep memory hidden width / d
    deep_output_scale: float | None = None  # initial LayerNorm gain (None: 1 / sqrt(d))
    seed: int = 0
    out: str = "results/titans/capacity"


PRESETS: dict[str, CapacityConfig] = {
    "quick": CapacityConfig(num_pairs=(8, 16, 32, 64, 128), trials=4,
                            out="results/titans/capacity/quick"),
    "full": CapacityConfig(num_pairs=(8, 16, 32, 64, 128, 256), trials=16, passes=16,
                           out="results/titans/capacity/full"),
}


def method_name(memory: str, variant: str) -> str:
    return memory if variant == "plain" else f"{memory} +{variant}"


def random_pairs(rng: jax.Array, trials: int, n: int, d: int) -> tuple[jax.Array, jax.Array]:
    """[trials, n, d] keys and values, each row a uniformly random unit vector."""
    kk, kv = jax.random.split(rng)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return (unit(jax.random.normal(kk, (trials, n, d))),
            unit(jax.random.normal(kv, (trials, n, d))))


def variant_gates(config: CapacityConfig, memory: str) -> np.ndarray:
    """[V, 3] (theta, eta, keep) per variant, for ``config.variants``."""
    base = {"hebbian": 1.0 / config.passes, "linear": config.lr,
            "deep": config.deep_lr}[memory]
    rows = []
    for variant in config.variants:
        if variant not in VARIANTS:
            raise ValueError(f"variants: expected names from {VARIANTS}, got {variant!r}")
        eta = config.momentum if "momentum" in variant else 0.0
        alpha = config.forget if "forget" in variant else 0.0
        rows.append((base * (1.0 - eta), eta, 1.0 - alpha))
    return np.asarray(rows, np.float32)


def initial_weights(config: CapacityConfig, memory: str, rng: jax.Array,
                    batch: int) -> MemoryWeights:
    """Initial memory weights with leaves [batch, 1, ...] (one head)."""
    d = config.dim
    if memory != "deep":
        return MemoryWeights((jnp.zeros((batch, 1, d, d)),))
    keys = jax.random.split(rng, batch)
    init = jax.vmap(lambda k: init_neural_memory(
        k, dim=d, num_heads=1, head_dim=d, memory_depth=2,
        memory_expansion=config.memory_expansion, conv_size=None).memory)
    weights = init(keys)
    gain = (config.deep_output_scale if config.deep_output_scale is not None
            else 1.0 / d ** 0.5)
    return weights._replace(scale=weights.scale * gain)


def _hebbian_chunk(M, S, k, v, theta, eta, keep):
    """The Hebbian recurrence over one chunk: M, S [B, d, d]; k, v [B, c, d]; gates [B, c]."""

    def step(carry, x):
        M, S = carry
        k_t, v_t, th, et, kp = x
        S = et[:, None, None] * S + th[:, None, None] * jnp.einsum("bi,bj->bij", k_t, v_t)
        M = kp[:, None, None] * M + S
        return (M, S), None

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (k, v, theta, eta, keep))
    (M, S), _ = lax.scan(step, (M, S), xs)
    return M, S


def _loss(weights: MemoryWeights, k: jax.Array, v: jax.Array) -> jax.Array:
    """mean over tokens of ||M(k) - v||^2 per batch row: k, v [B, c, d] -> [B]."""
    out = apply_memory(weights, k[:, :, None, :])[:, :, 0]
    return jnp.mean(jnp.sum(jnp.square(out - v), -1), -1)


@functools.partial(jax.jit, static_argnames=("memory", "chunk_size", "passes"))
def store_and_recall(weights: MemoryWeights, keys: jax.Array, values: jax.Array,
                     gates: jax.Array, *, memory: str, chunk_size: int, passes: int):
    """Stream the pairs through the memory and read every stored key.

    Args:
        weights: initial weights, leaves [B, 1, ...] with B = V * trials (variant-major).
        keys, values: [trials, N, d]. gates: [V, 3] (theta, eta, keep).

    Returns:
        dict of error, mse, cosine [B] and inner-loss curves before/after [B, chunks].
    """
    V, trials = gates.shape[0], keys.shape[0]
    B = V * trials
    k = jnp.tile(jnp.tile(keys, (1, passes, 1)), (V, 1, 1))  # [B, T, d]
    v = jnp.tile(jnp.tile(values, (1, passes, 1)), (V, 1, 1))
    T = k.shape[1]
    g = jnp.repeat(gates, trials, axis=0)  # [B, 3]
    theta, eta, keep = (jnp.broadcast_to(g[:, i, None], (B, T)) for i in range(3))
    c = min(chunk_size, T)
    n = T // c
    momentum = jax.tree_util.tree_map(jnp.zeros_like, weights)

    def write(M, S, kc, vc, th, et, kp):
        if memory == "hebbian":
            M2, S2 = _hebbian_chunk(M.matrices[0][:, 0], S.matrices[0][:, 0], kc, vc, th, et, kp)
            return MemoryWeights((M2[:, None],)), MemoryWeights((S2[:, None],))
        inputs = MemoryInputs(kc[:, :, None], kc[:, :, None], vc[:, :, None], th[:, :, None],
                              et[:, :, None], kp[:, :, None, None])
        _, M2, S2 = memory_recurrence(M, S, inputs, chunk_size=kc.shape[1])
        return M2, S2

    def body(carry, chunk):
        M, S = carry
        kc, vc, th, et, kp = chunk
        before = _loss(M, kc, vc)
        M, S = write(M, S, kc, vc, th, et, kp)
        return (M, S), (before, _loss(M, kc, vc))

    def split(a):  # [B, n * c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(a[:, :n * c].reshape(B, n, c, *a.shape[2:]), 1, 0)

    (M, S), (before, after) = lax.scan(body, (weights, momentum),
                                       tuple(split(a) for a in (k, v, theta, eta, keep)))
    if n * c < T:  # the last, partial chunk
        tail = tuple(a[:, n * c:] for a in (k, v, theta, eta, keep))
        b_last = _loss(M, tail[0], tail[1])
        M, S = write(M, S, *tail)
        before = jnp.concatenate([before, b_last[None]], 0)
        after = jnp.concatenate([after, _loss(M, tail[0], tail[1])[None]], 0)
    q = jnp.tile(keys, (V, 1, 1))
    target = jnp.tile(values, (V, 1, 1))
    out = apply_memory(M, q[:, :, None, :])[:, :, 0]
    sq = jnp.sum(jnp.square(out - target), -1)
    cos = jnp.sum(out * target, -1) / jnp.maximum(jnp.linalg.norm(out, axis=-1), 1e-12)
    d = keys.shape[-1]
    return {"error": jnp.mean(sq, -1), "mse": jnp.mean(sq, -1) / d,
            "cosine": jnp.mean(cos, -1), "before": before.T, "after": after.T}


def run_capacity(config: CapacityConfig, *, progress: bool = True) -> list[dict]:
    """Run the experiment, write config.json, metrics.jsonl, figures/ and summary.md under
    ``config.out``; return the recall rows."""
    for memory in config.memories:
        if memory not in MEMORIES:
            raise ValueError(f"memories: expected names from {MEMORIES}, got {memory!r}")
    if config.chunk_size < 1 or config.passes < 1 or config.trials < 1:
        raise ValueError("chunk_size, passes, trials: expected >= 1, got "
                         f"{config.chunk_size}, {config.passes}, {config.trials}")
    out = Path(config.out)
    save_config(config, out)
    key = jax.random.key(config.seed)
    V = len(config.variants)
    rows: list[dict] = []
    cases = [(n, m) for n in config.num_pairs for m in config.memories]
    with open(out / "metrics.jsonl", "w") as log:
        for n, memory in tqdm(cases, desc="capacity", unit="case", disable=not progress):
            pair_key, init_key = jax.random.split(jax.random.fold_in(key, n))
            keys, values = random_pairs(pair_key, config.trials, n, config.dim)
            weights = initial_weights(config, memory, init_key, config.trials)
            weights = jax.tree_util.tree_map(lambda w: jnp.tile(w, (V,) + (1,) * (w.ndim - 1)),
                                             weights)
            start = time.perf_counter()
            res = store_and_recall(weights, keys, values, jnp.asarray(variant_gates(config,
                                                                                     memory)),
                                   memory=memory, chunk_size=config.chunk_size,
                                   passes=config.passes)
            res = jax.tree_util.tree_map(np.asarray, res)
            seconds = time.perf_counter() - start
            for i, variant in enumerate(config.variants):
                sl = slice(i * config.trials, (i + 1) * config.trials)
                row = {"kind": "recall", "memory": memory, "variant": variant,
                       "method": method_name(memory, variant), "N": n,
                       "error": float(res["error"][sl].mean()),
                       "error_std": float(res["error"][sl].std()),
                       "mse": float(res["mse"][sl].mean()),
                       "cosine": float(res["cosine"][sl].mean()),
                       "seconds": seconds}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                before, after = res["before"][sl].mean(0), res["after"][sl].mean(0)
                for c, (b, a) in enumerate(zip(before, after, strict=True)):
                    log.write(json.dumps({"kind": "inner_loss", "memory": memory,
                                          "variant": variant, "method": row["method"], "N": n,
                                          "chunk": c, "before": float(b),
                                          "after": float(a)}) + "\n")
            log.flush()
    inner = [json.loads(line) for line in open(out / "metrics.jsonl")]
    plot_recall(rows, out / "figures" / "recall.png")
    plot_inner_loss([r for r in inner if r["kind"] == "inner_loss"], config,
                    out / "figures" / "inner_loss.png")
    (out / "summary.md").write_text(summary_markdown(rows, config))
    return rows


VARIANT_COLORS = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red"),
                          strict=True))
MEMORY_STYLES = {"hebbian": ":", "linear": "--", "deep": "-"}


def plot_recall(rows: list[dict], path: Path) -> None:
    """Recall error and cosine vs N, one line per method (log x): line style = memory,
    colour = variant."""
    fig, (ax_err, ax_cos) = panels(2, width=5.0, height=4.0, sharey=False)
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        style = dict(ls=MEMORY_STYLES[sel[0]["memory"]], color=VARIANT_COLORS[sel[0]["variant"]],
                     marker="o", ms=3, label=method)
        ns = [r["N"] for r in sel]
        ax_err.plot(ns, [r["error"] for r in sel], **style)
        ax_cos.plot(ns, [r["cosine"] for r in sel], **style)
    for ax, label in ((ax_err, "recall error ||M(k) - v||^2"), (ax_cos, "cosine(M(k), v)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stored pairs N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_err.set_yscale("log")
    ax_cos.legend(fontsize=6, ncol=2)
    save(fig, path)


def _binned(x: list[float], bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(bin start indices, bin means) of a curve cut into at most ``bins`` equal bins."""
    a = np.asarray(x)
    width = max(1, -(-len(a) // bins))
    starts = np.arange(0, len(a), width)
    return starts, np.array([a[i:i + width].mean() for i in starts])


def plot_inner_loss(rows: list[dict], config: CapacityConfig, path: Path) -> None:
    """Inner loss of every chunk's tokens with the weights before (solid) and after (dashed)
    writing the chunk, at the largest N, one panel per memory (means over bins of chunks)."""
    n = max(config.num_pairs)
    fig, axes = panels(len(config.memories), width=4.0, height=3.4, sharey=False)
    for ax, memory in zip(axes, config.memories, strict=True):
        for variant in config.variants:
            sel = [r for r in rows if r["memory"] == memory and r["variant"] == variant
                   and r["N"] == n]
            if not sel:
                continue
            color = VARIANT_COLORS[variant]
            x, before = _binned([r["before"] for r in sel])
            _, after = _binned([r["after"] for r in sel])
            x = x * config.chunk_size
            ax.plot(x, before, lw=1, color=color, label=f"{variant} before")
            ax.plot(x, np.maximum(after, 1e-16), lw=1, ls="--", color=color,
                    label=f"{variant} after")
        ax.set_title(f"{memory}, N={n}, chunk {config.chunk_size}", fontsize=9)
        ax.set_xlabel("token (pairs repeat every N)")
        ax.set_ylabel("inner loss ||M(k) - v||^2")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6)
    save(fig, path)


GOOD_RECALL = 0.1


def capacity_at(rows: list[dict], method: str, threshold: float = GOOD_RECALL) -> int | None:
    """The largest N whose mean recall error is below ``threshold`` (None: no such N)."""
    ok = [r["N"] for r in rows if r["method"] == method and r["error"] < threshold]
    return max(ok) if ok else None


def summary_markdown(rows: list[dict], config: CapacityConfig) -> str:
    ns = sorted({r["N"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    idx = {(r["method"], r["N"]): r for r in rows}
    lines = [
        "# Titans memory capacity (no outer training)", "",
        f"d = {config.dim}, {config.trials} trials, chunk size {config.chunk_size}, "
        f"{config.passes} pass(es) over the pairs; linear theta = {config.lr}, deep theta = "
        f"{config.deep_lr}, momentum eta = {config.momentum} (theta scaled by 1 - eta), "
        f"forget alpha = {config.forget}. Cells: recall error mean_i ||M(k_i) - v_i||^2 "
        "(unit values: 1 = an empty memory) / mean cosine.", "",
        "| method | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns)]
    for m in methods:
        cells = [f"{idx[m, n]['error']:.3g} / {idx[m, n]['cosine']:.2f}"
                 if (m, n) in idx else "—" for n in ns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Capacity at error < {GOOD_RECALL}: the largest N of the grid recalled with "
              "mean error below it: " + ", ".join(
                  f"{m}: {capacity_at(rows, m) or 'none'}" for m in methods)]
    lines += ["", "Best method per N: " + ", ".join(
        f"N={n}: {min((r for r in rows if r['N'] == n), key=lambda r: r['error'])['method']}"
        for n in ns), "", "Figures: figures/recall.png, figures/inner_loss.png.", ""]
    return "\n".join(lines)
