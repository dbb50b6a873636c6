"""Flax NNX modules: parameters plus a call of the functional core, no maths of their own."""

from jattn.nn.mixers import (
    BaseConv,
    Hyena,
    ImplicitFilter,
    ImplicitLongConv,
    Mamba,
    ShortConv,
)

__all__ = ["BaseConv", "Hyena", "ImplicitFilter", "ImplicitLongConv", "Mamba", "ShortConv"]
