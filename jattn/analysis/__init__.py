"""Tools that look inside attention and change it (docs/analysis.md): the capture/edit
interface (``intervene``, re-exported here), circuit analysis (``circuits``: P25, P32), what
single heads do (``heads``: P41, P50, P62), token selection (``tokens``: P66, P40, P42,
P52), map losses and adversarial attention (``maps``: P03, P57, P78), attention rollout
(``rollout``) and the random-features lens (``rf_lens``)."""

from jattn.analysis.intervene import (
    ATTENTION_TENSORS,
    BLOCK_TENSORS,
    TENSORS,
    Capture,
    Edit,
    Edits,
    Intervention,
    attend,
    select,
)

__all__ = ["ATTENTION_TENSORS", "BLOCK_TENSORS", "TENSORS", "Capture", "Edit", "Edits",
           "Intervention", "attend", "select"]
