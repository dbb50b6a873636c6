"""Presets as frozen dataclasses, overridden field by field from the command line.

``python -m experiments.X --preset quick --seq-lens 1024,2048`` takes the ``quick`` preset and
replaces its ``seq_lens`` field. Every field of the preset dataclass becomes a flag; tuples are
comma-separated, booleans are true/false. A field that is itself a dataclass (settings nested
rather than copied, e.g. the trainer's ``TrainConfig``) gives its own fields as flags, by
their own names (``--max-epochs``), except those a preset class lists in its
``set_by_grid`` class attribute as dotted paths (values its grid sets run by run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def _parser_for(hint) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _parser_for(inner[0])
    if origin is tuple:
        item = _parser_for(args[0])
        return lambda text: tuple(item(x) for x in text.split(",") if x)
    if hint is bool:
        def parse_bool(text: str) -> bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return parse_bool
    return hint


def _flags(cls, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, type hint) of every leaf field of ``cls``, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            leaves += _flags(hint, (*prefix, field.name))
        else:
            leaves.append(((*prefix, field.name), hint))
    return leaves


def _get(config, path: tuple[str, ...]):
    for name in path:
        config = getattr(config, name)
    return config


def _replace(config, path: tuple[str, ...], value):
    if len(path) == 1:
        return dataclasses.replace(config, **{path[0]: value})
    inner = getattr(config, path[0])
    return dataclasses.replace(config, **{path[0]: _replace(inner, path[1:], value)})


def parse_config(presets: Mapping[str, C], argv: Sequence[str] | None = None,
                 description: str = "") -> C:
    """Build the config: ``--preset NAME`` (default: the first) plus one flag per leaf field."""
    default_name = next(iter(presets))
    cls = type(presets[default_name])
    hidden = set(getattr(cls, "set_by_grid", ()))
    flags = [(path, hint) for path, hint in _flags(cls) if ".".join(path) not in hidden]
    names = [path[-1] for path, _ in flags]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: two fields give the flag "
                        f"{sorted(n for n in names if names.count(n) > 1)}")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=list(presets), default=default_name,
                        help=f"base configuration (default: {default_name})")
    for path, hint in flags:
        parser.add_argument(f"--{path[-1].replace('_', '-')}", dest=path[-1], default=None,
                            type=_parser_for(hint),
                            help=f"override {'.'.join(path)} (preset default: "
                                 f"{_get(presets[default_name], path)!r})")
    args = parser.parse_args(argv)
    config = presets[args.preset]
    for path, _ in flags:
        if getattr(args, path[-1]) is not None:
            config = _replace(config, path, getattr(args, path[-1]))
    return config


def save_config(config, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def print_summary(out: str | Path) -> None:
    """Print an experiment's summary.md and where its figures are (the end of every
    ``python -m experiments.X`` run)."""
    out = Path(out)
    print((out / "summary.md").read_text())
    print(f"figures: {out / 'figures'}")
