"""One name per idea: every public signature of the library, and every experiment flag, uses
the house's words (``is_causal``, ``top_k``, ``num_*``, ``rng`` for a PRNG key, ``form=`` or
``implementation=`` for an algorithm switch), never the synonyms they replaced."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re

import pytest

import experiments
import jattn

# parameter name -> the house's word for it
FORBIDDEN = {
    "causal": "is_causal",
    "topk": "top_k",
    "method": "form= or implementation=",
    "prng_key": "rng",
    "rng_key": "rng",
}
FORBIDDEN_PATTERN = re.compile(r"^n_[a-z]")  # n_layers, n_agents, ...: num_*


def _modules(package) -> list:
    names = [package.__name__] + [m.name for m in pkgutil.walk_packages(
        package.__path__, package.__name__ + ".")]
    return [importlib.import_module(n) for n in names]


def _public_callables(module):
    """(qualified name, callable) of what ``module`` defines and does not hide with a ``_``:
    functions, classes, and the public methods of those classes (with __init__, __call__)."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and (not attr.startswith("_") or attr in (
                        "__init__", "__call__")):
                    yield f"{module.__name__}.{name}.{attr}", member


def _bad_parameters(fn, forbidden=FORBIDDEN) -> list[str]:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    bad = []
    for p in parameters:
        if p in forbidden:
            bad.append(f"{p} (say {FORBIDDEN[p]})")
        elif FORBIDDEN_PATTERN.match(p):
            bad.append(f"{p} (say num_{p[2:]})")
    return bad


def _offenders(packages) -> list[str]:
    found = []
    for package in packages:
        for module in _modules(package):
            for name, fn in _public_callables(module):
                found += [f"{name}: {b}" for b in _bad_parameters(fn)]
    return found


def test_public_signatures_use_the_house_names():
    found = _offenders([jattn])
    assert not found, "\n".join(found)


def test_experiment_configs_and_flags_use_the_house_names():
    """Every preset field is a command-line flag, so the fields obey the same rule. (A
    benchmark's "method" is one of the mechanisms it compares, not an algorithm switch.)"""
    forbidden = {k: v for k, v in FORBIDDEN.items() if k != "method"}
    found = []
    for module in _modules(experiments):
        if module.__name__.endswith("original_zoology_step"):  # the original's own API
            continue
        for name, obj in vars(module).items():
            if dataclasses.is_dataclass(obj) and getattr(obj, "__module__", "") == (
                    module.__name__):
                found += [f"{module.__name__}.{name}.{f.name}" for f in dataclasses.fields(obj)
                          if f.name in forbidden or FORBIDDEN_PATTERN.match(f.name)]
        for name, fn in _public_callables(module):
            found += [f"{name}: {b}" for b in _bad_parameters(fn, forbidden)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("signature", [
    "def f(q, k, v, *, causal=True): ...",
    "def f(x, *, topk=2): ...",
    "def f(x, *, n_agents=4): ...",
    "def f(u, h, *, method='fft'): ...",
])
def test_the_check_catches_the_old_names(signature):
    namespace: dict = {}
    exec(signature, namespace)
    assert _bad_parameters(namespace["f"])


def test_the_check_reads_every_module():
    names = {m.__name__ for m in _modules(jattn)}
    assert {"jattn.core.attention", "jattn.efficient.linear", "jattn.nn.efficient.heads",
            "jattn.reference.efficient", "jattn.mixers.conv", "jattn.memory.titans"} <= names
