"""Attention-free sequence mixers (Zoology, P24): pure functions of arrays."""

from jattn.mixers.conv import (
    causal_conv_step,
    conv_history,
    decay_rates,
    hyena_mix,
    implicit_filter,
    long_causal_conv,
    positional_features,
    short_causal_conv,
)
from jattn.mixers.h3 import (
    DiagonalSSM,
    H3State,
    ShiftSSM,
    diag_ssm_kernel,
    discretize,
    h3_mix,
    h3_prefill,
    h3_ssm,
    h3_step,
    shift_ssm_kernel,
)
from jattn.mixers.rwkv import (
    WKVState,
    empty_wkv_state,
    token_shift,
    wkv,
)
from jattn.mixers.ssm import selective_scan

__all__ = [
    "DiagonalSSM",
    "H3State",
    "ShiftSSM",
    "WKVState",
    "causal_conv_step",
    "conv_history",
    "decay_rates",
    "diag_ssm_kernel",
    "discretize",
    "empty_wkv_state",
    "h3_mix",
    "h3_prefill",
    "h3_ssm",
    "h3_step",
    "hyena_mix",
    "implicit_filter",
    "long_causal_conv",
    "positional_features",
    "selective_scan",
    "shift_ssm_kernel",
    "short_causal_conv",
    "token_shift",
    "wkv",
]
