"""Needle copy: a marked multi-token needle hidden in noise, to be written out again after a
query marker, the retrieval-heads paper's needle-in-a-haystack test in its simplest form.

References:
    P41 Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality" (a
    retrieval head's top attention lands on the needle token being copied).
"""

from __future__ import annotations

import numpy as np

from experiments.tasks.labels import IGNORE


def needle_copy(*, seq_len: int, num_examples: int, needle_len: int, vocab_size: int,
                seed: int | np.random.SeedSequence) -> dict[str, np.ndarray]:
    """Rows ``noise .. MARK n_1 .. n_k noise .. QUERY n_1 .. n_{k-1}``.

    Tokens: noise and needle tokens are drawn from [1, vocab_size) (the needle's k tokens
    distinct), MARK = vocab_size and QUERY = vocab_size + 1 (vocabulary
    :func:`needle_vocab`). The needle sits at a uniform position before the query; the
    last k positions are supervised: at QUERY the first needle token, then each next one
    (teacher forcing).

    Returns:
        {"inputs", "labels": int32 [R, seq_len]; "needle": bool [R, seq_len], the needle's
        positions; "answer": bool [R, seq_len], the supervised positions}.

    Raises:
        ValueError: too short a row for the needle, or a vocabulary smaller than it.

    >>> rows = needle_copy(seq_len=12, num_examples=2, needle_len=3, vocab_size=20, seed=0)
    >>> x, y = rows["inputs"], rows["labels"]
    >>> bool((x[:, -3] == 21).all()), (y[:, -3:] == x[rows["needle"]].reshape(2, 3)).all()
    (True, np.True_)
    """
    if needle_len < 1 or seq_len < 2 * needle_len + 2:
        raise ValueError(f"seq_len: expected >= 2 * needle_len + 2 = {2 * needle_len + 2} "
                         f"with needle_len >= 1, got seq_len={seq_len}, "
                         f"needle_len={needle_len}")
    if vocab_size <= needle_len + 1:
        raise ValueError(f"vocab_size: expected > needle_len + 1 = {needle_len + 1}, "
                         f"got {vocab_size}")
    if num_examples < 1:
        raise ValueError(f"num_examples: expected >= 1, got {num_examples}")
    rng = np.random.default_rng(seed)
    k, R = needle_len, num_examples
    inputs = rng.integers(1, vocab_size, (R, seq_len)).astype(np.int32)
    needle = np.argsort(rng.random((R, vocab_size - 1)), axis=1)[:, :k].astype(np.int32) + 1
    query = seq_len - k  # position of QUERY; the answer fills the rest
    start = rng.integers(0, query - k, R)  # MARK's position; the needle follows it
    rows = np.arange(R)[:, None]
    inputs[rows[:, 0], start] = vocab_size
    where = start[:, None] + 1 + np.arange(k)
    inputs[rows, where] = needle
    inputs[:, query] = vocab_size + 1
    inputs[:, query + 1:] = needle[:, :-1]
    labels = np.full((R, seq_len), IGNORE, np.int32)
    labels[:, query:] = needle
    needle_mask = np.zeros((R, seq_len), bool)
    needle_mask[rows, where] = True
    return {"inputs": inputs, "labels": labels, "needle": needle_mask,
            "answer": labels != IGNORE}


def needle_vocab(vocab_size: int) -> int:
    """Token count of :func:`needle_copy` rows: the tokens and the two markers."""
    return vocab_size + 2
