"""Sphinx configuration of the jattn site: ``python -m sphinx -W --keep-going -b html docs
docs/_build/html`` (no network needed). The API pages, the notebook pages, the CLI page and the
mask gallery are generated at build time by ``docs/_ext/jattn_site.py``."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import jattn

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "jattn"
author = "the jattn authors"
copyright = "2026, the jattn authors"
release = version = jattn.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "jattn_site",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
nitpicky = True
# Types from other projects: no inventories offline, so their names are not links.
nitpick_ignore_regex = [
    (r"py:.*", r"(.*\.)?_\w+"),  # private names have no page
    (r"py:.*", r"(jax|jaxlib|numpy|np|jnp|flax|nnx|optax|chex|orbax|matplotlib|typing|"
               r"collections|dataclasses|enum|pathlib|collections\.abc|types)(\..*)?"),
    (r"py:class", r"(int|float|bool|str|bytes|tuple|list|dict|set|object|type|callable|"
                  r"Callable|Sequence|Mapping|Iterable|Iterator|Any|None|NoneType|"
                  r"Array|ArrayLike|PRNGKey|DTypeLike|Path|Shape|ellipsis|function)"),
]

# autodoc: the signature from the code, type hints in the description, members of classes
# that say something.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "special-members": "__call__"}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# MathJax 3 (SVG output: no web fonts) from the sphinx-mathjax-offline wheel: the site loads
# nothing from the network.
html_static_path = ["_static", str(Path(importlib.util.find_spec("sphinx-mathjax-offline").origin)
                                   .parent / "static")]
mathjax_path = "mathjax/tex-svg.js"

# myst-nb: the notebooks run at build time in their smoke setting (seconds each); a cell that
# raises fails the build. The committed notebooks carry the outputs of their quick setting.
os.environ["JATTN_NOTEBOOK_SMOKE"] = "1"
os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_in_temp = True
nb_ipywidgets_js = {}
myst_heading_anchors = 3

html_theme = "sphinx_book_theme"
html_favicon = "_static/favicon.svg"
html_context = {"default_mode": "light"}
html_title = f"jattn {version}"
html_theme_options = {
    "show_toc_level": 2,
    # The sidebar shows the branch of the current page only: rendering the whole tree on each
    # of ~100 pages took a third of the build.
    "collapse_navbar": True,
    "max_navbar_depth": 3,
    "navigation_with_keys": False,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_last_updated_fmt = None
