"""Dataset decomposition (P75): the buckets against a per-document loop, the coverage of every
target, the curriculum's batches (constant tokens, each row once an epoch, a pure function of
(seed, step), the documented mix of lengths), the baselines' rows, the document mask in the
LM loss, and the benchmark's CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.common.decomposition import (
    Bucket,
    CurriculumBatches,
    Decomposition,
    Documents,
    concat_and_chunk,
    curriculum_odds,
    decompose,
    pad_documents,
)


def _corpus(lengths) -> Documents:
    """Documents of unique tokens: a token's value is its place in the corpus."""
    lengths = np.asarray(lengths, np.int64)
    return Documents(np.arange(lengths.sum(), dtype=np.int32), lengths)


def _loop_decomposition(documents: Documents, low: int, high: int):
    """The rule written plainly: from each document's start, the largest power-of-two piece
    of targets that fits (at most ``high``) while at least ``low`` targets are left."""
    rows = {1 << k: [] for k in range(low.bit_length() - 1, high.bit_length())}
    dropped = 0
    for d in range(len(documents)):
        doc = documents[d]
        start, left = 0, max(len(doc) - 1, 0)
        while left >= low:
            size = min(high, 1 << (left.bit_length() - 1))
            rows[size].append((d, start, doc[start:start + size + 1].tolist()))
            start, left = start + size, left - size
        dropped += left
    return rows, dropped


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=0, max_size=30),
       low=st.sampled_from([1, 2, 4, 8]), high_over_low=st.sampled_from([1, 2, 8, 32]))
def test_decompose_equals_the_loop_and_covers_every_target_once(lengths, low, high_over_low):
    documents = _corpus(lengths)
    high = low * high_over_low
    got = decompose(documents, min_length=low, max_length=high)
    want, dropped = _loop_decomposition(documents, low, high)
    assert got.lengths == tuple(want) and got.dropped_targets == dropped
    covered = np.zeros(len(documents.tokens), np.int64)  # per token: rows it is a target of
    for bucket in got.buckets:
        assert bucket.tokens.shape == (len(bucket.document), bucket.length + 1)
        assert list(zip(bucket.document.tolist(), bucket.start.tolist(),
                        bucket.tokens.tolist(), strict=True)) == want[bucket.length]
        # one document per row: consecutive tokens of one document
        first = documents.offsets[bucket.document] + bucket.start
        np.testing.assert_array_equal(bucket.tokens, first[:, None] + np.arange(
            bucket.length + 1))
        np.add.at(covered, bucket.tokens[:, 1:].ravel(), 1)
    # Every target once, except the last (l - 1) mod low of each document; no first token.
    for d, length in enumerate(documents.lengths):
        targets = max(length - 1, 0)
        kept = targets - targets % low
        doc = covered[documents.offsets[d]:documents.offsets[d + 1]]
        assert doc[1:kept + 1].tolist() == [1] * kept and not doc[kept + 1:].any()
        assert length == 0 or doc[0] == 0
    assert covered.sum() + dropped == documents.num_targets


def _batches(lengths, **options) -> CurriculumBatches:
    decomposition = decompose(_corpus(lengths), min_length=2, max_length=16)
    return CurriculumBatches(decomposition, **{"tokens_per_step": 32, **options})


LENGTHS = np.random.default_rng(0).integers(2, 80, 200)


# 300 cycles: more than the 258 batches of an epoch, so some cycles are empty.
@pytest.mark.parametrize("curriculum,num_cycles", [("grow_p2", 1), ("uniform", 3),
                                                   ("shrink_p100", 2), ("grow_p2", 300)])
def test_batches_hold_constant_tokens_and_every_full_batch_once_an_epoch(curriculum,
                                                                        num_cycles):
    source = _batches(LENGTHS, curriculum=curriculum, num_cycles=num_cycles, seed=3)
    buckets = source.decomposition.buckets
    first_token = [{int(row[0]): i for i, row in enumerate(b.tokens)} for b in buckets]
    for epoch in range(2):
        used = [[] for _ in buckets]
        for step in range(epoch * source.steps_per_epoch, (epoch + 1) * source.steps_per_epoch):
            tokens = source(step)["tokens"]
            rows, width = tokens.shape
            assert rows * (width - 1) == 32 and rows in source.batch_sizes
            i = source.bucket_at(step)
            assert width - 1 == buckets[i].length
            index = [first_token[i][int(t)] for t in tokens[:, 0]]
            np.testing.assert_array_equal(tokens, buckets[i].tokens[index])
            used[i] += index
        for i, rows in enumerate(used):
            assert len(set(rows)) == len(rows)  # no row twice in an epoch
            assert len(rows) == source.batches_per_epoch[i] * source.rows_per_batch[i]
            assert len(buckets[i].tokens) - len(rows) < source.rows_per_batch[i]


def test_the_batch_of_a_step_is_a_pure_function_of_seed_and_step():
    a, b = (_batches(LENGTHS, num_cycles=2, seed=5) for _ in range(2))
    steps = list(range(3 * a.steps_per_epoch))
    want = [a(s)["tokens"] for s in steps]
    for s in np.random.default_rng(0).permutation(steps):  # any order, as after a resume
        np.testing.assert_array_equal(b(int(s))["tokens"], want[s])
    other = _batches(LENGTHS, num_cycles=2, seed=6)
    assert any(not np.array_equal(other(s)["tokens"], want[s]) for s in steps)
    assert not all(np.array_equal(want[s], want[s + a.steps_per_epoch])
                   for s in range(a.steps_per_epoch))  # a fresh order each epoch


def _mean_rank(source: CurriculumBatches, steps) -> float:
    return float(np.mean([source.bucket_at(s) for s in steps]))


def test_growing_curricula_start_each_cycle_short_and_end_it_long():
    # Documents of 2, 4, 8 and 16 targets (one piece each), 48 batches of 32 tokens of each:
    # every bucket has the same batches, so the odds alone set the mix.
    lengths = np.repeat([3, 5, 9, 17], [16 * 48, 8 * 48, 4 * 48, 2 * 48])
    for cycles in (1, 4):
        per_cycle = 4 * 48 // cycles
        third = per_cycle // 3
        for curriculum in ("grow_p2", "shrink_p100", "uniform"):
            source = _batches(lengths, curriculum=curriculum, num_cycles=cycles, seed=1)
            ranks = np.array([source.bucket_at(s) for s in range(source.steps_per_epoch)])
            ranks = ranks.reshape(cycles, per_cycle)
            # every cycle holds an equal share of every bucket's batches
            assert all(np.bincount(c, minlength=4).tolist() == [per_cycle // 4] * 4
                       for c in ranks)
            early, late = ranks[:, :third].mean(), ranks[:, -third:].mean()
            # Bounds 4 standard deviations (over seeds) from the means: grow_p2 (odds 8:4:2:1
            # from the shortest) 0.75 early, 2.5 late; shrink_p100 (longest first, almost
            # surely) 2.75 and 0.25; uniform (no trend) 1.5 and 1.5.
            if curriculum == "grow_p2":
                assert early < 1.25 and late > 2.15, (cycles, early, late)
            elif curriculum == "shrink_p100":
                assert early > 2.7 and late < 0.3, (cycles, early, late)
            else:
                assert abs(early - late) < 0.9, (cycles, early, late)


def test_each_step_draws_an_unfinished_bucket_with_odds_times_its_batches():
    """The first step's bucket over many seeds: p_i = odds_i n_i / sum_j odds_j n_j."""
    buckets = tuple(Bucket(length, np.zeros((count, length + 1), np.int32),
                           np.zeros(count, np.int64), np.zeros(count, np.int64))
                    for length, count in ((2, 6 * 8), (4, 3 * 4), (8, 2 * 2)))
    decomposition = Decomposition(buckets, 0)  # 6, 3 and 2 batches of 16 tokens
    want = np.array([4 * 6, 2 * 3, 1 * 2]) / (4 * 6 + 2 * 3 + 1 * 2)
    first = [CurriculumBatches(decomposition, tokens_per_step=16, seed=seed).bucket_at(0)
             for seed in range(3000)]
    np.testing.assert_allclose(np.bincount(first, minlength=3) / 3000, want, atol=0.03)


def test_curriculum_odds():
    assert curriculum_odds("grow_p2", 6).tolist() == [32, 16, 8, 4, 2, 1]  # the authors'
    assert curriculum_odds("grow_linear", 6).tolist() == [6, 5, 4, 3, 2, 1]
    assert curriculum_odds("uniform", 2).tolist() == [1, 1]
    assert curriculum_odds("shrink_p100", 3).tolist() == [1, 100, 10_000]
    assert curriculum_odds("grow_p100", 3).tolist() == [10_000, 100, 1]
    assert curriculum_odds((1, 3), 2).tolist() == [1, 3]


def test_concat_and_chunk_trains_every_target_once_within_its_document():
    documents = _corpus([5, 1, 0, 9, 3, 14, 2])  # tokens: their place in the corpus
    rows = concat_and_chunk(documents, length=4, seed=2)
    tokens, ids, mask = rows["tokens"], rows["segment_ids"], rows["target_mask"]
    assert tokens.shape[1] == 5 and ids.shape == mask.shape == (len(tokens), 4)
    trained = mask.astype(bool)
    targets = tokens[:, 1:][trained]
    # each trained target follows its own input in the same document
    np.testing.assert_array_equal(tokens[:, :-1][trained], targets - 1)
    firsts = set(documents.offsets[:-1].tolist())
    assert sorted(targets.tolist()) == [t for t in range(len(documents.tokens))
                                        if t not in firsts]
    real = ids >= 0
    assert (np.diff(ids[real]) >= 0).all()  # ranks of the shuffled documents, increasing
    # consecutive rows share one token; the inputs are the corpus in the shuffled order
    np.testing.assert_array_equal(tokens[1:, 0], tokens[:-1, -1])
    assert sorted(tokens[:, :-1][real].tolist()) == list(range(34))  # 9 rows of 4 inputs


def test_pad_documents_rows():
    documents = _corpus([3, 1, 6])
    rows = pad_documents(documents, length=5)
    assert rows["tokens"].tolist() == [[0, 1, 2, 0, 0, 0], [3, 0, 0, 0, 0, 0],
                                       [4, 5, 6, 7, 8, 9]]
    assert rows["target_mask"].sum() == documents.num_targets == 7
    assert rows["target_mask"][2].tolist() == [1] * 5


@pytest.mark.parametrize("call,match", [
    (lambda: decompose(_corpus([9]), min_length=3, max_length=8), "min_length"),
    (lambda: decompose(_corpus([9]), min_length=8, max_length=4), "min_length"),
    (lambda: _batches(LENGTHS, tokens_per_step=24), "tokens_per_step"),
    (lambda: _batches(LENGTHS, num_cycles=0), "num_cycles"),
    (lambda: _batches(LENGTHS, curriculum="grow"), "curriculum"),
    (lambda: _batches(LENGTHS, curriculum=(1, 2)), "curriculum"),
    (lambda: _batches(LENGTHS, curriculum=(1, 1, 1, 0, 1)), "curriculum"),
    (lambda: _batches([3, 4], tokens_per_step=64), "no bucket"),
    (lambda: pad_documents(_corpus([7]), length=5), "length"),
    (lambda: concat_and_chunk(_corpus([1, 0]), length=4, seed=0), "documents"),
    (lambda: Documents(np.arange(4), np.array([2, 1])), "lengths"),
    (lambda: Documents(np.zeros(2), np.array([2])), "tokens"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_document_mask_packs_documents_as_if_alone():
    """next_token_functions with segment ids: a packed row's loss is the sum of its
    documents' losses alone (no position embedding, so only the mask can tell)."""
    from experiments.common.lm import next_token_functions
    from jattn.nn.transformer import TransformerLM

    model = TransformerLM(16, 16, 1, num_heads=2, max_length=16, positions=None,
                          rngs=nnx.Rngs(0))
    eval_fn = jax.jit(next_token_functions(model)[2])
    params = nnx.split(model, nnx.Param, ...)[1]
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 16, 5), rng.integers(0, 16, 4)
    documents = Documents.from_list([first, second])
    packed = concat_and_chunk(documents, length=8, seed=0)  # one row: 9 tokens, 7 targets
    alone = pad_documents(documents, length=8)
    assert packed["tokens"].shape == (1, 9)
    got = eval_fn(params, packed)
    want = eval_fn(params, alone)
    np.testing.assert_allclose(float(got["loss_sum"][0]), float(want["loss_sum"].sum()),
                               rtol=1e-5)
    assert float(got["targets"][0]) == float(want["targets"].sum()) == 7


def test_benchmark_smoke(tmp_path):
    from experiments.benchmarks import dataset_decomposition

    result = dataset_decomposition.main([
        "--preset", "quick", "--num-documents", "40", "--num-valid", "2", "--min-length", "8",
        "--max-length", "32", "--min-bucket", "8", "--tokens-per-step", "64", "--d-model", "8",
        "--num-layers", "1", "--num-cycles", "1", "--max-epochs", "1", "--progress", "false",
        "--out", str(tmp_path)])
    methods = result["methods"]
    assert list(methods) == ["concat-chunk", "dd", "padding"]
    steps = {row["steps"] for row in methods.values()}
    assert len(steps) == 1 and methods["dd"]["tokens"] == 64 * steps.pop()
    assert methods["concat-chunk"]["speedup"] == 1.0 and methods["dd"]["shapes"] > 1
    assert all(row["tokens_per_second"] > 0 and len(row["evaluations"]) == 1
               for row in methods.values())
    assert "| dd |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["bayes_loss"] > 0
