"""Variable-length documents as training rows: dataset decomposition with its variable
sequence length curriculum (P75), and the two layouts it is measured against.

Every layout gives rows of ``tokens`` [R, L + 1]: the inputs are ``tokens[:, :-1]`` and the
targets ``tokens[:, 1:]``; where not every target is a real next token, ``target_mask``
[R, L] marks those that are, and ``segment_ids`` [R, L] (concat-and-chunk) gives each input
its document, for the document mask :func:`jattn.masks.segments`
(:func:`experiments.common.lm.next_token_functions` trains on all three).

* :func:`decompose`: each document is cut into pieces whose numbers of targets are powers of
  two; a piece of 2**i targets goes to bucket D_i. Every row holds one document and no
  padding, so it needs no mask.
* :class:`CurriculumBatches`: batches of constant tokens from the buckets
  (``tokens_per_step / 2**i`` rows from D_i) in the order of a length curriculum; a
  :class:`~experiments.common.trainer.BatchSource`, so the trainer runs it and resumes it
  exactly.
* :func:`concat_and_chunk` (shuffled documents back to back, cut into rows of one length,
  with document ids) and :func:`pad_documents` (one document per row, padded): the baselines.

Our reading of P75 (the paper's abstract, ../shared/papers/seed-abstracts.txt, and the
authors' code, github.com/apple/ml-dataset-decomposition: ``get_binary`` in
scripts/make_dd_buckets.py, scripts/get_dd_params.py, and the ``MyRandomMix`` sampler its
open_lm.patch adds):

* **Decomposition.** A document is split greedily from its start into pieces of the largest
  power-of-two size that fits, capped at the largest bucket: pieces of the largest bucket
  first, then the binary expansion of what is left, longest first. What is left below the
  smallest bucket is dropped. The authors' code cuts non-overlapping pieces of 2**i + 1
  tokens, so one target is lost at each cut; here consecutive pieces share one token (the
  last target of one is the first input of the next), so the pieces are exactly the binary
  expansion of the document's l - 1 targets and every token after a document's first is the
  target of exactly one row, except the last ``(l - 1) mod min_length`` of each document
  (dropped). Longer-than-the-largest documents are cut into largest pieces (the authors'
  ``randomize=False``; their default draws random piece sizes there).
* **Batches.** A batch from D_i has ``tokens_per_step / 2**i`` rows, so every step trains on
  the same number of tokens (the authors' ``--batch-mult``).
* **Curriculum.** One epoch uses every full batch of every bucket once. It is split into
  ``num_cycles`` cycles, each with an equal share of every bucket's batches (the authors run
  8 cycles, one per "epoch" of their scripts). Within a cycle, each step picks a bucket that
  still has batches with probability proportional to ``odds_i * n_i`` (n_i: the bucket's
  batches in the cycle), until all are used (``MyRandomMix`` with ``longest=True``, weights
  from get_dd_params.py). The odds name the curriculum: "uniform" (1 for every bucket: the
  batches in random order), "grow_linear" (k, ..., 2, 1 from the shortest of k buckets),
  "grow_p2" (2**(k-1), ..., 2, 1: the authors' default, "Pow-2 Curriculum", 32 16 8 4 2 1
  for their six buckets), "grow_p100" (100**(k-1), ..., 1) and "shrink_p100" (1, ...,
  100**(k-1)); a growing curriculum starts each cycle with mostly short sequences and ends
  it with the long ones.

References:
    P75 Dataset Decomposition, "Dataset Decomposition: Faster LLM Training with Variable
    Sequence Length Curriculum" (Pouransari et al., 2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

CURRICULA = ("uniform", "grow_linear", "grow_p2", "grow_p100", "shrink_p100")


def _power_of_two(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Documents:
    """A corpus of variable-length token documents, stored back to back: document d is
    ``tokens[offsets[d]:offsets[d + 1]]``.

    Args:
        tokens: int [N], every document one after another.
        lengths: int [D] (>= 0), summing to N.

    >>> docs = Documents(np.arange(5), np.array([2, 0, 3]))
    >>> len(docs), docs[2].tolist(), docs.offsets.tolist()
    (3, [2, 3, 4], [0, 2, 2, 5])
    """

    tokens: np.ndarray
    lengths: np.ndarray

    def __post_init__(self):
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens: expected integers [N], got {tokens.dtype} "
                             f"{tokens.shape}")
        if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer) \
                or (lengths < 0).any():
            raise ValueError(f"lengths: expected non-negative integers [D], got "
                             f"{lengths.dtype} {lengths.shape}")
        if lengths.sum() != len(tokens):
            raise ValueError(f"lengths: sum to {lengths.sum()}, tokens has {len(tokens)}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "lengths", lengths.astype(np.int64))

    @classmethod
    def from_list(cls, documents: Sequence[np.ndarray]) -> Documents:
        """From one 1-D integer array per document."""
        lengths = np.array([len(d) for d in documents], np.int64)
        tokens = (np.concatenate([np.asarray(d) for d in documents]) if len(documents)
                  else np.zeros(0, np.int32))
        return cls(tokens, lengths)

    @property
    def offsets(self) -> np.ndarray:
        """int64 [D + 1]: where each document starts, and the end."""
        return np.concatenate([[0], np.cumsum(self.lengths)])

    @property
    def num_targets(self) -> int:
        """Next-token targets of the corpus: every token but each document's first."""
        return int((self.lengths - 1).clip(0).sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, d: int) -> np.ndarray:
        offsets = self.offsets
        return self.tokens[offsets[d]:offsets[d + 1]]


class Bucket(NamedTuple):
    """The rows of one bucket D_i: ``length`` = 2**i targets per row."""

    length: int
    tokens: np.ndarray  # [n, length + 1]
    document: np.ndarray  # int64 [n]: the document of each row
    start: np.ndarray  # int64 [n]: the position in its document of the row's first token


class Decomposition(NamedTuple):
    """A corpus decomposed into buckets (:func:`decompose`)."""

    buckets: tuple[Bucket, ...]  # shortest first
    dropped_targets: int  # targets left out: the remainders below the smallest bucket

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(b.length for b in self.buckets)


def decompose(documents: Documents, *, min_length: int, max_length: int) -> Decomposition:
    """Dataset decomposition (P75): every document into one-document rows of power-of-two
    lengths from ``min_length`` to ``max_length`` targets (the rule in the module docstring).

    Vectorised over documents: a document with n = l - 1 targets has n // max_length pieces
    of ``max_length``, starting at multiples of it, and a piece of 2**i < max_length targets
    where bit i of n is set, starting at n with bits 0..i cleared.

    Args:
        documents: the corpus.
        min_length, max_length: powers of two, the smallest and largest bucket.

    Returns:
        The buckets, shortest first (empty ones included), and the number of dropped targets.

    Raises:
        ValueError: a length that is not a power of two, or min_length > max_length.

    >>> docs = Documents.from_list([np.arange(12), np.arange(3)])  # 11 = 8 + 2 + 1, 2 targets
    >>> d = decompose(docs, min_length=2, max_length=8)
    >>> [(b.length, b.tokens.tolist()) for b in d.buckets], d.dropped_targets
    ([(2, [[8, 9, 10], [0, 1, 2]]), (4, []), (8, [[0, 1, 2, 3, 4, 5, 6, 7, 8]])], 1)
    """
    low = _power_of_two("min_length", min_length)
    high = _power_of_two("max_length", max_length)
    if low > high:
        raise ValueError(f"min_length: {low} is larger than max_length={high}")
    targets = (documents.lengths - 1).clip(0)
    offsets = documents.offsets
    k_low, k_high = low.bit_length() - 1, high.bit_length() - 1
    buckets = []
    for k in range(k_low, k_high + 1):
        size = 1 << k
        if k == k_high:
            count = targets >> k
            document = np.repeat(np.arange(len(targets)), count)
            first = np.repeat(np.cumsum(count) - count, count)
            start = (np.arange(len(document)) - first) << k
        else:
            document = np.flatnonzero((targets >> k) & 1)
            start = (targets[document] >> (k + 1)) << (k + 1)
        index = (offsets[document] + start)[:, None] + np.arange(size + 1)
        buckets.append(Bucket(size, documents.tokens[index],
                              document.astype(np.int64), start.astype(np.int64)))
    return Decomposition(tuple(buckets), int((targets & (low - 1)).sum()))


def curriculum_odds(curriculum: str | Sequence[float], num_buckets: int) -> np.ndarray:
    """The sampling odds of each bucket, shortest first: a name of :data:`CURRICULA` or
    ``num_buckets`` positive numbers.

    >>> curriculum_odds("grow_p2", 4).tolist(), curriculum_odds("grow_linear", 3).tolist()
    ([8.0, 4.0, 2.0, 1.0], [3.0, 2.0, 1.0])
    """
    rank = np.arange(num_buckets, dtype=np.float64)  # 0: the shortest bucket
    if isinstance(curriculum, str):
        named = {"uniform": np.ones(num_buckets), "grow_linear": num_buckets - rank,
                 "grow_p2": 2.0 ** (num_buckets - 1 - rank),
                 "grow_p100": 100.0 ** (num_buckets - 1 - rank), "shrink_p100": 100.0 ** rank}
        if curriculum not in named:
            raise ValueError(f"curriculum: expected one of {CURRICULA} or odds, got "
                             f"{curriculum!r}")
        return named[curriculum]
    odds = np.asarray(curriculum, np.float64)
    if odds.shape != (num_buckets,) or not (odds > 0).all() or not np.isfinite(odds).all():
        raise ValueError(f"curriculum: expected {num_buckets} positive odds (one per bucket), "
                         f"got {tuple(curriculum)}")
    return odds


class Plan(NamedTuple):
    """The steps of one epoch of :class:`CurriculumBatches`."""

    bucket: np.ndarray  # int [steps]: the bucket of each step's batch
    batch: np.ndarray  # int [steps]: which of the bucket's batches (in this epoch's order)
    rows: tuple[np.ndarray, ...]  # per bucket, its rows in this epoch's order


class CurriculumBatches:
    """Batches of ``tokens_per_step`` tokens from a :class:`Decomposition`, in the order of a
    variable sequence length curriculum (the module docstring): a batch source for
    :func:`experiments.common.trainer.fit`, ``source(step) -> {"tokens": [rows, L + 1]}``.

    An epoch uses ``n_i // (tokens_per_step / L_i)`` batches of bucket i: its rows in a fresh
    order each epoch, the last incomplete batch left out (other rows each epoch). The batch
    at a step is a pure function of (seed, step): the epoch's order comes from
    ``np.random.default_rng([seed, epoch])``, so a resumed run draws the same batches.

    The sampling itself: within a cycle, bucket i's batches are the arrivals of a Poisson
    process of rate ``odds_i * n_i``, stopped after its n_i batches; merging all buckets'
    arrivals in time order draws, at each step, an unfinished bucket with probability
    proportional to its rate, exactly the authors' sequential sampler, in one sort.

    Args:
        decomposition: the buckets (:func:`decompose`).
        tokens_per_step: tokens (targets) per batch, a multiple of the longest bucket.
        curriculum: a name of :data:`CURRICULA` or one positive odds per bucket.
        num_cycles: cycles per epoch (>= 1).
        seed: the order of the rows and of the buckets.

    Raises:
        ValueError: tokens_per_step not a multiple of every bucket length, bad curriculum or
            num_cycles, or no bucket with a full batch.
    """

    def __init__(self, decomposition: Decomposition, *, tokens_per_step: int,
                 curriculum: str | Sequence[float] = "grow_p2", num_cycles: int = 1,
                 seed: int = 0):
        lengths = np.array(decomposition.lengths, np.int64)
        if len(lengths) == 0 or tokens_per_step < 1 or (tokens_per_step % lengths).any():
            raise ValueError(f"tokens_per_step: expected a multiple of every bucket length "
                             f"{tuple(lengths)}, got {tokens_per_step}")
        if num_cycles < 1:
            raise ValueError(f"num_cycles: expected >= 1, got {num_cycles}")
        self.decomposition = decomposition
        self.tokens_per_step = tokens_per_step
        self.odds = curriculum_odds(curriculum, len(lengths))
        self.num_cycles = num_cycles
        self.seed = seed
        self.rows_per_batch = tokens_per_step // lengths
        counts = np.array([len(b.tokens) for b in decomposition.buckets], np.int64)
        self.batches_per_epoch = counts // self.rows_per_batch
        self.steps_per_epoch = int(self.batches_per_epoch.sum())
        if self.steps_per_epoch == 0:
            raise ValueError(f"decomposition: no bucket fills a batch of {tokens_per_step} "
                             f"tokens (rows per bucket {counts.tolist()}, rows per batch "
                             f"{self.rows_per_batch.tolist()})")
        self.batch_sizes = tuple(int(r) for r in self.rows_per_batch[self.batches_per_epoch > 0])
        self._plan_epoch, self._plan = -1, None

    def plan(self, epoch: int) -> Plan:
        """The order of ``epoch``'s batches (the plan of the last epoch asked for is kept)."""
        if epoch != self._plan_epoch:
            self._plan_epoch, self._plan = epoch, self._make_plan(epoch)
        return self._plan

    def _make_plan(self, epoch: int) -> Plan:
        rng = np.random.default_rng([self.seed, epoch])
        rows = tuple(rng.permutation(len(b.tokens)) for b in self.decomposition.buckets)
        buckets, batches = [], []
        for cycle in range(self.num_cycles):
            arrivals, bucket, batch = [], [], []
            for i, total in enumerate(self.batches_per_epoch):
                share = np.array_split(np.arange(total), self.num_cycles)[cycle]
                if len(share) == 0:
                    continue
                rate = self.odds[i] * len(share)
                arrivals.append(np.cumsum(rng.exponential(1.0 / rate, len(share))))
                bucket.append(np.full(len(share), i))
                batch.append(share)
            if not arrivals:  # more cycles than batches
                continue
            order = np.argsort(np.concatenate(arrivals), kind="stable")
            buckets.append(np.concatenate(bucket)[order])
            batches.append(np.concatenate(batch)[order])
        return Plan(np.concatenate(buckets), np.concatenate(batches), rows)

    def bucket_at(self, step: int) -> int:
        """The bucket of the batch at ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return int(self.plan(epoch).bucket[position])

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(step, self.steps_per_epoch)
        plan = self.plan(epoch)
        i, j = int(plan.bucket[position]), int(plan.batch[position])
        size = int(self.rows_per_batch[i])
        rows = plan.rows[i][j * size:(j + 1) * size]
        return {"tokens": self.decomposition.buckets[i].tokens[rows]}


def concat_and_chunk(documents: Documents, *, length: int, seed: int) -> dict[str, np.ndarray]:
    """The concat-and-chunk baseline with document ids: the documents in a random order, back
    to back, cut into rows of ``length`` targets (consecutive rows share one token, so every
    token is the target of one row); the last row padded.

    Returns:
        tokens int32 [R, length + 1]; segment_ids int32 [R, length], the rank of each input's
        document in the shuffled order (increasing along a row, so a tiled attention skips
        the tiles between documents; -1 on padding); target_mask float32 [R, length], 0 where
        the target starts another document or is padding.

    Raises:
        ValueError: length < 1 or no targets.

    >>> rows = concat_and_chunk(Documents.from_list([np.array([5, 6, 7]), np.array([8, 9])]),
    ...                         length=2, seed=0)
    >>> rows["tokens"].tolist(), rows["target_mask"].tolist()
    ([[5, 6, 7], [7, 8, 9]], [[1.0, 1.0], [0.0, 1.0]])
    """
    if length < 1:
        raise ValueError(f"length: expected >= 1, got {length}")
    if documents.num_targets == 0:
        raise ValueError("documents: no document has a token to predict")
    order = np.random.default_rng(seed).permutation(len(documents))
    lengths = documents.lengths[order]
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths  # where each document lands in the concatenation
    source = np.arange(total) + np.repeat(documents.offsets[order] - first, lengths)
    num_rows = math.ceil((total - 1) / length)
    padded = num_rows * length + 1
    tokens = np.zeros(padded, np.int32)
    tokens[:total] = documents.tokens[source]
    segments = np.full(padded, -1, np.int32)
    segments[:total] = np.repeat(np.arange(len(documents), dtype=np.int32), lengths)
    index = (np.arange(num_rows) * length)[:, None] + np.arange(length + 1)
    rows, ids = tokens[index], segments[index]
    same = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
    return {"tokens": rows, "segment_ids": ids[:, :-1], "target_mask": same.astype(np.float32)}


def pad_documents(documents: Documents, *, length: int) -> dict[str, np.ndarray]:
    """The padding baseline: one document per row, padded with token 0 to ``length``
    targets (``length + 1`` tokens).

    Returns:
        tokens int32 [D, length + 1]; target_mask float32 [D, length], 1 on the document's
        l - 1 targets.

    Raises:
        ValueError: a document longer than length + 1 tokens.

    >>> rows = pad_documents(Documents.from_list([np.array([5, 6, 7]), np.array([8])]),
    ...                      length=3)
    >>> rows["tokens"].tolist(), rows["target_mask"].tolist()
    ([[5, 6, 7, 0], [8, 0, 0, 0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    """
    longest = int(documents.lengths.max(initial=0))
    if longest > length + 1:
        raise ValueError(f"length: {length} targets hold documents of up to {length + 1} "
                         f"tokens, the longest has {longest}")
    position = np.arange(length + 1)
    inside = position < documents.lengths[:, None]
    tokens = np.zeros((len(documents), length + 1), np.int32)
    tokens[inside] = documents.tokens
    return {"tokens": tokens, "target_mask": inside[:, 1:].astype(np.float32)}
