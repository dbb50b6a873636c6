"""Flax NNX modules: parameters plus a call of the functional core, no maths of their own."""

from jattn.nn.agent import AgentAttention
from jattn.nn.attention import MultiHeadAttention
from jattn.nn.bilevel import BiLevelRoutingAttention
from jattn.nn.channel import (
    ECA,
    ChannelAttention,
    PositionAttention,
    SentenceAttentionBlock,
    SqueezeExcitation,
)
from jattn.nn.cross import (
    CoAttention,
    LabelAttention,
    LatentCrossAttention,
    MultiLevelCrossAttention,
    PairEncoder,
    PerceiverResampler,
    QueryDecoder,
    QueryDecoderLayer,
)
from jattn.nn.fusion import (
    CrossFrameAttention,
    CrossViTFusion,
    FairIdentityAttention,
    GlobalLocalCrossAttention,
    PairwiseCrossAttention,
    ReferenceAttention,
    RegionTokens,
)
from jattn.nn.heads import (
    AttentionShiftRouter,
    ConvRelativeAttention,
    LowRankResidualAttention,
    MixtureOfHeadsAttention,
    QKVProjection,
    WingsLearners,
)
from jattn.nn.landmark import LandmarkAttention
from jattn.nn.linear import BasedLinearAttention, LinearAttention, RandomFeatureKey
from jattn.nn.local import HaloAttention, WindowAttention
from jattn.nn.longheads import LongHeadsAttention
from jattn.nn.matching import (
    ConditionalTransportAlignment,
    FILIPLoss,
    InfoNCELoss,
    RecurrentCorrespondenceRegulator,
)
from jattn.nn.mixers import (
    H3,
    BaseConv,
    Hyena,
    HyenaState,
    ImplicitFilter,
    ImplicitLongConv,
    Mamba,
    MambaState,
    ShortConv,
)
from jattn.nn.neighborhood import NeighborhoodAttention
from jattn.nn.pointer import (
    PointerAttention,
    PointerNetwork,
)
from jattn.nn.pooling import (
    ContextQueryPooling,
    DecoupledEmbeddings,
    LatentAttentionPooling,
    LQuerySelfAttention,
    MultiLayerTrainablePooling,
    MultiQuerySelfAttention,
)
from jattn.nn.routing import RoutingAttention, RoutingCentroids
from jattn.nn.rwkv import (
    RWKV4TimeMix,
    RWKVState,
    rwkv4_time_mix_init,
)
from jattn.nn.sparse import SelectionPenalty, SelectiveLookups, SparseAttention
from jattn.nn.structure import (
    BoxRelativeAttention,
    GraphAttention,
    RelationAwareAttention,
)
from jattn.nn.titans import (
    TITANS_MIXERS,
    MACDecodeState,
    MACState,
    NeuralMemory,
    TitansLMM,
    TitansMAC,
    TitansMAG,
    TitansMAL,
    mac_mask,
)
from jattn.nn.transformer import EncoderDecoder, TransformerBlock, TransformerLM, generate

__all__ = [
    "ECA",
    "H3",
    "TITANS_MIXERS",
    "AgentAttention",
    "AttentionShiftRouter",
    "BaseConv",
    "BasedLinearAttention",
    "BiLevelRoutingAttention",
    "BoxRelativeAttention",
    "ChannelAttention",
    "CoAttention",
    "ConditionalTransportAlignment",
    "ContextQueryPooling",
    "ConvRelativeAttention",
    "CrossFrameAttention",
    "CrossViTFusion",
    "DecoupledEmbeddings",
    "EncoderDecoder",
    "FILIPLoss",
    "FairIdentityAttention",
    "GlobalLocalCrossAttention",
    "GraphAttention",
    "HaloAttention",
    "Hyena",
    "HyenaState",
    "ImplicitFilter",
    "ImplicitLongConv",
    "InfoNCELoss",
    "LQuerySelfAttention",
    "LabelAttention",
    "LandmarkAttention",
    "LatentAttentionPooling",
    "LatentCrossAttention",
    "LinearAttention",
    "LongHeadsAttention",
    "LowRankResidualAttention",
    "MACDecodeState",
    "MACState",
    "Mamba",
    "MambaState",
    "MixtureOfHeadsAttention",
    "MultiHeadAttention",
    "MultiLayerTrainablePooling",
    "MultiLevelCrossAttention",
    "MultiQuerySelfAttention",
    "NeighborhoodAttention",
    "NeuralMemory",
    "PairEncoder",
    "PairwiseCrossAttention",
    "PerceiverResampler",
    "PointerAttention",
    "PointerNetwork",
    "PositionAttention",
    "QKVProjection",
    "QueryDecoder",
    "QueryDecoderLayer",
    "RWKV4TimeMix",
    "RWKVState",
    "RandomFeatureKey",
    "RecurrentCorrespondenceRegulator",
    "ReferenceAttention",
    "RegionTokens",
    "RelationAwareAttention",
    "RoutingAttention",
    "RoutingCentroids",
    "SelectionPenalty",
    "SelectiveLookups",
    "SentenceAttentionBlock",
    "ShortConv",
    "SparseAttention",
    "SqueezeExcitation",
    "TitansLMM",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "TransformerBlock",
    "TransformerLM",
    "WindowAttention",
    "WingsLearners",
    "generate",
    "mac_mask",
    "rwkv4_time_mix_init",
]
