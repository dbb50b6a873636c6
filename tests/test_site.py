"""The documentation site builds with no warning, every page loads in headless Chromium without
a console error or a broken internal link, and its index lists every public name."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import jattn
import pallas_kernels
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "docs" / "_ext"))
from check_site import CHROMIUM, check_site

NAMESPACES = ("jattn", "jattn.nn", "jattn.analysis", "jattn.memory", "jattn.mixers",
              "jattn.parallel", "jattn.reference")


def _public(module) -> dict[str, object]:
    if hasattr(module, "__all__"):
        names = module.__all__
    else:
        names = [n for n, o in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(o) or inspect.isclass(o))
                 and o.__module__ == module.__name__]
    return {f"{module.__name__}.{n}": getattr(module, n) for n in names
            if not inspect.ismodule(getattr(module, n))}


def public_objects() -> dict[str, object]:
    """Every public name of the namespaces and of every module of jattn and pallas_kernels."""
    found = _public(jattn.masks)
    for namespace in NAMESPACES:
        found |= _public(importlib.import_module(namespace))
    for package in (jattn, pallas_kernels):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            found |= _public(importlib.import_module(info.name))
    return found


def read_inventory(path: Path) -> dict[str, str]:
    """Python objects of a Sphinx objects.inv (format 2): dotted name -> page#anchor."""
    data = path.read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    entries = {}
    for line in zlib.decompress(data[header_end:]).decode().splitlines():
        match = re.match(r"(\S+)\s+py:(function|class|data|method)\s+-?\d+\s+(\S+)", line)
        if match:
            name, _, uri = match.groups()
            entries[name] = uri.replace("$", name) if uri.endswith("$") else uri
    return entries


def test_notebooks_are_committed_with_outputs_and_one_install_cell():
    """GitHub shows each notebook's figures (the outputs of its quick setting), and every
    notebook installs jattn with the same cell, from a wheel or checkout it can verify."""
    import nbformat

    install_cells = set()
    for path in sorted((REPO / "colab").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        install_cells.add(code[0].source)
        outputs = [output for cell in code for output in cell.get("outputs", [])]
        assert any("image/png" in output.get("data", {}) for output in outputs), path.name
        assert not [output for output in outputs if output["output_type"] == "error"]
        assert "git+https" not in code[0].source and "%pip install" in code[0].source
    assert len(install_cells) == 1


@pytest.mark.slow
def test_site_builds_loads_and_indexes_everything(tmp_path):
    site = tmp_path / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs",
         str(site)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-8000:]

    # Each notebook ran at build time and its page shows its figures.
    for notebook in sorted((REPO / "colab").glob("*.ipynb")):
        page = (site / "notebooks" / f"{notebook.stem}.html").read_text()
        assert "<img" in page, notebook.name

    # Every public object is documented: some inventory entry is that very object.
    inventory = read_inventory(site / "objects.inv")
    documented = {}
    for name, uri in inventory.items():
        try:
            documented.setdefault(id(pkgutil.resolve_name(name)), uri)
        except (ImportError, AttributeError, ValueError):
            pass
    public = public_objects()
    missing = sorted(name for name, obj in public.items() if id(obj) not in documented)
    assert not missing, missing

    if not Path(CHROMIUM).exists():
        if os.environ.get("JATTN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing (CI installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium for the browser check")
    report = check_site(site)
    assert len(report.pages) > 50
    assert not report.problems, "\n".join(report.problems[:50])
    # The general index links to every public object's documentation.
    unlisted = sorted(name for name, obj in public.items()
                      if documented[id(obj)] not in report.index_links)
    assert not unlisted, unlisted
