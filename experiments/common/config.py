"""Presets as frozen dataclasses, overridden field by field from the command line.

``python -m experiments.X --preset quick --seq-lens 1024,2048`` takes the ``quick`` preset and
replaces its ``seq_lens`` field. Every field of the preset dataclass becomes a flag; tuples are
comma-separated, booleans are true/false.
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


def parse_config(presets: Mapping[str, C], argv: Sequence[str] | None = None,
                 description: str = "") -> C:
    """Build the config: ``--preset NAME`` (default: the first) plus one flag per field."""
    default_name = next(iter(presets))
    cls = type(presets[default_name])
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=list(presets), default=default_name,
                        help=f"base configuration (default: {default_name})")
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                            type=_parser_for(hints[field.name]),
                            help=f"override {field.name} (preset default: "
                                 f"{getattr(presets[default_name], field.name)!r})")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(presets[args.preset], **overrides)


def save_config(config, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
