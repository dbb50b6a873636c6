"""jattn: attention in JAX -- functional primitives, Flax NNX modules, Pallas kernels.

The public API; this file only re-exports (and reports the installed version).
"""

from importlib import metadata as _metadata

from jattn import memory, parallel, reference
from jattn.analysis import rf_lens
from jattn.analysis.rollout import attention_rollout
from jattn.applications.channel import (
    channel_attention,
    conditioned_channel_attention,
    eca,
    eca_kernel_size,
    position_attention,
    squeeze_excitation,
)
from jattn.applications.cross import (
    PairInputs,
    bi_encoder_score,
    co_attention,
    concept_explanation_loss,
    cross_encoder_score,
    label_attention,
    label_logits,
    latent_cross_attention,
    multi_level_cross_attention,
    pair_inputs,
    pair_mask,
    slot_attention,
)
from jattn.applications.fusion import (
    appended_kv_attention,
    attribute_conditioned_attention,
    cls_cross_attention,
    cross_frame_attention,
    global_local_cross_attention,
    pairwise_cross_attention,
    region_pooling,
)
from jattn.applications.matching import (
    ConditionalTransport,
    FILIPSimilarity,
    IterativeCrossAttention,
    bidirectional_ranking_loss,
    conditional_transport,
    filip_loss,
    filip_similarity,
    info_nce,
    iterative_cross_attention,
    similarity_weighted_aggregation,
)
from jattn.applications.pointer import (
    additive_scores,
    greedy_pointer_decode,
    pointer_distribution,
)
from jattn.applications.pooling import (
    context_query_pooling,
    decoupled_target_attention,
    last_token_pool,
    latent_attention_pool,
    masked_mean,
    multi_layer_pool,
    window_mean,
)
from jattn.applications.structure import (
    box_pair_features,
    box_relative_attention,
    edge_type_bias,
    graph_attention,
    relation_aware_attention,
    relation_bias,
)
from jattn.core import kernels, masks, positions
from jattn.core.attention import (
    attention_weights,
    dot_product_attention,
    implementations,
    register_implementation,
)
from jattn.core.cache import KVCache, cached_attention, init_cache, write_cache
from jattn.core.chunked import BlockSizes, TileSchedule, chunked_attention, tile_schedule
from jattn.core.shapes import DTypeError
from jattn.efficient.agent import agent_attention, agent_segments, pool_agents
from jattn.efficient.bilevel import bilevel_routing_attention
from jattn.efficient.heads import (
    HeadRouting,
    mixture_of_heads_attention,
    relative_attention,
    route_heads,
)
from jattn.efficient.landmark import (
    landmark_attention,
    landmark_decode,
    mean_landmark_keys,
    num_blocks,
)
from jattn.efficient.linear import LinearAttentionState, linear_attention
from jattn.efficient.local import halo_attention, relative_position_index, window_attention
from jattn.efficient.longheads import (
    LongHeadsCache,
    init_longheads_cache,
    longheads_attention,
    longheads_decode,
)
from jattn.efficient.neighborhood import neighborhood_attention
from jattn.efficient.routing import (
    RoutingState,
    init_routing_state,
    route_to_clusters,
    routing_attention,
)
from jattn.efficient.sparse import topk_attention
from jattn.memory.titans import (
    MemoryWeights,
    NeuralMemoryParams,
    NeuralMemoryState,
    apply_memory,
    init_neural_memory,
    neural_memory,
)

__version__ = "0.1.0"

__all__ = [
    "BlockSizes",
    "ConditionalTransport",
    "DTypeError",
    "FILIPSimilarity",
    "HeadRouting",
    "IterativeCrossAttention",
    "KVCache",
    "LinearAttentionState",
    "LongHeadsCache",
    "MemoryWeights",
    "NeuralMemoryParams",
    "NeuralMemoryState",
    "PairInputs",
    "RoutingState",
    "TileSchedule",
    "additive_scores",
    "agent_attention",
    "agent_segments",
    "appended_kv_attention",
    "apply_memory",
    "attention_rollout",
    "attention_weights",
    "attribute_conditioned_attention",
    "bi_encoder_score",
    "bidirectional_ranking_loss",
    "bilevel_routing_attention",
    "box_pair_features",
    "box_relative_attention",
    "cached_attention",
    "channel_attention",
    "chunked_attention",
    "cls_cross_attention",
    "co_attention",
    "concept_explanation_loss",
    "conditional_transport",
    "conditioned_channel_attention",
    "context_query_pooling",
    "cross_encoder_score",
    "cross_frame_attention",
    "decoupled_target_attention",
    "dot_product_attention",
    "eca",
    "eca_kernel_size",
    "edge_type_bias",
    "filip_loss",
    "filip_similarity",
    "global_local_cross_attention",
    "graph_attention",
    "greedy_pointer_decode",
    "halo_attention",
    "implementations",
    "info_nce",
    "init_cache",
    "init_longheads_cache",
    "init_neural_memory",
    "init_routing_state",
    "iterative_cross_attention",
    "kernels",
    "label_attention",
    "label_logits",
    "landmark_attention",
    "landmark_decode",
    "last_token_pool",
    "latent_attention_pool",
    "latent_cross_attention",
    "linear_attention",
    "longheads_attention",
    "longheads_decode",
    "masked_mean",
    "masks",
    "mean_landmark_keys",
    "memory",
    "mixture_of_heads_attention",
    "multi_layer_pool",
    "multi_level_cross_attention",
    "neighborhood_attention",
    "neural_memory",
    "num_blocks",
    "pair_inputs",
    "pair_mask",
    "pairwise_cross_attention",
    "parallel",
    "pointer_distribution",
    "pool_agents",
    "position_attention",
    "positions",
    "reference",
    "region_pooling",
    "register_implementation",
    "relation_aware_attention",
    "relation_bias",
    "relative_attention",
    "relative_position_index",
    "rf_lens",
    "route_heads",
    "route_to_clusters",
    "routing_attention",
    "similarity_weighted_aggregation",
    "slot_attention",
    "squeeze_excitation",
    "tile_schedule",
    "topk_attention",
    "window_attention",
    "window_mean",
    "write_cache",
]

try:
    __version__ = _metadata.version("jattn")  # one source: pyproject.toml
except _metadata.PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"
