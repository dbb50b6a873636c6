"""The synthetic tasks: MQAR (the notes' worked example, every invariant on random parameters,
the gap law), passkey rows, the gather of supervised positions, and Markov documents."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.tasks.labels import IGNORE, label_positions
from experiments.tasks.markov_documents import (
    bayes_loss,
    log_uniform_lengths,
    markov_chains,
    sample_documents,
)
from experiments.tasks.mqar import (
    gap_probabilities,
    layout,
    mqar,
    mqar_mixture,
    train_test,
)
from experiments.tasks.passkey import passkey


def test_worked_example_from_the_notes():
    # V=20, L=16, kv=2: keys 8, 3; values 15, 12; key 8 queried at gap 1, key 3 at gap 3.
    x, y = layout(np.array([[8, 3]]), np.array([[15, 12]]), np.array([[1, 3]]), 16)
    assert x[0].tolist() == [8, 15, 3, 12, 0, 0, 8, 0, 0, 0, 3, 0, 0, 0, 0, 0]
    want = np.full(16, -100)
    want[6], want[10] = 15, 12
    assert y[0].tolist() == want.tolist()


@st.composite
def specs(draw):
    kv = draw(st.integers(1, 8))
    L = 2 * draw(st.integers(2 * kv, 2 * kv + 20))
    V = draw(st.integers(max(L + 1, 4 * kv + 4), L + 200))
    return dict(vocab_size=V, input_seq_len=L, num_kv_pairs=kv,
                num_examples=draw(st.integers(1, 40)),
                power_a=draw(st.sampled_from([0.01, 0.5, 1.0])),
                random_non_queries=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


@settings(max_examples=80, deadline=None)
@given(spec=specs())
def test_invariants(spec):
    x, y = mqar(**spec)
    V, L, kv = spec["vocab_size"], spec["input_seq_len"], spec["num_kv_pairs"]
    assert x.shape == y.shape == (spec["num_examples"], L)
    assert x.dtype == y.dtype == np.int32
    for row, lab in zip(x, y, strict=True):
        keys, values = row[0:2 * kv:2], row[1:2 * kv:2]
        assert len(set(keys)) == kv and ((keys >= 1) & (keys < V // 2)).all()
        assert len(set(values)) == kv and ((values >= V // 2) & (values < V)).all()
        supervised = np.flatnonzero(lab != IGNORE)
        assert len(supervised) == kv  # each key queried exactly once
        assert (supervised >= 2 * kv).all() and ((supervised - 2 * kv) % 2 == 0).all()
        answer = dict(zip(keys.tolist(), values.tolist(), strict=True))
        rest = row[2 * kv:]
        for pos in supervised:
            key = int(row[pos])
            assert lab[pos] == answer[key]  # the label is the queried key's value
            assert (rest == key).sum() == 1  # the key appears once after the context
            assert not (row[pos + 1:] == answer[key]).any()  # value never after its query
        fillers = np.delete(rest, supervised - 2 * kv)
        if spec["random_non_queries"]:
            assert not np.isin(fillers, np.concatenate([keys, values])).any()
        else:
            assert (fillers == 0).all()


def test_first_gap_follows_the_power_law():
    n, L, kv = 20_000, 64, 4
    x, _ = mqar(vocab_size=8192, input_seq_len=L, num_kv_pairs=kv, num_examples=n, seed=3)
    first_key = x[:, 0]
    gaps = (np.argmax(x[:, 2 * kv:] == first_key[:, None], axis=1)) // 2
    p = gap_probabilities((L - 2 * kv) // 2, 0.01)
    freq = np.bincount(gaps, minlength=p.size) / n
    assert abs(freq[0] - 0.2467) < 0.015  # notes: P(gap 0) ~ 0.25 at L=64, kv=4
    assert 0.5 * np.abs(freq - p).sum() < 0.03  # total variation distance


def test_uniform_gaps_with_power_one():
    x, _ = mqar(vocab_size=1000, input_seq_len=64, num_kv_pairs=4, num_examples=20_000,
                power_a=1.0, seed=4)
    gaps = np.argmax(x[:, 8:] == x[:, :1], axis=1) // 2
    freq = np.bincount(gaps, minlength=28) / len(gaps)
    assert np.abs(freq - 1 / 28).max() < 0.01


@pytest.mark.parametrize("changes,name", [
    ({"input_seq_len": 15}, "input_seq_len"),
    ({"vocab_size": 16}, "vocab_size"),
    ({"num_kv_pairs": 5}, "num_kv_pairs"),
    ({"num_examples": 0}, "num_examples"),
    ({"power_a": 0.0}, "power_a"),
])
def test_bad_parameters(changes, name):
    spec = dict(vocab_size=20, input_seq_len=16, num_kv_pairs=2, num_examples=3, seed=0)
    with pytest.raises(ValueError, match=name):
        mqar(**(spec | changes))


def test_train_and_test_are_disjoint_and_checked():
    seg = dict(vocab_size=8192, input_seq_len=64, num_kv_pairs=4)
    (xtr, _), (xte, _) = train_test([seg | {"num_examples": 2000}],
                                        [seg | {"num_examples": 300}], seq_len=64, seed=0)
    assert xtr.shape == (2000, 64) and xte.shape == (300, 64)
    assert not np.array_equal(xtr[:300], xte)
    tiny = dict(vocab_size=9, input_seq_len=8, num_kv_pairs=1)  # few distinct rows exist
    with pytest.raises(ValueError, match="test rows"):
        train_test([tiny | {"num_examples": 500}], [tiny | {"num_examples": 50}], seq_len=8,
                   seed=0)


def test_mixture_of_lengths_is_padded():
    x, y = mqar_mixture([dict(vocab_size=512, input_seq_len=32, num_kv_pairs=2,
                              num_examples=5),
                         dict(vocab_size=512, input_seq_len=64, num_kv_pairs=8,
                              num_examples=7)], seq_len=128, seed=1)
    assert x.shape == (12, 128)
    assert (x[:5, 32:] == 0).all() and (y[:5, 32:] == IGNORE).all()
    assert (y != IGNORE).sum(1).tolist() == [2] * 5 + [8] * 7
    with pytest.raises(ValueError, match="seq_len"):
        mqar_mixture([dict(vocab_size=512, input_seq_len=64, num_kv_pairs=2,
                           num_examples=1)], seq_len=32, seed=0)


# ----------------------------------------------------------------------------------------------
# Passkey and the supervised positions


def test_passkey_rows_hold_one_needle_and_the_query():
    V, noise, L = 5, 7, 40
    x, y = passkey(seq_len=L, num_examples=300, num_values=V, num_noise=noise, seed=1)
    mark, query = noise + V, noise + V + 1
    assert x.shape == y.shape == (300, L) and x.dtype == y.dtype == np.int32
    assert (x[:, -1] == query).all() and (x[:, :-1] != query).all()
    assert ((x == mark).sum(1) == 1).all()
    where = np.argmax(x == mark, axis=1)
    needle = x[np.arange(300), where + 1]
    # the passkey follows the marker and is the only label; the rest is noise
    np.testing.assert_array_equal(y[:, -1], needle)
    assert ((needle >= noise) & (needle < mark)).all()
    assert (y[:, :-1] == -100).all()
    rest = x.copy()
    rest[np.arange(300), where] = rest[np.arange(300), where + 1] = 0
    assert (rest[:, :-1] < noise).all()
    # positions and values cover their ranges
    assert where.min() == 0 and where.max() == L - 3
    assert set(needle.tolist()) == set(range(noise, mark))
    with pytest.raises(ValueError, match="seq_len"):
        passkey(seq_len=2, num_examples=1, num_values=1, num_noise=1, seed=0)
    with pytest.raises(ValueError, match="num_values"):
        passkey(seq_len=5, num_examples=1, num_values=0, num_noise=1, seed=0)


def test_label_positions():
    labels = np.full((3, 8), -100)
    labels[0, [2, 5]] = [11, 12]
    labels[1, [7]] = [13]
    got = label_positions(labels)
    np.testing.assert_array_equal(got["positions"], [[2, 5], [7, 0], [0, 0]])
    np.testing.assert_array_equal(got["targets"], [[11, 12], [13, 0], [0, 0]])
    np.testing.assert_array_equal(got["target_mask"], [[1, 1], [1, 0], [0, 0]])


def test_markov_documents_follow_their_chain_and_the_bayes_loss_is_bracketed():
    chains = markov_chains(vocab_size=8, num_chains=3, concentration=0.3, seed=0)
    lengths = log_uniform_lengths(num_documents=400, min_length=2, max_length=200, seed=1)
    assert lengths.min() >= 2 and lengths.max() <= 200
    tokens, chain = sample_documents(chains, lengths, seed=2)
    starts = np.cumsum(lengths) - lengths
    inside = np.ones(len(tokens), bool)
    inside[starts] = False  # a document's first token has no predecessor
    position = np.flatnonzero(inside)
    doc_chain = np.repeat(chain, lengths)[position]
    previous, current = tokens[position - 1], tokens[position]
    for k in range(3):  # empirical transitions of each chain's documents
        counts = np.zeros((8, 8))
        np.add.at(counts, (previous[doc_chain == k], current[doc_chain == k]), 1)
        seen = counts.sum(1) > 200
        np.testing.assert_allclose(counts[seen] / counts[seen].sum(1, keepdims=True),
                                   chains[k][seen], atol=0.1)
    known = -np.log(chains[doc_chain, previous, current]).mean()  # the chain told
    best = bayes_loss(chains, tokens, lengths)
    assert known < best < known + 0.1 < np.log(8)
