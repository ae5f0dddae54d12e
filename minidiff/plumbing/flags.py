"""Command-line flags made from a dataclass: one flag per field, laid over a preset.

    parser = flags.Parser(prog="demo.py", description=__doc__)
    flags.add_preset_flag(parser, PRESETS, help="start from these settings")
    flags.add_fields(parser, DemoConfig, helps={"out": "output directory"})
    given = flags.parse_given(parser, argv, DemoConfig)            # only the flags given
    values = flags.with_preset({k: v for k, v in given.items() if k != "preset"}, PRESETS, given.get("preset"))

`max_len: int = 512` becomes `--max-len MAX_LEN` "(default: 512)"; a bool the pair `--x / --no-x`;
`list[T]` or `tuple[T, ...]` one or more values; `T | None` is read as T.
"""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields

from minidiff.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one sentence, exit status 2, no usage dump."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see --help)")


def flag_name(name: str) -> str:
    """The flag of a field: max_len -> --max-len."""
    return "--" + name.replace("_", "-")


def field_default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def base_type(annotation) -> tuple[type, bool]:
    """(python type, takes several values) of `int | None`, `list[str]`, `tuple[str, ...]` ..."""
    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return base_type(args[0])
    if typing.get_origin(annotation) in (list, tuple):
        return (args[0] if args else str), True
    return annotation, False


def add_fields(target, cls, *, helps: dict[str, str] | None = None, names=None, show_defaults: bool = True,
               choices: dict[str, list] | None = None, nargs: dict[str, str] | None = None) -> None:
    """One flag per field of dataclass `cls` (or of `names`) on a parser or group; helps, choices, nargs per field."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    helps, choices, nargs = helps or {}, choices or {}, nargs or {}
    for name in (names if names is not None else list(by_name)):
        kind, several = base_type(hints[name])
        text = helps.get(name, "")
        if show_defaults:
            default = f"(default: {field_default(by_name[name])})"
            text = f"{text} {default}" if text else default
        options = dict(dest=name, default=argparse.SUPPRESS, help=text or None)
        if kind is bool:
            target.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, **options)
            continue
        options.update(type=kind, metavar=name.upper())
        if name in choices:
            options.update(choices=choices[name], metavar=None)
        if several:
            options["nargs"] = nargs.get(name, "+")
        target.add_argument(flag_name(name), **options)


def add_preset_flag(target, presets: dict[str, dict], *, help: str, flag: str = "--preset") -> None:
    target.add_argument(flag, choices=sorted(presets), default=argparse.SUPPRESS, help=help)


def parse_given(parser: argparse.ArgumentParser, argv, cls=None) -> dict:
    """The flags given on the command line, by field name (tuples for the tuple fields of `cls`)."""
    given = vars(parser.parse_args(argv))
    hints = typing.get_type_hints(cls) if cls is not None else {}
    for name, value in given.items():
        if isinstance(value, list) and _is_tuple(hints.get(name)):
            given[name] = tuple(value)
    return given


def _is_tuple(annotation) -> bool:
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    return any(typing.get_origin(a) is tuple for a in (typing.get_args(annotation) if union else (annotation,)))


def with_preset(given: dict, presets: dict[str, dict], preset: str | None) -> dict:
    """The preset's values (keys starting with "_" are notes, not fields) with `given` laid over them."""
    values = {k: v for k, v in presets[preset].items() if not k.startswith("_")} if preset else {}
    return {**values, **given}


def as_flag(name: str, value) -> str:
    """How a field's value is written on the command line: --x, --no-x, --x a b, --x 3."""
    flag = flag_name(name)
    if isinstance(value, bool):
        return flag if value else "--no-" + name.replace("_", "-")
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(map(str, value))}"
    return f"{flag} {value}"


def format_presets(presets: dict[str, dict], flag: str = "--preset") -> str:
    """The presets as flags, for a parser's epilog."""
    lines = [f"presets ({flag} NAME sets these fields; flags given explicitly still win):"]
    for name, values in presets.items():
        lines.append(f"  {name}:")
        lines.extend(f"    {as_flag(k, v)}" for k, v in values.items() if not k.startswith("_"))
        if "_note" in values:
            lines.append(f"    ({values['_note']})")
    return "\n".join(lines)
