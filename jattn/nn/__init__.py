"""Flax NNX modules: parameters plus a call of the functional core, no maths of their own."""

from jattn.nn.attention import MultiHeadAttention
from jattn.nn.linear import BasedLinearAttention, LinearAttention
from jattn.nn.mixers import (
    H3,
    BaseConv,
    Hyena,
    ImplicitFilter,
    ImplicitLongConv,
    Mamba,
    ShortConv,
)
from jattn.nn.sparse import SelectionPenalty, SelectiveLookups, SparseAttention

__all__ = [
    "H3",
    "BaseConv",
    "BasedLinearAttention",
    "Hyena",
    "ImplicitFilter",
    "ImplicitLongConv",
    "LinearAttention",
    "Mamba",
    "MultiHeadAttention",
    "SelectionPenalty",
    "SelectiveLookups",
    "ShortConv",
    "SparseAttention",
]
