"""The analysis experiment's data: needle-copy rows laid out as documented, corrupted rows
that change the answers and nothing else. (The experiment itself runs end to end in
colab/attention_analysis.ipynb, executed by the site build, tests/test_site.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments.analysis.run import PRESETS, corrupt, mqar_rows, needle_rows
from experiments.tasks.labels import IGNORE
from experiments.tasks.needle import needle_copy, needle_vocab

CONFIG = dataclasses.replace(PRESETS["quick"], seq_len=32, vocab_size=64, needle_len=3,
                             num_kv_pairs=4)


def test_needle_copy_layout():
    rows = needle_copy(seq_len=20, num_examples=50, needle_len=4, vocab_size=30, seed=1)
    x, y, needle, answer = rows["inputs"], rows["labels"], rows["needle"], rows["answer"]
    MARK, QUERY = 30, 31
    assert needle_vocab(30) == 32 and x.max() <= QUERY
    for i in range(50):
        where = np.flatnonzero(needle[i])
        assert len(where) == 4 and np.all(np.diff(where) == 1)
        assert x[i, where[0] - 1] == MARK and (x[i] == MARK).sum() == 1
        tokens = x[i, where]
        assert len(set(tokens.tolist())) == 4 and tokens.min() >= 1
        assert x[i, 16] == QUERY and where[-1] < 16
        np.testing.assert_array_equal(x[i, 17:], tokens[:3])  # teacher forcing
        np.testing.assert_array_equal(y[i, 16:], tokens)
        assert np.all(y[i, :16] == IGNORE)
    np.testing.assert_array_equal(answer, y != IGNORE)
    with pytest.raises(ValueError, match="seq_len"):
        needle_copy(seq_len=9, num_examples=1, needle_len=4, vocab_size=30, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        needle_copy(seq_len=20, num_examples=1, needle_len=4, vocab_size=5, seed=0)


@pytest.mark.parametrize("task", ["needle", "mqar"])
def test_corrupted_rows_change_the_answers_only(task):
    make = needle_rows if task == "needle" else mqar_rows
    rows = make(CONFIG, 20, 0)
    bad = corrupt(CONFIG, task, rows, 0)
    x, xb, y, yb = rows["inputs"], bad["inputs"], rows["labels"], bad["labels"]
    answer = rows["answer"]
    assert np.all(y[answer] != yb[answer]) and np.all(yb[~answer] == IGNORE)
    if task == "needle":
        changed = rows["needle"] | (answer & (np.arange(CONFIG.seq_len) > CONFIG.seq_len
                                              - CONFIG.needle_len))
    else:
        values = np.zeros_like(answer)
        values[:, 1:2 * CONFIG.num_kv_pairs:2] = True
        changed = values
    np.testing.assert_array_equal(x[~changed], xb[~changed])
    assert np.all(x[changed] != xb[changed])
    for i in range(20):  # the new answers are the new tokens where the old ones were
        table = dict(zip(x[i][changed[i]].tolist(), xb[i][changed[i]].tolist(), strict=True))
        np.testing.assert_array_equal(yb[i][answer[i]], [table[t] for t in y[i][answer[i]]])
