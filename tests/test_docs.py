"""The documentation is true: the README's quick start and every ```python block in docs/*.md
run as written, and every path, link and dotted name the docs give exists.

The docs pages run in order, one namespace per section (a "## " heading), so the sections of
a long page run in parallel.
"""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
FEATURES = ROOT / "docs" / "features.md"


def test_quick_start_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python quick start"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = np.asarray(namespace["out"], np.float32)
    assert out.shape == (2, 1024, 8, 64) and np.isfinite(out).all()


def _sections():
    for page in PAGES:
        parts = re.split(r"^## ", page.read_text(), flags=re.M)
        for i, part in enumerate(parts):
            blocks = re.findall(r"```python\n(.*?)```", part, re.S)
            if blocks:
                title = part.splitlines()[0][:40] if i else "top"
                yield pytest.param(page, blocks, id=f"{page.name}:{title}")


@pytest.mark.parametrize("page,blocks", list(_sections()))
def test_examples_run(page, blocks):
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(page), "exec"), namespace)
    finally:
        jax.config.update("jax_enable_x64", False)  # an example may turn it on globally


# --------------------------------------------------------------------------------------------
# Paths, links and names

PATH = re.compile(r"(?<![\w./-])((?:tests|experiments|jattn|pallas_kernels|docs|colab|results)"
                  r"/[\w./-]*\w)(::[\w*]+)?")
DOTTED = re.compile(r"`((?:jattn|experiments|pallas_kernels)(?:\.\w+)+)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _missing_path(base: Path, path: str, test: str | None) -> str | None:
    target = base / path
    if not target.exists():
        return f"{path}: no such file"
    if test:
        pattern = re.escape(test.lstrip(":")).replace(r"\*", r"\w*")
        if not re.search(rf"^def {pattern}\b", target.read_text(), re.M):
            return f"{path}{test}: no such test"
    return None


def _missing_name(dotted: str) -> str | None:
    try:
        pkgutil.resolve_name(dotted)
    except (ImportError, AttributeError) as error:
        return f"{dotted}: {error}"
    return None


def test_features_paths_and_names_exist():
    text = FEATURES.read_text()
    problems = [_missing_path(ROOT, path, test) for path, test in PATH.findall(text)]
    problems += [_missing_name(name) for name in DOTTED.findall(text)]
    assert [p for p in problems if p] == []


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_links_and_paths_of_every_page_exist(page):
    text = page.read_text()
    problems = [f"link {link}: no such file" for link in LINK.findall(text)
                if "://" not in link and not (page.parent / link).exists()]
    problems += [_missing_path(ROOT, path, test) for path, test in PATH.findall(text)
                 if not path.startswith(("results/", "docs/_build/"))]  # outputs, not sources
    assert [p for p in problems if p] == []


def test_the_checks_catch_a_stale_path_and_name():
    assert _missing_path(ROOT, "tests/core/test_nothing.py", None)
    assert _missing_path(ROOT, "tests/core/test_masks.py", "::test_no_such_test")
    assert _missing_path(ROOT, "tests/core/test_masks.py", None) is None
    assert _missing_name("jattn.no_such_function")
    assert _missing_name("jattn.masks.causal") is None
