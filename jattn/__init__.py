"""jattn: attention in JAX -- functional primitives, Flax NNX modules, Pallas kernels.

The public API; this file only re-exports.
"""

from jattn import masks, reference
from jattn.attention import dot_product_attention, implementations, register_implementation
from jattn.chunked import BlockSizes, TileSchedule, chunked_attention, tile_schedule

__version__ = "0.1.0"

__all__ = [
    "BlockSizes",
    "TileSchedule",
    "chunked_attention",
    "dot_product_attention",
    "implementations",
    "masks",
    "reference",
    "register_implementation",
    "tile_schedule",
]
