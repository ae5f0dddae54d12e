"""minidiff.plumbing.flags: flags from a dataclass, checked against argparse written out by hand."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from minidiff.errors import UserError
from minidiff.plumbing import flags


@dataclass
class Knobs:
    max_len: int = 512
    lr: float = 1e-4
    name: str | None = None
    pack: bool = False
    sources: list[str] = field(default_factory=lambda: ["a"])
    stops: tuple[str, ...] = ()


@dataclass
class Overrides:  # every field None: "keep the preset's value" (as sample.py's sampler flags)
    steps: int | None = None
    temperature: float | None = None
    stochastic: bool | None = None
    stops: tuple[str, ...] | None = None


PRESETS = {"fast": {"steps": 8, "temperature": 0.5, "_note": "a note, not a field"},
           "slow": {"steps": 256}}


def by_hand() -> argparse.ArgumentParser:
    """The parser flags.add_fields should make for Knobs, written out."""
    p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    p.add_argument("--max-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--name", type=str)
    p.add_argument("--pack", action=argparse.BooleanOptionalAction)
    p.add_argument("--sources", nargs="+", type=str)
    p.add_argument("--stops", nargs="+", type=str)
    return p


@pytest.mark.parametrize("argv", [
    [], ["--max-len", "64", "--lr", "0.5"], ["--pack"], ["--no-pack", "--name", "x"],
    ["--sources", "a", "b", "c"], ["--stops", "x", "y"],
])
def test_one_flag_per_field_as_argparse_by_hand(argv):
    parser = flags.Parser()
    flags.add_fields(parser, Knobs)
    given = flags.parse_given(parser, argv)
    assert given == vars(by_hand().parse_args(argv))
    assert Knobs(**given) == Knobs(**vars(by_hand().parse_args(argv)))


def test_help_lists_fields_with_defaults():
    parser = flags.Parser()
    flags.add_fields(parser, Knobs, helps={"max_len": "tokens"})
    text = parser.format_help()
    assert "--max-len MAX_LEN" in text and "tokens (default: 512)" in text
    assert "--pack, --no-pack" in text and "(default: ['a'])" in text
    assert flags.parse_given(parser, ["--max-len", "7"]) == {"max_len": 7}


def test_errors_are_one_sentence_user_errors():
    parser = flags.Parser()
    flags.add_fields(parser, Knobs, choices={"name": ["x", "y"]})
    for argv, needle in ((["--max-len", "many"], "--max-len"), (["--name", "z"], "invalid choice"),
                         (["--unknown"], "unrecognized")):
        with pytest.raises(UserError) as info:
            flags.parse_given(parser, argv)
        assert needle in str(info.value) and "\n" not in str(info.value)


def test_preset_flag_in_a_group_and_none_fields_keep_the_preset():
    parser = flags.Parser()
    flags.add_preset_flag(parser, PRESETS, help="start from these settings")
    group = parser.add_argument_group("sampler (override the preset)")
    flags.add_fields(group, Overrides, show_defaults=False, nargs={"stops": "*"})
    given = flags.parse_given(parser, ["--preset", "fast", "--steps", "32", "--stops"], Overrides)
    assert given == {"preset": "fast", "steps": 32, "stops": ()}  # tuple field, empty list allowed
    chosen = {k: v for k, v in given.items() if k != "preset"}
    assert flags.with_preset(chosen, PRESETS, given["preset"]) == {"steps": 32, "temperature": 0.5, "stops": ()}
    assert flags.with_preset({}, PRESETS, None) == {}
    assert "sampler (override the preset)" in parser.format_help()
    assert "(default" not in parser.format_help().split("sampler (override the preset)")[1]


def test_format_presets_writes_the_flags_a_user_would_type():
    text = flags.format_presets({"p": {"pack": True, "stochastic": False, "sources": ["a", "b"], "lr": 0.1,
                                       "_note": "why"}})
    assert text.splitlines()[1:] == ["  p:", "    --pack", "    --no-stochastic", "    --sources a b",
                                     "    --lr 0.1", "    (why)"]
