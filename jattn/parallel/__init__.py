"""Context parallelism: softmax attention over a sequence sharded along a mesh axis."""

from jattn.parallel.context import (
    STRATEGIES,
    context_parallel,
    context_parallel_attention,
    ring_work,
    zigzag_order,
)

__all__ = ["STRATEGIES", "context_parallel", "context_parallel_attention", "ring_work",
           "zigzag_order"]
