"""The analysis papers' claims on a model this project trains (issue 24).

One small attention LM (``num_layers`` x ``num_heads`` softmax attention, learned positions)
is trained with the shared resumable trainer on an even mixture of two tasks at one length:

* needle copy (:func:`experiments.tasks.needle.needle_copy`): a marked needle of
  ``needle_len`` tokens hidden in noise, written out again after a query marker;
* MQAR (:func:`experiments.tasks.mqar.mqar`, Zoology's multi-query associative recall).

Then, on fresh rows, through :mod:`jattn.analysis` only (no hooks, every run jitted):

1. P41 retrieval scores per (layer, head) on the needle task; needle accuracy with the
   top-k retrieval heads masked (query-zero: their attention becomes uniform) against
   ``random_draws`` draws of k other heads, for each k of ``mask_counts``.
2. P25 direct logit attribution of the answer per head on MQAR, and activation patching of
   every head (clean -> corrupted run, normalised restoration) on both tasks; P32's circuit
   overlap: the fraction of shared heads among the two tasks' top ``overlap_k`` heads.
3. P50 sinks per (layer, head) (received attention over the queries that see a token,
   threshold ``sink_threshold``) and ACT: heads chosen on held-out rows, the sinks' weight
   scaled by ``act_scale``, accuracy on the test rows before and after.
4. P66 / P40 pruning: needle accuracy against the fraction of context tokens pruned (masked
   from the attention of layer K and later ones) by the query row's attention in layer K vs
   at random, for each K of ``prune_layers``.

Writes under ``out``: the run (checkpoints, metrics.jsonl, result.json), results.json,
summary.md and figures/{retrieval,circuits,sinks,pruning}.png.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments.common.config import save_config
from experiments.common.lm import evaluate, task_functions
from experiments.common.plots import panels, save
from experiments.common.trainer import TrainConfig, fit
from experiments.tasks import mqar
from experiments.tasks.labels import label_positions
from experiments.tasks.needle import needle_copy, needle_vocab
from jattn.analysis import Capture, Edits, Intervention, circuits, heads, tokens
from jattn.nn.analysis import logit_attribution
from jattn.nn.transformer import TransformerLM

TRAIN = TrainConfig(learning_rate=3e-3, batch_size=64, max_epochs=6, eval_batch_size=256,
                    early_stop_metric="accuracy", early_stop_threshold=0.99,
                    checkpoint_every=500, log_every=100)


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """Settings of the analysis experiment (every field is a command-line flag)."""

    seq_len: int = 32
    vocab_size: int = 256  # tokens of both tasks (MQAR needs more than seq_len)
    needle_len: int = 3
    num_kv_pairs: int = 4
    d_model: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_train: int = 32768  # training rows
    # of them MQAR rows: attention leaves MQAR's plateau after ~150k rows at L = 32 (the
    # Zoology quick preset), the needle is learned from a few thousand
    mqar_fraction: float = 0.75
    num_eval: int = 256  # rows per task for each measurement (held-out and test each)
    mask_counts: tuple[int, ...] = (1, 2, 4, 8)  # numbers of retrieval heads masked
    random_draws: int = 8  # draws of as many random other heads
    overlap_k: int = 4  # top heads per task compared for the circuit overlap
    sink_threshold: float = 0.1
    act_scale: float = 0.4
    prune_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95)
    # rank by a layer's attention and prune from it on (FastV: layer 2 of 32), each of these
    prune_layers: tuple[int, ...] = (1, 2)
    train: TrainConfig = TRAIN  # its seed also draws the data and the initialisation
    out: str = "results/analysis/quick"


PRESETS = {
    # about 4 min on 2 CPU cores (3.5 min of training: both tasks at 0.997)
    "quick": AnalysisConfig(),
    # L = 64 with 8 pairs (Zoology: d = 64 at 3e-3 leaves the plateau after ~300k rows)
    "full": AnalysisConfig(seq_len=64, needle_len=4, num_kv_pairs=8, num_train=65536,
                           num_eval=512, train=dataclasses.replace(TRAIN, max_epochs=8),
                           out="results/analysis/full"),
}


# ----------------------------------------------------------------------------------------------
# Data


def needle_rows(config: AnalysisConfig, num: int, stream: int) -> dict[str, np.ndarray]:
    seed = np.random.SeedSequence([config.train.seed, 0, stream])
    return needle_copy(seq_len=config.seq_len, num_examples=num, needle_len=config.needle_len,
                       vocab_size=config.vocab_size, seed=seed)


def mqar_rows(config: AnalysisConfig, num: int, stream: int) -> dict[str, np.ndarray]:
    seed = np.random.SeedSequence([config.train.seed, 1, stream])
    x, y = mqar.mqar(vocab_size=config.vocab_size, input_seq_len=config.seq_len,
                     num_kv_pairs=config.num_kv_pairs, num_examples=num, seed=seed)
    return {"inputs": x, "labels": y, "answer": y >= 0}


def corrupt(config: AnalysisConfig, task: str, rows: dict, stream: int) -> dict:
    """The same rows with other answers: new needle tokens (needle), new values for every
    key (MQAR); everything else unchanged."""
    rng = np.random.default_rng([config.train.seed, 2, stream])
    x, y, answer = rows["inputs"].copy(), rows["labels"].copy(), rows["answer"]
    V, R, k = config.vocab_size, len(x), config.num_kv_pairs
    if task == "needle":  # the needle, and its copy in the answer's inputs
        where = rows["needle"]
        low = 1
    else:  # the values; the keys (and so the queries) stay
        where = np.zeros_like(answer)
        where[:, 1:2 * k:2] = True
        low = V // 2
    old = x[where].reshape(R, -1)
    pool = np.argsort(rng.random((R, V - low)), axis=1) + low
    new = np.stack([p[~np.isin(p, o)][:o.size] for p, o in zip(pool, old, strict=True)])
    x[where] = new.reshape(-1)
    for i in range(R):
        table = dict(zip(old[i].tolist(), new[i].tolist(), strict=True))
        y[i, answer[i]] = [table[t] for t in y[i, answer[i]].tolist()]
    if task == "needle":  # teacher forcing: the answer's inputs are the answer shifted
        n = config.needle_len
        x[:, -n + 1:] = y[:, -n:-1]
    return rows | {"inputs": x.astype(np.int32), "labels": y.astype(np.int32)}


def trainer_rows(*row_sets: dict) -> dict[str, np.ndarray]:
    x = np.concatenate([r["inputs"] for r in row_sets])
    y = np.concatenate([r["labels"] for r in row_sets])
    return {"inputs": x} | label_positions(y)


def build_model(config: AnalysisConfig) -> TransformerLM:
    return TransformerLM(needle_vocab(config.vocab_size), config.d_model, config.num_layers,
                         num_heads=config.num_heads, max_length=config.seq_len,
                         rngs=nnx.Rngs(config.train.seed))


# ----------------------------------------------------------------------------------------------
# Measurements (every one a jitted function of the parameters and an Intervention)


class Probe:
    """The trained model as jitted functions of rows and an intervention."""

    def __init__(self, model: TransformerLM):
        self.graph, self.state = nnx.split(model)

        @jax.jit
        def run(state, inputs, intervention):
            return nnx.merge(self.graph, state)(inputs, intervention=intervention)

        self._run = run

    def forward(self, inputs):
        """intervention -> (logits [B, T, V], captures) on ``inputs``."""
        return lambda iv: self._run(self.state, jnp.asarray(inputs), iv)

    def accuracy(self, rows: dict, edits=None) -> float:
        """Mean over rows of the fraction of answer positions predicted right."""
        logits, _ = self.forward(rows["inputs"])(Intervention(edits=edits or {}))
        right = (jnp.argmax(logits, -1) == rows["labels"]) & rows["answer"]
        return float((right.sum(1) / rows["answer"].sum(1)).mean())


def answer_metric(clean: dict, corrupted: dict):
    """logit(clean answer) - logit(corrupted answer), averaged over answer positions."""
    a, b = jnp.asarray(clean["labels"]), jnp.asarray(corrupted["labels"])
    mask = jnp.asarray(clean["answer"] & (clean["labels"] != corrupted["labels"]))

    def metric(logits):
        good = jnp.take_along_axis(logits, jnp.maximum(a, 0)[..., None], -1)[..., 0]
        bad = jnp.take_along_axis(logits, jnp.maximum(b, 0)[..., None], -1)[..., 0]
        return ((good - bad) * mask).sum() / mask.sum()
    return metric


def patching_scores(probe: Probe, config: AnalysisConfig, clean: dict, corrupted: dict
                    ) -> np.ndarray:
    """Normalised restoration per (layer, head): 0 = the corrupted run, 1 = the clean one."""
    metric = answer_metric(clean, corrupted)
    all_heads = Capture("heads")
    clean_logits, clean_cap = probe.forward(clean["inputs"])(Intervention(capture=all_heads))
    bad = probe.forward(corrupted["inputs"])
    m_clean, m_bad = float(metric(clean_logits)), float(metric(bad(Intervention())[0]))
    scores = circuits.activation_patching(bad, clean_cap, metric,
                                          layers=list(range(config.num_layers)),
                                          num_heads=config.num_heads)
    return (np.asarray(scores) - m_bad) / (m_clean - m_bad)


def retrieval(probe: Probe, config: AnalysisConfig, rows: dict, mqar: dict, rng) -> dict:
    """Retrieval scores per (layer, head) on needle rows, then needle (and MQAR) accuracy
    with the top-k retrieval heads masked against k random other heads, for each k of
    ``mask_counts``."""
    k = config.needle_len
    answer = tuple(range(config.seq_len - k, config.seq_len))
    logits, cap = probe.forward(rows["inputs"])(
        Intervention(capture=Capture("weights", query_positions=answer)))
    weights = jnp.stack([cap[i]["weights"] for i in range(config.num_layers)], 1)
    predicted = jnp.argmax(logits[:, -k:], -1)
    scores = np.asarray(heads.retrieval_scores(weights, rows["inputs"], predicted,
                                               rows["needle"]).mean(0))  # [L, N]
    out = {"scores": scores.tolist(), "accuracy": probe.accuracy(rows), "masked": []}
    for count in config.mask_counts:
        top = sorted(circuits.top_heads(scores, count))
        others = [(i, h) for i in range(config.num_layers) for h in range(config.num_heads)
                  if (i, h) not in top]
        draws = []
        for _ in range(config.random_draws):
            pick = rng.choice(len(others), count, replace=False)
            draws.append(probe.accuracy(rows, _query_zero(config, [others[j] for j in pick])))
        out["masked"].append({"count": count, "top": top,
                              "top_masked": probe.accuracy(rows, _query_zero(config, top)),
                              "mqar_top_masked": probe.accuracy(mqar, _query_zero(config, top)),
                              "random_masked": draws})
    return out


def _query_zero(config: AnalysisConfig, pairs) -> dict[int, Edits]:
    """Edits masking (layer, head) pairs as the retrieval-heads paper does: query zeroed."""
    by_layer: dict[int, list[int]] = {}
    for i, h in pairs:
        by_layer.setdefault(int(i), []).append(int(h))
    return circuits.head_ablation(by_layer, config.num_heads, kind="query")


def sinks_and_act(probe: Probe, config: AnalysisConfig, held_out: list[dict],
                  test: list[dict]) -> dict:
    """Sink scores per (layer, head) and ACT's effect on accuracy."""
    L, N = config.num_layers, config.num_heads
    everything = Capture("weights")

    def sinks_of(rows):
        _, cap = probe.forward(rows["inputs"])(Intervention(capture=everything))
        return {i: heads.find_sinks(cap[i]["weights"], threshold=config.sink_threshold)
                for i in range(L)}, cap

    found = [sinks_of(rows) for rows in held_out]
    scores = np.stack([np.asarray(heads.sink_scores(found[0][1][i]["weights"]).max(-1)
                                  .mean(0)) for i in range(L)])  # [L, N] mean max score
    counts = np.stack([np.asarray(found[0][0][i].sum(-1).mean(0)) for i in range(L)])

    def accuracy(rows, sinks, chosen):
        edits = (heads.calibration_edits(sinks, chosen, N, scale=config.act_scale)
                 if chosen else {})
        return probe.accuracy(rows, edits)

    def held_out_accuracy(chosen):
        return float(np.mean([accuracy(rows, s, chosen)
                              for rows, (s, _) in zip(held_out, found, strict=True)]))

    chosen, gains = heads.choose_heads(held_out_accuracy,
                                       [(i, h) for i in range(L) for h in range(N)])
    test_sinks = [sinks_of(rows)[0] for rows in test]
    before = [accuracy(r, s, {}) for r, s in zip(test, test_sinks, strict=True)]
    after = [accuracy(r, s, chosen) for r, s in zip(test, test_sinks, strict=True)]
    return {"max_score": scores.tolist(), "sinks_per_row": counts.tolist(),
            "chosen": {str(k): v for k, v in chosen.items()},
            "gains": {f"{i},{h}": g for (i, h), g in gains.items()},
            "test_before": before, "test_after": after}


def pruning(probe: Probe, config: AnalysisConfig, rows: dict, rng) -> dict:
    """Needle accuracy with a fraction of the context pruned from layer K on (its tokens
    masked from the attention of that layer and every later one, FastV's way: the layers
    before see everything), chosen by the attention the query row gives them in layer K
    (mean over its heads) or at random; for each K of ``prune_layers``."""
    query = config.seq_len - config.needle_len
    context = np.arange(config.seq_len) < query
    _, cap = probe.forward(rows["inputs"])(Intervention(
        capture=Capture("weights", layers=config.prune_layers, query_positions=(query,))))
    out = {"fraction": list(config.prune_fractions), "layers": {}}
    for K in config.prune_layers:
        scores = tokens.rank_tokens(cap[K]["weights"], candidates=jnp.asarray(context))
        curves = out["layers"][str(K)] = {"rank": [], "random": []}
        for fraction in config.prune_fractions:
            keep = max(1, round((1 - fraction) * query))
            for kind in ("rank", "random"):
                if kind == "rank":
                    kept = tokens.keep_top_tokens(scores, keep)
                else:  # the context is positions 0 .. query - 1: indices are positions
                    kept = tokens.random_tokens(jax.random.key(int(rng.integers(1 << 30))),
                                                query, keep, batch_size=len(scores))
                visible = np.asarray(~context)[None].repeat(len(scores), 0)
                np.put_along_axis(visible, np.asarray(kept), True, axis=1)
                bias = jnp.where(jnp.asarray(visible), 0.0, -jnp.inf)[:, None, None, :]
                edits = {i: Edits(logit_bias=bias) for i in range(K, config.num_layers)}
                curves[kind].append(probe.accuracy(rows, edits))
    return out


# ----------------------------------------------------------------------------------------------
# Driver, summary and figures


def run_analysis(config: AnalysisConfig) -> dict:
    out = Path(config.out)
    save_config(config, out)
    done = out / "results.json"
    if done.exists():
        results = json.loads(done.read_text())
    else:
        results = measure(config, out)
        done.write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(summary(config, results))
    plot(config, results, out / "figures")
    return results


def measure(config: AnalysisConfig, out: Path) -> dict:
    if not 0 < config.mqar_fraction < 1:
        raise ValueError(f"mqar_fraction: expected a number in (0, 1), got "
                         f"{config.mqar_fraction}")
    num_mqar = round(config.num_train * config.mqar_fraction)
    train = trainer_rows(needle_rows(config, config.num_train - num_mqar, 0),
                         mqar_rows(config, num_mqar, 0))
    valid_rows = {"needle": needle_rows(config, config.num_eval, 1),
                  "mqar": mqar_rows(config, config.num_eval, 1)}
    test_rows = {"needle": needle_rows(config, config.num_eval, 2),
                 "mqar": mqar_rows(config, config.num_eval, 2)}
    model = build_model(config)
    params, loss_fn, eval_fn = task_functions(model)
    params, result = fit(params, loss_fn=loss_fn, eval_fn=eval_fn, train=train,
                         valid=trainer_rows(*valid_rows.values()), config=config.train,
                         workdir=out / "run")
    nnx.update(model, params)
    probe = Probe(model)
    rng = np.random.default_rng([config.train.seed, 3])
    steps = ["accuracy", "retrieval", "patching", "attribution", "sinks", "pruning"]
    results = {"train": dataclasses.asdict(result)}
    for step in tqdm(steps, desc="analyses", disable=not config.train.progress):
        if step == "accuracy":
            results["accuracy"] = {
                task: evaluate(eval_fn, params, trainer_rows(rows), config.train.eval_batch_size)
                for task, rows in test_rows.items()}
        elif step == "retrieval":
            results["retrieval"] = retrieval(probe, config, test_rows["needle"],
                                             test_rows["mqar"], rng)
        elif step == "patching":
            results["patching"] = {
                task: patching_scores(probe, config, rows, corrupt(config, task, rows, 3))
                .tolist() for task, rows in test_rows.items()}
            a, b = (np.asarray(results["patching"][t]) for t in ("needle", "mqar"))
            results["overlap"] = circuits.circuit_overlap(a, b, config.overlap_k)
        elif step == "attribution":
            results["attribution"] = attribution(model, config, test_rows["mqar"])
        elif step == "sinks":
            results["sinks"] = sinks_and_act(probe, config, list(valid_rows.values()),
                                             list(test_rows.values()))
        else:
            results["pruning"] = pruning(probe, config, test_rows["needle"], rng)
    return results


def attribution(model: TransformerLM, config: AnalysisConfig, rows: dict, batch: int = 64
                ) -> list[list[float]]:
    """Direct logit attribution of the answer (its logit minus the mean logit) per (layer,
    head), averaged over the answer positions of ``batch`` MQAR rows."""
    x, y, answer = (rows[k][:batch] for k in ("inputs", "labels", "answer"))
    parts = logit_attribution(model, jnp.asarray(x), positions=range(config.seq_len))["heads"]
    centred = parts - parts.mean(-1, keepdims=True)  # [B, T, L, N, V]
    target = jnp.take_along_axis(centred, jnp.maximum(jnp.asarray(y), 0)[:, :, None, None,
                                                                          None], -1)[..., 0]
    mask = jnp.asarray(answer)[:, :, None, None]
    return np.asarray((target * mask).sum((0, 1)) / mask.sum()).tolist()


def summary(config: AnalysisConfig, r: dict) -> str:
    ret, sinks, prune = r["retrieval"], r["sinks"], r["pruning"]
    lines = [
        f"Model: {config.num_layers} layers x {config.num_heads} heads, d_model "
        f"{config.d_model}, trained on needle copy (needle of {config.needle_len}) and MQAR "
        f"({config.num_kv_pairs} pairs) at length {config.seq_len}: {r['train']['step']} "
        f"steps, {r['train']['seconds']:.0f} s. Test accuracy (answer positions, "
        f"{config.num_eval} fresh rows per task): needle {r['accuracy']['needle']:.3f}, "
        f"MQAR {r['accuracy']['mqar']:.3f}.",
        "",
        "### Retrieval heads (P41)",
        "",
        "Retrieval score per (layer, head) (rows: layers):",
        "",
        "| layer | " + " | ".join(f"head {h}" for h in range(config.num_heads)) + " |",
        "|---|" + "---|" * config.num_heads,
        *(f"| {i} | " + " | ".join(f"{x:.2f}" for x in row) + " |"
          for i, row in enumerate(ret["scores"])),
        "",
        f"Needle accuracy with no head masked: {ret['accuracy']:.3f}. Masking (query-zero):",
        "",
        "| k | top-k retrieval heads | needle, top-k masked | needle, k random others "
        "masked: mean (min, max) | MQAR, top-k masked |",
        "|---|---|---|---|---|",
        *(f"| {m['count']} | {', '.join(f'({i},{h})' for i, h in m['top'])} | "
          f"{m['top_masked']:.3f} | {np.mean(m['random_masked']):.3f} "
          f"({np.min(m['random_masked']):.3f}, {np.max(m['random_masked']):.3f}) | "
          f"{m['mqar_top_masked']:.3f} |" for m in ret["masked"]),
        "",
        "### Circuits (P25, P32)",
        "",
        f"Overlap of the two tasks' top-{config.overlap_k} heads by activation patching: "
        f"{r['overlap']:.2f} (the paper: 78% of the important heads shared between two "
        "tasks).",
        "",
        "### Sinks and ACT (P50)",
        "",
        f"Heads whose mean largest sink score exceeds {config.sink_threshold}: "
        f"{int((np.asarray(sinks['max_score']) > config.sink_threshold).sum())} of "
        f"{config.num_layers * config.num_heads}. ACT (scale {config.act_scale}) heads "
        f"chosen on held-out rows: {sinks['chosen'] or 'none'}.",
        "",
        "| test accuracy | needle | MQAR |", "|---|---|---|",
        "| before ACT | " + " | ".join(f"{a:.3f}" for a in sinks["test_before"]) + " |",
        "| after ACT | " + " | ".join(f"{a:.3f}" for a in sinks["test_after"]) + " |",
        "",
        "### Pruning context tokens (P66, P40)",
        "",
        "Context tokens masked from layer K on, ranked by the query row's attention in "
        "layer K; needle accuracy:",
        "",
        "| K | selection | " + " | ".join(f"{f:g}" for f in prune["fraction"]) + " |",
        "|---|---|" + "---|" * len(prune["fraction"]),
        *(f"| {K} | {name} | " + " | ".join(f"{a:.3f}" for a in curves[kind]) + " |"
          for K, curves in prune["layers"].items()
          for kind, name in (("rank", "by attention rank"), ("random", "at random"))),
    ]
    return "\n".join(lines) + "\n"


def _heatmap(ax, values, title, cmap="viridis", centred=False):
    values = np.asarray(values)
    limit = np.abs(values).max() or 1.0
    image = ax.imshow(values, cmap=cmap, vmin=-limit if centred else None,
                      vmax=limit if centred else None)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def plot(config: AnalysisConfig, r: dict, folder: Path) -> None:
    ret = r["retrieval"]
    fig, (a, b) = panels(2, width=4.0, height=3.2, sharey=False)
    _heatmap(a, ret["scores"], "retrieval score (needle)")
    counts = [m["count"] for m in ret["masked"]]
    draws = np.asarray([m["random_masked"] for m in ret["masked"]])
    b.plot(counts, [m["top_masked"] for m in ret["masked"]], "o-", color="tab:red",
           label="top-k retrieval heads")
    b.plot(counts, draws.mean(1), "s--", color="tab:blue", label="k random others (mean)")
    b.fill_between(counts, draws.min(1), draws.max(1), color="tab:blue", alpha=0.2,
                   label="random: min-max")
    b.axhline(ret["accuracy"], color="grey", lw=0.8, ls=":", label="none masked")
    b.set_xscale("log", base=2)
    b.set_xticks(counts, [str(c) for c in counts])
    b.set_xlabel("heads masked (query-zero)")
    b.set_ylabel("needle accuracy")
    b.set_ylim(-0.02, 1.02)
    b.legend(fontsize=7)
    save(fig, folder / "retrieval.png")

    fig, axes = panels(3, width=3.6, height=3.2, sharey=False)
    _heatmap(axes[0], r["attribution"], "MQAR: direct logit attribution", "RdBu_r", True)
    _heatmap(axes[1], r["patching"]["mqar"], "MQAR: patching restoration", "RdBu_r", True)
    _heatmap(axes[2], r["patching"]["needle"], "needle: patching restoration", "RdBu_r",
             True)
    save(fig, folder / "circuits.png")

    sinks = r["sinks"]
    fig, (a, b) = panels(2, width=4.0, height=3.2, sharey=False)
    _heatmap(a, sinks["max_score"], "largest sink score (needle rows)")
    x = np.arange(2)
    b.bar(x - 0.2, sinks["test_before"], 0.4, label="before")
    b.bar(x + 0.2, sinks["test_after"], 0.4, label=f"ACT ({config.act_scale})")
    b.set_xticks(x, ["needle", "MQAR"])
    b.set_ylabel("test accuracy")
    b.legend(fontsize=8)
    save(fig, folder / "sinks.png")

    prune = r["pruning"]
    fig, axes = panels(len(prune["layers"]), width=4.0, height=3.2)
    for ax, (K, curves) in zip(axes, prune["layers"].items(), strict=True):
        ax.plot(prune["fraction"], curves["rank"], "o-", label="by attention rank (P66/P40)")
        ax.plot(prune["fraction"], curves["random"], "s--", label="at random")
        ax.set_xlabel("fraction of context tokens pruned")
        ax.set_title(f"pruned from layer {K} on", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("needle accuracy")
    axes[0].legend(fontsize=8)
    save(fig, folder / "pruning.png")
