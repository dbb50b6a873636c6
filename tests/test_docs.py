"""Every ```python block in docs/*.md runs as written (in order, one namespace per page)."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

PAGES = sorted((Path(__file__).parent.parent / "docs").glob("*.md"))
PAGES = [p for p in PAGES if "```python" in p.read_text()]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page):
    namespace: dict = {}
    try:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            exec(compile(block, str(page), "exec"), namespace)
    finally:
        jax.config.update("jax_enable_x64", False)  # an example may turn it on globally
