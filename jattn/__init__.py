"""jattn: attention in JAX -- functional primitives, Flax NNX modules, Pallas kernels.

The public API; this file only re-exports.
"""

from jattn import masks, reference, rf_lens
from jattn.attention import dot_product_attention, implementations, register_implementation
from jattn.chunked import BlockSizes, TileSchedule, chunked_attention, tile_schedule
from jattn.linear import LinearAttentionState, linear_attention
from jattn.sparse import topk_attention

__version__ = "0.1.0"

__all__ = [
    "BlockSizes",
    "LinearAttentionState",
    "TileSchedule",
    "chunked_attention",
    "dot_product_attention",
    "implementations",
    "linear_attention",
    "masks",
    "reference",
    "register_implementation",
    "rf_lens",
    "tile_schedule",
    "topk_attention",
]
