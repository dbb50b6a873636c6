"""Flax NNX modules: parameters plus a call of the functional core, no maths of their own."""

from jattn.nn.applications.channel import (
    ECA,
    ChannelAttention,
    PositionAttention,
    SentenceAttentionBlock,
    SqueezeExcitation,
)
from jattn.nn.applications.cross import (
    CoAttention,
    LabelAttention,
    LatentCrossAttention,
    MultiLevelCrossAttention,
    PairEncoder,
    PerceiverResampler,
    QueryDecoder,
    QueryDecoderLayer,
    SlotAttention,
    TokenResampler,
)
from jattn.nn.applications.fusion import (
    CrossFrameAttention,
    CrossViTFusion,
    FairIdentityAttention,
    GlobalLocalCrossAttention,
    PairwiseCrossAttention,
    ReferenceAttention,
    RegionTokens,
)
from jattn.nn.applications.matching import (
    ConditionalTransportAlignment,
    FILIPLoss,
    InfoNCELoss,
    RecurrentCorrespondenceRegulator,
)
from jattn.nn.applications.pointer import (
    PointerAttention,
    PointerNetwork,
)
from jattn.nn.applications.pooling import (
    ContextQueryPooling,
    DecoupledEmbeddings,
    LatentAttentionPooling,
    LQuerySelfAttention,
    MultiLayerTrainablePooling,
    MultiQuerySelfAttention,
)
from jattn.nn.applications.structure import (
    BoxRelativeAttention,
    GraphAttention,
    RelationAwareAttention,
)
from jattn.nn.attention import MultiHeadAttention
from jattn.nn.efficient.agent import AgentAttention
from jattn.nn.efficient.bilevel import BiLevelRoutingAttention
from jattn.nn.efficient.heads import (
    AttentionShiftRouter,
    ConvRelativeAttention,
    LowRankResidualAttention,
    MixtureOfHeadsAttention,
    WingsLearners,
)
from jattn.nn.efficient.landmark import LandmarkAttention
from jattn.nn.efficient.linear import BasedLinearAttention, LinearAttention, RandomFeatureRng
from jattn.nn.efficient.local import HaloAttention, SkipWindowAttention, WindowAttention
from jattn.nn.efficient.longheads import LongHeadsAttention
from jattn.nn.efficient.neighborhood import NeighborhoodAttention
from jattn.nn.efficient.routing import RoutingAttention, RoutingCentroids
from jattn.nn.efficient.sparse import SelectionPenalty, SelectiveLookups, SparseAttention
from jattn.nn.layers import MLP, QKVProjection
from jattn.nn.mixers import (
    H3,
    BaseConv,
    Hyena,
    HyenaState,
    ImplicitFilter,
    ImplicitLongConv,
    Mamba,
    MambaState,
    RWKV4TimeMix,
    RWKVState,
    ShortConv,
    rwkv4_time_mix_init,
)
from jattn.nn.titans import (
    MACDecodeState,
    MACState,
    NeuralMemory,
    TitansLMM,
    TitansMAC,
    TitansMAG,
    TitansMAL,
    mac_mask,
)
from jattn.nn.transformer import (
    MIXERS,
    EncoderDecoder,
    TransformerBlock,
    TransformerLM,
    generate,
)

__all__ = [
    "ECA",
    "H3",
    "MIXERS",
    "MLP",
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
    "RandomFeatureRng",
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
    "SkipWindowAttention",
    "SlotAttention",
    "SparseAttention",
    "SqueezeExcitation",
    "TitansLMM",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "TokenResampler",
    "TransformerBlock",
    "TransformerLM",
    "WindowAttention",
    "WingsLearners",
    "generate",
    "mac_mask",
    "rwkv4_time_mix_init",
]
