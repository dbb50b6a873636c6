"""MQAR: multi-query associative recall data (Zoology, P24), vectorised NumPy.

A row of length L starts with ``kv`` key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct,
from [1, V/2); values distinct, from [V/2, V)); the rest is filler (token 0) in which every
key appears once more as a query, at position ``2 kv + 2 gap``. The gaps are distinct draws
from 0 .. space-1 (space = (L - 2 kv) / 2) with probability proportional to
``a * i^(a - 1)`` for i = 1 .. space, so queries cluster early (a = power_a = 0.01 gives
roughly i^-0.99). The label at a query position is the key's value (the next token); every
other label is -100 (ignored), so each row has exactly ``kv`` supervised positions.

Sampling without replacement is done for all rows at once: keys and values by rejection
(redraw rows with a repeat: exactly uniform over ordered distinct draws), gaps by the
Gumbel-top-k trick (the same distribution as drawing one gap at a time, renormalising).

One deviation from the original generator: with ``random_non_queries`` the random filler
tokens never equal one of the row's keys or values (the original lets them collide, which
plants unlabelled queries and values after their query).

References:
    P24 Zoology: Measuring and Improving Recall in Efficient Language Models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from experiments.tasks.labels import IGNORE

FILLER = 0


def _check_spec(vocab_size: int, input_seq_len: int, num_kv_pairs: int, num_examples: int,
                power_a: float) -> None:
    if input_seq_len % 2:
        raise ValueError(f"input_seq_len: must be even, got {input_seq_len}")
    if vocab_size <= input_seq_len:
        raise ValueError(f"vocab_size: must exceed input_seq_len={input_seq_len}, "
                         f"got {vocab_size}")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > input_seq_len:
        raise ValueError(f"num_kv_pairs: need 1 <= num_kv_pairs and 4 * num_kv_pairs <= "
                         f"input_seq_len={input_seq_len}, got {num_kv_pairs}")
    if num_examples < 1:
        raise ValueError(f"num_examples: must be positive, got {num_examples}")
    if not power_a > 0:
        raise ValueError(f"power_a: must be positive, got {power_a}")


def _distinct(rng: np.random.Generator, rows: int, k: int, low: int, high: int) -> np.ndarray:
    """[rows, k] int: each row k distinct draws from [low, high), in random order."""
    out = rng.integers(low, high, size=(rows, k))
    while True:
        s = np.sort(out, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if bad.size == 0:
            return out
        out[bad] = rng.integers(low, high, size=(bad.size, k))


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """p_i proportional to a * i^(a - 1), i = 1 .. space: the law of the first query's gap."""
    i = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * i ** (power_a - 1)
    return p / p.sum()


def _gaps(rng: np.random.Generator, rows: int, k: int, p: np.ndarray) -> np.ndarray:
    """[rows, k]: k distinct gaps per row, drawn one after another with probabilities p."""
    scores = np.log(p) + rng.gumbel(size=(rows, p.size))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _random_fillers(rng: np.random.Generator, inputs: np.ndarray, used: np.ndarray,
                    vocab_size: int) -> None:
    """Replace FILLER tokens in place by random tokens that are not in the row's ``used``."""
    chunk = max(1, (1 << 25) // vocab_size)  # rows per [rows, V] lookup table (32 MiB)
    for start in range(0, inputs.shape[0], chunk):
        block = inputs[start:start + chunk]  # a view: filled in place
        taken = np.zeros((block.shape[0], vocab_size), bool)
        np.put_along_axis(taken, used[start:start + chunk], True, axis=1)
        rows, cols = np.nonzero(block == FILLER)
        tokens = rng.integers(0, vocab_size, size=rows.size)
        redo = np.flatnonzero(taken[rows, tokens])
        while redo.size:
            tokens[redo] = rng.integers(0, vocab_size, size=redo.size)
            redo = redo[taken[rows[redo], tokens[redo]]]
        block[rows, cols] = tokens


def layout(keys: np.ndarray, values: np.ndarray, gaps: np.ndarray, input_seq_len: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Place [rows, kv] keys, values and gaps into MQAR rows (filler 0, labels -100)."""
    n, kv = keys.shape
    inputs = np.full((n, input_seq_len), FILLER, np.int32)
    inputs[:, 0:2 * kv:2] = keys
    inputs[:, 1:2 * kv:2] = values
    query_positions = 2 * kv + 2 * gaps
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    labels = np.full((n, input_seq_len), IGNORE, np.int32)
    np.put_along_axis(labels, query_positions, values, axis=1)
    return inputs, labels


def mqar(*, vocab_size: int, input_seq_len: int, num_kv_pairs: int, num_examples: int,
         power_a: float = 0.01, random_non_queries: bool = False,
         seed: int | np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    """Generate MQAR rows.

    Args:
        vocab_size: V; keys come from [1, V/2), values from [V/2, V), 0 is the filler.
        input_seq_len: L, even, < V.
        num_kv_pairs: kv, with 4 kv <= L.
        num_examples: rows.
        power_a: exponent of the gap law (1.0: uniform gaps).
        random_non_queries: fill with random tokens (never the row's keys or values)
            instead of 0.
        seed: an int or a numpy SeedSequence.

    Returns:
        (inputs, labels), int32 [num_examples, L]; labels are -100 except at the kv query
        positions, where they hold the queried key's value.

    Raises:
        ValueError: L odd, V <= L, 4 kv > L, kv < 1, no rows, or power_a <= 0.

    Example:
        >>> x, y = mqar(vocab_size=20, input_seq_len=16, num_kv_pairs=2, num_examples=3,
        ...             seed=0)
        >>> x.shape, int((y != -100).sum(1).min())
        ((3, 16), 2)
    """
    _check_spec(vocab_size, input_seq_len, num_kv_pairs, num_examples, power_a)
    rng = np.random.default_rng(seed)
    n, L, kv = num_examples, input_seq_len, num_kv_pairs
    keys = _distinct(rng, n, kv, 1, vocab_size // 2)
    values = _distinct(rng, n, kv, vocab_size // 2, vocab_size)
    gaps = _gaps(rng, n, kv, gap_probabilities((L - 2 * kv) // 2, power_a))

    inputs, labels = layout(keys, values, gaps, L)
    if random_non_queries:
        _random_fillers(rng, inputs, np.concatenate([keys, values], axis=1), vocab_size)
    return inputs, labels


def mqar_mixture(segments: Sequence[Mapping], *, seq_len: int,
                 seed: int | np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    """Rows of several MQAR configurations (e.g. several lengths), padded to ``seq_len``.

    The variant of later papers: train on a mix of lengths, test on longer ones. Each segment
    is a dict of :func:`mqar` keyword arguments (without ``seed``); each gets its own seed
    spawned from ``seed``. Shorter rows are padded with the filler and label -100.

    >>> x, y = mqar_mixture([dict(vocab_size=64, input_seq_len=16, num_kv_pairs=2,
    ...                           num_examples=2),
    ...                      dict(vocab_size=64, input_seq_len=32, num_kv_pairs=4,
    ...                           num_examples=3)], seq_len=32, seed=0)
    >>> x.shape, (y != -100).sum(1).tolist()
    ((5, 32), [2, 2, 4, 4, 4])
    """
    children = np.random.SeedSequence(seed) if isinstance(seed, int) else seed
    parts = []
    for segment, child in zip(segments, children.spawn(len(segments)), strict=True):
        if "seed" in segment:
            raise ValueError("segments: seeds are spawned from the mixture's seed; drop 'seed'")
        if segment["input_seq_len"] > seq_len:
            raise ValueError(f"segments: input_seq_len={segment['input_seq_len']} exceeds "
                             f"seq_len={seq_len}")
        x, y = mqar(**segment, seed=child)
        pad = ((0, 0), (0, seq_len - x.shape[1]))
        parts.append((np.pad(x, pad, constant_values=FILLER),
                      np.pad(y, pad, constant_values=IGNORE)))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def count_overlap(a: np.ndarray, b: np.ndarray) -> int:
    """How many rows of ``b`` also occur in ``a`` (same width)."""
    seen = {row.tobytes() for row in np.ascontiguousarray(a)}
    return sum(row.tobytes() in seen for row in np.ascontiguousarray(b))


def train_test(train: Sequence[Mapping], test: Sequence[Mapping], *, seq_len: int,
               seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Train and test sets from disjoint seed streams, checked for shared rows.

    Raises:
        ValueError: a test row equals a train row (make V or L larger, or the sets smaller).
    """
    train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    train_xy = mqar_mixture(train, seq_len=seq_len, seed=train_seed)
    test_xy = mqar_mixture(test, seq_len=seq_len, seed=test_seed)
    shared = count_overlap(train_xy[0], test_xy[0])
    if shared:
        raise ValueError(f"test: {shared} of {len(test_xy[0])} test rows also occur in the "
                         f"training set")
    return train_xy, test_xy
