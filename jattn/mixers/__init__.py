"""Attention-free sequence mixers (Zoology, P24): pure functions of arrays."""

from jattn.mixers.conv import (
    decay_rates,
    hyena_mix,
    implicit_filter,
    long_causal_conv,
    positional_features,
    short_causal_conv,
)
from jattn.mixers.h3 import (
    DiagonalSSM,
    ShiftSSM,
    diag_ssm_kernel,
    discretize,
    h3_mix,
    h3_ssm,
    shift_ssm_kernel,
)
from jattn.mixers.ssm import selective_scan

__all__ = [
    "DiagonalSSM",
    "ShiftSSM",
    "decay_rates",
    "diag_ssm_kernel",
    "discretize",
    "h3_mix",
    "h3_ssm",
    "hyena_mix",
    "implicit_filter",
    "long_causal_conv",
    "positional_features",
    "selective_scan",
    "shift_ssm_kernel",
    "short_causal_conv",
]
