"""The generated part of the site, written into the source tree when the build starts.

* ``api/``: one page per module of ``jattn`` and ``pallas_kernels``, grouped by family as the
  package is, documenting each public name once, under the shortest path a user imports it
  from (``jattn.linear_attention`` rather than ``jattn.efficient.linear.linear_attention``);
  ``api/experiments``: the command lines of the experiments, with their ``--help``.
* ``notebooks/``: the Colab notebooks, copied from ``colab/`` (myst-nb runs them).
* ``gallery/``: the mask gallery (``mask_gallery.py``).

A public function or class without a docstring, or public data without a ``#:`` comment, is a
warning, so ``-W`` fails the build; a reference by any import path of a public object links
to its documentation.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import pkgutil
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from mask_gallery import write_gallery
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

import jattn
import pallas_kernels

LOG = logging.getLogger(__name__)
DOCUMENTED: dict[int, str] = {}  # id(object) -> documented path, filled by write_api
REPO = Path(__file__).resolve().parents[2]

# Namespaces a user imports from, most preferred first: an object is documented under the
# first one that exports it, else under the module that defines it.
NAMESPACES = ("jattn", "jattn.masks", "jattn.nn", "jattn.analysis", "jattn.memory",
              "jattn.mixers", "jattn.parallel", "jattn.reference")
# Modules reachable under a shorter name than their file's.
ALIASES = {"jattn.core.masks": "jattn.masks"}

FAMILIES = {
    "core": ("Softmax attention and its core",
             "dot_product_attention and its implementations, the mask algebra, the chunked "
             "path, the KV cache, positions, score modifiers, shapes."),
    "efficient": ("Efficient attention",
                  "Linear, local, neighbourhood, sparse, landmark, routing, bi-level routing, "
                  "LongHeads, agent and mixture-of-heads attention."),
    "applications": ("Applications",
                     "Cross attention and fusion, matching, pooling, pointers, structure and "
                     "channel attention."),
    "memory": ("Titans memory", "Neural memory that learns at test time."),
    "mixers": ("Attention-free mixers", "The Zoology sequence mixers."),
    "analysis": ("Analysis", "Look inside attention and change it."),
    "parallel": ("Parallelism", "Context parallelism over a mesh axis."),
    "reference": ("References", "Float64-capable ground truth that the tests compare against."),
    "nn": ("Flax NNX modules (jattn.nn)", "Parameters plus a call of the functional core."),
    "pallas_kernels": ("Pallas kernels (pallas_kernels)",
                       "Flash attention for GPUs and TPUs, and the Lightning kernel."),
}

def public_names(module: ModuleType) -> list[str]:
    """``__all__`` where the module has one (less its submodules, which have pages of their
    own), else the functions and classes it defines."""
    if hasattr(module, "__all__"):
        return [name for name in module.__all__ if not inspect.ismodule(getattr(module, name))]
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module.__name__]


def modules() -> Iterator[ModuleType]:
    """Every module of jattn and pallas_kernels, packages first, in file order."""
    for package in (jattn, pallas_kernels):
        yield package
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            yield importlib.import_module(info.name)


def defined_in(obj: object, name: str) -> str:
    """The module that defines ``obj``: a function's or class's ``__module__``; for data (whose
    ``#:`` comment autodoc reads from that module's source), the deepest module binding it."""
    if callable(obj):
        return obj.__module__
    binding = [m.__name__ for m in modules() if vars(m).get(name) is obj]
    return max(binding, key=lambda module_name: module_name.count("."))


def public_paths() -> dict[int, str]:
    """id(object) -> the dotted path it is documented under: its name in the first namespace
    that exports it (data: in the module defining it), else in the module defining it."""
    paths: dict[int, str] = {}
    for namespace in NAMESPACES:
        module = jattn.masks if namespace == "jattn.masks" else importlib.import_module(namespace)
        for name in public_names(module):
            obj = getattr(module, name)
            prefix = namespace if callable(obj) else defined_in(obj, name)
            paths.setdefault(id(obj), f"{prefix}.{name}")
    for module in modules():
        prefix = ALIASES.get(module.__name__, module.__name__)
        for name in public_names(module):
            paths.setdefault(id(getattr(module, name)), f"{prefix}.{name}")
    return paths


def _family(module_name: str) -> str:
    parts = module_name.split(".")
    return parts[0] if parts[0] != "jattn" or len(parts) == 1 else parts[1]


def _directive(obj: object) -> str:
    if inspect.isclass(obj):
        return "autoclass"
    return "autofunction" if callable(obj) else "autodata"


def _heading(text: str, underline: str) -> str:
    return f"{text}\n{underline * len(text)}\n"


def _page_name(module_name: str) -> str:
    return ALIASES.get(module_name, module_name)


def _summary(paths: list[str]) -> list[str]:
    """autosummary tables of ``paths``, each name relative to its namespace."""
    lines: list[str] = []
    namespace = None
    for path in paths:
        prefix, name = path.rsplit(".", 1)
        if prefix != namespace:
            namespace = prefix
            lines += [f".. currentmodule:: {prefix}", "", ".. autosummary::", "   :nosignatures:",
                      ""]
        lines.append(f"   {name}")
    return [*lines, ""]


def _module_page(module: ModuleType, objects: list[tuple[str, object]],
                 children: list[str]) -> str:
    title = _page_name(module.__name__)
    lines = [_heading(title, "="), f".. automodule:: {module.__name__}", "   :no-members:", ""]
    if title != module.__name__:
        lines += [f"Defined in ``{module.__name__}``.", ""]
    exported = [name for name in getattr(module, "__all__", ())
                if not inspect.ismodule(getattr(module, name))]
    if exported and not objects:  # a namespace: what it exports, documented where defined
        documented = [DOCUMENTED[id(getattr(module, name))] for name in exported]
        lines += ["Exports:", "", *_summary(documented)]
    if children:
        lines += [".. toctree::", "   :maxdepth: 1", ""]
        lines += [f"   {child}" for child in children] + [""]
    if objects:
        lines += _summary([path for path, _ in objects])
        for path, obj in objects:
            lines += [f".. {_directive(obj)}:: {path}"]
            if _directive(obj) == "autodata":
                _check_data_comment(module.__name__, path.rsplit(".", 1)[1])
                lines += ["   :no-value:"]
            lines += [""]
    return "\n".join(lines)


def _check_data_comment(module_name: str, name: str) -> None:
    """Public data is documented by a ``#:`` comment above its assignment; warn without one."""
    if ("", name) not in ModuleAnalyzer.for_module(module_name).find_attr_docs():
        LOG.warning("public data %s.%s has no #: comment", module_name, name, type="jattn",
                    subtype="docstring")


def write_api(outdir: Path) -> None:
    """api/<module>.rst for every module, and api/index.rst grouping them by family."""
    global DOCUMENTED
    paths = public_paths()
    DOCUMENTED = dict(paths)
    all_modules = list(modules())
    objects: dict[str, list[tuple[str, object]]] = {m.__name__: [] for m in all_modules}
    for module in all_modules:
        for name in public_names(module):
            obj = getattr(module, name)
            if id(obj) in paths:
                objects.setdefault(defined_in(obj, name), []).append((paths.pop(id(obj)), obj))
    if paths:  # an object whose defining module has no public name list of its own
        raise RuntimeError(f"public objects without a page: {sorted(paths.values())}")
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    for module in all_modules:
        children = [_page_name(m.__name__) for m in all_modules
                    if m.__name__.rsplit(".", 1)[0] == module.__name__ and "." in m.__name__]
        (outdir / f"{_page_name(module.__name__)}.rst").write_text(
            _module_page(module, objects[module.__name__], children))
    index = [_heading("API reference", "="),
             "Every public name of ``jattn``, ``jattn.nn``, ``jattn.masks``, ``jattn.analysis``"
             " and ``pallas_kernels``, one page per module, grouped by family as the package "
             "is. A name is documented once, under the shortest path it is imported from; "
             "the :ref:`genindex` lists them all.", "", _heading("jattn", "-"),
             "The top-level namespace: what ``import jattn`` gives.", "", ".. toctree::",
             "   :maxdepth: 1", "", "   jattn", ""]
    for family, (title, blurb) in FAMILIES.items():
        index += [_heading(title, "-"), blurb, "", ".. toctree::", "   :maxdepth: 1", ""]
        index += [f"   {_page_name(m.__name__)}" for m in all_modules
                  if _family(m.__name__) == family and m.__name__.count(".") <= 1] + [""]
    index += [_heading("Experiments", "-"), "The command lines that reproduce the papers and "
              "run the benchmarks.", "", ".. toctree::", "   :maxdepth: 1", "",
              "   experiments", ""]
    (outdir / "index.rst").write_text("\n".join(index))
    (outdir / "experiments.rst").write_text(_entry_points_page())


def documented_path(dotted: str) -> str | None:
    """The documented path of the object ``dotted`` names (any import path of a public object,
    or of an attribute of one), or None."""
    try:
        pkgutil.resolve_name(dotted)
    except (ImportError, AttributeError, ValueError):
        return None  # no such object
    parts = dotted.split(".")
    for size in range(len(parts), 1, -1):  # every prefix of an existing name resolves
        obj = pkgutil.resolve_name(".".join(parts[:size]))
        if id(obj) in DOCUMENTED:
            return ".".join([DOCUMENTED[id(obj)], *parts[size:]])
    return None


def entry_points() -> list[str]:
    """The experiments' command lines: every module of ``experiments`` that runs as a script,
    named as ``python -m`` takes it (a package for its ``__main__``)."""
    import experiments

    found = []
    for info in pkgutil.walk_packages(experiments.__path__, "experiments."):
        source = Path(importlib.util.find_spec(info.name).origin).read_text()
        if 'if __name__ == "__main__":' in source:
            found.append(info.name.removesuffix(".__main__"))
    return sorted(found, key=lambda entry: (entry.count("."), entry))  # experiments first


def _help_text(entry: str, module: ModuleType) -> str:
    """What ``python -m entry --help`` prints, run in this process (empty for a command line
    that takes no arguments)."""
    if not inspect.signature(module.main).parameters:
        return ""
    output = io.StringIO()
    argv = sys.argv
    sys.argv = [f"python -m {entry}"]  # argparse's program name
    try:
        with (contextlib.redirect_stdout(output), contextlib.redirect_stderr(output),
              contextlib.suppress(SystemExit)):
            module.main(["--help"])
    finally:
        sys.argv = argv
    return output.getvalue()


def _entry_points_page() -> str:
    lines = [_heading("Experiments: command lines", "="),
             "Each runs with ``python -m <module>``; presets and fields as each help says.", ""]
    for entry in entry_points():
        module = importlib.import_module(entry)
        if hasattr(module, "__path__"):
            module = importlib.import_module(entry + ".__main__")
        lines += [_heading(f"python -m {entry}", "-"), f".. automodule:: {module.__name__}",
                  "   :no-members:", ""]
        text = _help_text(entry, module)
        if text:
            lines += [".. code-block:: text", ""]
            lines += [f"   {line}".rstrip() for line in text.splitlines()] + [""]
    return "\n".join(lines)


def copy_notebooks(outdir: Path) -> None:
    """docs/notebooks/<name>.ipynb from colab/ (the committed copies carry quick outputs)."""
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir()
    for notebook in sorted((REPO / "colab").glob("*.ipynb")):
        shutil.copy(notebook, outdir / notebook.name)


def _generate(app: Sphinx) -> None:
    source = Path(app.srcdir)
    write_api(source / "api")
    copy_notebooks(source / "notebooks")
    write_gallery(source / "gallery")


def _check_docstring(app: Sphinx, what: str, name: str, obj: object, options: dict,
                     lines: list[str]) -> None:
    if what in ("function", "class") and not any(line.strip() for line in lines):
        LOG.warning("public %s %s has no docstring", what, name, type="jattn",
                    subtype="docstring")


def _resolve(app: Sphinx, env, node, contnode):
    """A Python reference by any import path of a public object links to its documentation."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [f"{module}.{cls}.{target}" if module and cls else None,
                  f"{module}.{target}" if module else None, target]
    for candidate in filter(None, candidates):
        path = documented_path(candidate)
        if path is not None:
            return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, "obj",
                                                     path, node, contnode)
    return None


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", _generate)
    app.connect("missing-reference", _resolve)
    app.connect("autodoc-process-docstring", _check_docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
