"""Passkey retrieval (needle in noise): one marked token to recall at the end of a noisy
sequence, the Titans paper's S-NIAH in its simplest form.

References:
    P37 Titans, "Titans: Learning to Memorize at Test Time" (Table 2, S-NIAH).
"""

from __future__ import annotations

import numpy as np

from experiments.tasks.labels import IGNORE


def passkey(*, seq_len: int, num_examples: int, num_values: int, num_noise: int,
            seed: int | np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    """Needle-in-noise rows.

    Tokens: noise [0, num_noise), passkeys [num_noise, num_noise + num_values), MARK =
    num_noise + num_values, QUERY = MARK + 1 (vocabulary :func:`passkey_vocab`).

    Returns:
        (inputs, labels) int32 [num_examples, seq_len]: noise everywhere except MARK at a
        uniform position m in [0, seq_len - 2), the passkey at m + 1 and QUERY last; labels
        are -100 except at the last position, which holds the passkey.

    Raises:
        ValueError: seq_len < 3 or a count < 1.

    >>> x, y = passkey(seq_len=6, num_examples=2, num_values=3, num_noise=4, seed=0)
    >>> x.shape, bool((x[:, -1] == 8).all()), bool(((y[:, -1] >= 4) & (y[:, -1] < 7)).all())
    ((2, 6), True, True)
    """
    if seq_len < 3:
        raise ValueError(f"seq_len: expected >= 3, got {seq_len}")
    for name, value in (("num_examples", num_examples), ("num_values", num_values),
                        ("num_noise", num_noise)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    rng = np.random.default_rng(seed)
    mark = num_noise + num_values
    inputs = rng.integers(0, num_noise, (num_examples, seq_len)).astype(np.int32)
    where = rng.integers(0, seq_len - 2, num_examples)
    keys = rng.integers(num_noise, mark, num_examples).astype(np.int32)
    rows = np.arange(num_examples)
    inputs[rows, where] = mark
    inputs[rows, where + 1] = keys
    inputs[:, -1] = mark + 1
    labels = np.full((num_examples, seq_len), IGNORE, np.int32)
    labels[:, -1] = keys
    return inputs, labels


def passkey_vocab(num_values: int, num_noise: int) -> int:
    return num_noise + num_values + 2
