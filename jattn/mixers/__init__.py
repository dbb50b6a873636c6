"""Attention-free sequence mixers (Zoology, P24): pure functions of arrays."""

from jattn.mixers.conv import (
    decay_rates,
    fft_causal_conv,
    hyena_mix,
    implicit_filter,
    positional_features,
    short_causal_conv,
)
from jattn.mixers.ssm import selective_scan

__all__ = [
    "decay_rates",
    "fft_causal_conv",
    "hyena_mix",
    "implicit_filter",
    "positional_features",
    "selective_scan",
    "short_causal_conv",
]
