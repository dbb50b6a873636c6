"""Documents of variable length from a mixture of Markov chains: a corpus whose loss means
something and whose context matters (the data of the P75 benchmark).

Each document follows one of ``num_chains`` random first-order Markov chains over the
vocabulary, chosen uniformly per document; its first token is uniform. Transition rows are
drawn from a Dirichlet with a small ``concentration``, so they are sparse and differ between
chains: a bigram model of the mixture predicts the next token only roughly, and a model that
infers the document's chain from what it has read so far does much better, more so the
longer the prefix. :func:`bayes_loss` is the best loss any model can reach.

References:
    P75 Dataset Decomposition, "Dataset Decomposition: Faster LLM Training with Variable
    Sequence Length Curriculum" (its data: documents of many lengths).
"""

from __future__ import annotations

import numpy as np


def markov_chains(*, vocab_size: int, num_chains: int, concentration: float,
                  seed: int | np.random.SeedSequence) -> np.ndarray:
    """Transition matrices, rows drawn from Dirichlet(concentration).

    Returns:
        float64 [num_chains, vocab_size, vocab_size], each row summing to 1.

    Raises:
        ValueError: a count < 1 (vocab_size < 2) or concentration <= 0.

    >>> p = markov_chains(vocab_size=4, num_chains=2, concentration=0.5, seed=0)
    >>> p.shape, bool(np.allclose(p.sum(-1), 1))
    ((2, 4, 4), True)
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size: expected >= 2, got {vocab_size}")
    if num_chains < 1:
        raise ValueError(f"num_chains: expected >= 1, got {num_chains}")
    if not concentration > 0:
        raise ValueError(f"concentration: expected > 0, got {concentration}")
    rng = np.random.default_rng(seed)
    # Gamma draws normalised = Dirichlet; a floor keeps every transition possible (finite loss).
    rows = rng.gamma(concentration, size=(num_chains, vocab_size, vocab_size)) + 1e-6
    return rows / rows.sum(-1, keepdims=True)


def log_uniform_lengths(*, num_documents: int, min_length: int, max_length: int,
                        seed: int | np.random.SeedSequence) -> np.ndarray:
    """Document lengths with log(length) uniform on [log min_length, log max_length].

    Returns:
        int64 [num_documents] in [min_length, max_length].

    Raises:
        ValueError: num_documents < 0, min_length < 1 or max_length < min_length.

    >>> log_uniform_lengths(num_documents=3, min_length=32, max_length=2048, seed=0).tolist()
    [452, 98, 37]
    """
    if num_documents < 0:
        raise ValueError(f"num_documents: expected >= 0, got {num_documents}")
    if min_length < 1 or max_length < min_length:
        raise ValueError(f"min_length, max_length: expected 1 <= min_length <= max_length, "
                         f"got {min_length}, {max_length}")
    rng = np.random.default_rng(seed)
    logs = rng.uniform(np.log(min_length), np.log(max_length + 1), num_documents)
    return np.clip(np.exp(logs).astype(np.int64), min_length, max_length)


def sample_documents(chains: np.ndarray, lengths: np.ndarray, *,
                     seed: int | np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    """One document per length, each from a uniformly chosen chain.

    Args:
        chains: float [K, V, V] transition matrices (:func:`markov_chains`).
        lengths: int [D] tokens per document (>= 0).

    Returns:
        (tokens, chain): tokens int32 [sum(lengths)], the documents one after another;
        chain int64 [D], the chain of each document.

    Raises:
        ValueError: chains not [K, V, V] or a negative length.

    >>> p = markov_chains(vocab_size=5, num_chains=2, concentration=0.5, seed=0)
    >>> tokens, chain = sample_documents(p, np.array([3, 0, 4]), seed=1)
    >>> tokens.shape, chain.shape, int(tokens.max()) < 5
    ((7,), (3,), True)
    """
    chains = np.asarray(chains)
    if chains.ndim != 3 or chains.shape[1] != chains.shape[2]:
        raise ValueError(f"chains: expected [K, V, V], got {chains.shape}")
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1 or (lengths < 0).any():
        raise ValueError(f"lengths: expected non-negative [D], got {lengths.shape} with "
                         f"minimum {lengths.min(initial=0)}")
    num_chains, vocab, _ = chains.shape
    rng = np.random.default_rng(seed)
    chain = rng.integers(0, num_chains, len(lengths))
    cumulative = np.cumsum(chains, -1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = np.zeros(int(lengths.sum()), np.int32)
    # Longest first: the documents still going at position t are a prefix of this order.
    order = np.argsort(-lengths, kind="stable")
    ends = lengths[order]
    previous = np.zeros(0, np.int64)
    for t in range(int(lengths.max(initial=0))):
        alive = int(np.searchsorted(-ends, -t, side="left"))  # ends > t
        docs = order[:alive]
        if t == 0:
            current = rng.integers(0, vocab, alive)
        else:
            table = cumulative[chain[docs], previous[:alive]]
            current = np.minimum((table < rng.random(alive)[:, None]).sum(-1), vocab - 1)
        tokens[starts[docs] + t] = current
        previous = current
    return tokens, chain


def bayes_loss(chains: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> float:
    """The best mean next-token loss (nats) on documents of the mixture: each token after a
    document's first predicted by the posterior over chains given the document so far,
    p(x_t | x_<t) = sum_k p(k | x_<t) P_k[x_{t-1}, x_t].

    Args:
        chains: float [K, V, V] (:func:`markov_chains`).
        tokens: int [sum(lengths)], lengths: int [D]: the documents one after another.

    Raises:
        ValueError: tokens and lengths disagree or no document has two tokens.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.sum() != len(tokens):
        raise ValueError(f"tokens: expected sum(lengths) = {lengths.sum()} tokens, got "
                         f"{len(tokens)}")
    if not (lengths > 1).any():
        raise ValueError("lengths: no document has a token to predict (all shorter than 2)")
    log_chains = np.log(chains)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.argsort(-lengths, kind="stable")
    ends = lengths[order]
    log_posterior = np.full((len(lengths), len(chains)), -np.log(len(chains)))
    total = 0.0
    for t in range(1, int(lengths.max())):
        docs = order[:int(np.searchsorted(-ends, -t, side="left"))]
        step = log_chains[:, tokens[starts[docs] + t - 1], tokens[starts[docs] + t]].T
        joint = log_posterior[docs] + step  # [alive, K]
        top = joint.max(-1, keepdims=True)
        log_evidence = top[:, 0] + np.log(np.exp(joint - top).sum(-1))
        total -= log_evidence.sum()
        log_posterior[docs] = joint - log_evidence[:, None]
    return total / float((lengths - 1).clip(0).sum())
