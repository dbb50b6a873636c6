"""House rules that code review forgets: the direction of imports, read from every file.

experiments -> jattn.nn -> jattn (functional) -> pallas_kernels -> jax. Within the functional
library, jattn.core is the base that every family builds on and imports no family; the
references import only the masks and shape letters of the core (a reference shares no code
with what it checks); flax is for jattn.nn and experiments only; nothing imports the tests.
Each file's imports are parsed (ast), including those inside functions, so a rule holds for
every line of code, not only for what one import happens to load.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("jattn", "pallas_kernels", "experiments", "tests")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module ``source`` (the text of ``module``) imports; ``from a
    import b`` gives a.b too, since b may be a module."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def _files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _rule_breaks(module: str, imported: str) -> str | None:
    """Why ``module`` may not import ``imported`` (None when it may)."""
    top = imported.split(".")[0]
    if top == "tests" and not _within(module, "tests"):
        return "nothing outside the tests imports a test"
    if top == "experiments" and not (_within(module, "experiments") or _within(module, "tests")):
        return "only experiments and tests import experiments"
    if _within(module, "pallas_kernels") and top in ("jattn", "flax", "experiments"):
        return "pallas_kernels imports jax only"
    if _within(module, "jattn") and not _within(module, "jattn.nn"):
        if top == "flax" or _within(imported, "jattn.nn"):
            return "the functional library imports neither flax nor jattn.nn"
    if _within(module, "jattn.core") and _within(imported, "jattn") and not (
            _within(imported, "jattn.core") or imported == "jattn"):
        return "jattn.core imports no family of the library"
    if _within(module, "jattn.reference") and _within(imported, "jattn") and not any(
            _within(imported, allowed) for allowed in
            ("jattn.reference", "jattn.core.masks", "jattn.core.shapes")):
        return "a reference imports only jattn.core.masks and jattn.core.shapes"
    if _within(module, "jattn.reference") and imported in ("jattn", "jattn.core"):
        return "a reference imports only jattn.core.masks and jattn.core.shapes"
    return None


def _violations() -> list[str]:
    found = []
    for path in _files():
        module = _module_name(path)
        for imported in sorted(_imports(path.read_text(), module, path.name == "__init__.py")):
            why = _rule_breaks(module, imported)
            if why:
                found.append(f"{path.relative_to(ROOT)} imports {imported}: {why}")
    return found


def test_every_file_imports_in_the_house_direction():
    assert _violations() == []


@pytest.mark.parametrize("module,imported", [
    ("jattn.core.attention", "jattn.efficient.linear"),
    ("jattn.efficient.linear", "flax.nnx"),
    ("jattn.applications.cross", "jattn.nn.layers"),
    ("jattn.reference.core", "jattn.core.attention"),
    ("jattn.reference.applications", "jattn.applications.matching"),
    ("jattn.reference.core", "jattn"),
    ("pallas_kernels.flash.gpu", "jattn.core.masks"),
    ("jattn.nn.attention", "experiments.common.trainer"),
    ("experiments.zoology.run", "tests.conftest"),
])
def test_the_rules_catch_a_wrong_direction(module, imported):
    assert _rule_breaks(module, imported) is not None


@pytest.mark.parametrize("module,imported", [
    ("experiments.zoology.model", "jattn.nn.mixers"),
    ("jattn.nn.attention", "jattn.core.positions"),
    ("jattn.efficient.linear", "jattn.core.shapes"),
    ("jattn.core.kernels", "pallas_kernels.flash.gpu"),
    ("jattn.reference.efficient", "jattn.reference.core"),
    ("jattn.reference.core", "jattn.core.masks"),
    ("tests.core.test_attention", "tests.conftest"),
])
def test_the_rules_allow_the_house_direction(module, imported):
    assert _rule_breaks(module, imported) is None


def test_imports_are_read_from_every_line_and_resolved():
    """A function-level import counts, and relative imports resolve against the package."""
    source = ("import jax\n"
              "def f():\n    from jattn.nn import MultiHeadAttention\n"
              "from . import masks\nfrom ..efficient.linear import linear_attention\n")
    names = _imports(source, "jattn.core.attention")
    assert {"jax", "jattn.nn", "jattn.nn.MultiHeadAttention", "jattn.core.masks",
            "jattn.efficient.linear"} <= names
    assert _imports("from . import attention\n", "jattn.core", is_package=True) >= {
        "jattn.core.attention"}
    assert _rule_breaks("jattn.core.attention", "jattn.nn") is not None


def test_every_python_file_is_read():
    files = {str(p.relative_to(ROOT)) for p in _files()}
    assert {"jattn/core/masks.py", "pallas_kernels/flash/gpu.py", "experiments/tasks/mqar.py",
            "tests/conftest.py", "jattn/reference/__init__.py"} <= files
