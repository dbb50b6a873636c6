"""Labels of the synthetic tasks: ``IGNORE`` marks a position without a target (PyTorch's
cross-entropy default), and :func:`label_positions` gathers the supervised positions of each
row so that a model computes its logits there only."""

from __future__ import annotations

import numpy as np

IGNORE = -100


def label_positions(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The supervised positions of each row, padded to the row with the most.

    Returns:
        positions [R, P] int32 (0 where padded), targets [R, P] int32, target_mask [R, P].
    """
    supervised = labels != IGNORE
    width = int(supervised.sum(1).max())
    # A stable sort puts each row's supervised positions first, in order.
    order = np.argsort(~supervised, axis=1, kind="stable")[:, :width].astype(np.int32)
    mask = np.take_along_axis(supervised, order, axis=1)
    targets = np.where(mask, np.take_along_axis(labels, order, axis=1), 0).astype(np.int32)
    return {"positions": np.where(mask, order, 0), "targets": targets,
            "target_mask": mask.astype(np.float32)}
