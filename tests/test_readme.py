"""The README's quick start runs as written."""

import re
from pathlib import Path

import numpy as np


def test_quick_start_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python quick start"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = np.asarray(namespace["out"], np.float32)
    assert out.shape == (2, 1024, 8, 64) and np.isfinite(out).all()
