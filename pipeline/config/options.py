"""One schema per option: a job's config dataclass is where each option is declared.

A config field declared with :func:`option` (help text, choices, group, how text becomes a value)
is a command-line flag and a YAML config key at once: :func:`options_of` reads the dataclasses
into :class:`Option` records, :func:`add_options` builds the argparse flags from them and
:func:`check_value` validates YAML values against them. Names, types and defaults are written once,
in the dataclass; fields without ``option`` metadata (or with ``cli=False``) are settings that the
command line does not expose.

Why not a library: jsonargparse builds a CLI and YAML configs from dataclasses too, but it is a new
dependency whose flag syntax (``--cfg.key``), error texts and ``--config`` rules would change what
users type and read; pydantic (in Ray's dependency set, not ours) validates types but builds no
parser. What we need is ~150 lines over the standard library's ``dataclasses`` and ``argparse``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.errors import BadInput

MISSING = dataclasses.MISSING
_KEY = "option"


class ConfigError(BadInput):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Bounds:
    """A numeric option's range: ``lo`` / ``hi`` (None: no bound), inclusive unless open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        return ((self.lo is None or (value > self.lo if self.lo_open else value >= self.lo))
                and (self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return (f"in {'(' if self.lo_open else '['}{self.lo:g}, "
                f"{self.hi:g}{')' if self.hi_open else ']'}")


def at_least(lo: float) -> Bounds:
    return Bounds(lo)


def above(lo: float) -> Bounds:
    return Bounds(lo, lo_open=True)


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Bounds:
    return Bounds(lo, hi, lo_open, hi_open)


def positive_int(text: str) -> int:
    """argparse ``type`` of a plain (non-config) option: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def option(help: str | None = None, *, default: Any = MISSING,
           default_factory: Callable[[], Any] | Any = MISSING,
           choices: Iterable[Any] | None = None, parse: Callable[[str], Any] | None = None,
           group: str | None = None, metavar: str | None = None, flag: str | None = None,
           exclusive: str | None = None, cli: bool = True, bounds: Bounds | None = None,
           formerly: tuple[str, ...] = (), old_values: Mapping[str, Any] | None = None,
           **field_kwargs) -> Any:
    """A dataclass field that is also a command-line option and a config key.

    ``parse`` turns a flag's text (or a config's string) into the value; ``exclusive`` names a
    required mutually exclusive group (exactly one of its options must be given); ``cli=False``
    keeps the field off the command line (and out of configs); ``bounds`` is a number's range,
    checked on the command line, in config files and when the dataclass is built
    (``check_declared``). The help shows the default, taken from ``default``: never write it
    into the help by hand (it would drift).

    A renamed option keeps its old names in ``formerly`` and a renamed value its old spelling in
    ``old_values`` (old -> new) for one release: on the command line (``renamed_flags``), in
    config files and (for values) in Python, the old spelling still works and says what
    replaces it (``DEPRECATED``)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "parse": parse, "group": group, "metavar": metavar, "flag": flag,
            "exclusive": exclusive, "cli": cli, "bounds": bounds, "formerly": tuple(formerly),
            "old_values": dict(old_values or {})}
    return field(default=default, default_factory=default_factory,
                 metadata={_KEY: meta}, **field_kwargs)


@dataclass(frozen=True)
class Option:
    """One option as the parser and the config checker see it."""

    name: str  # attribute, config key (``batch_size``; ``batch-size`` is accepted too)
    flag: str  # ``--batch-size``
    kind: type  # bool, int, float, str or dict
    default: Any
    required: bool
    help: str | None = None
    choices: tuple | None = None
    parse: Callable[[str], Any] | None = None
    group: str | None = None
    metavar: str | None = None
    exclusive: str | None = None
    bounds: Bounds | None = None
    formerly: tuple[str, ...] = ()  # old names, still read (with a warning)
    old_values: Mapping[str, Any] = field(default_factory=dict)  # old spelling -> value

    def help_text(self, default: Any) -> str | None:
        """The help with the default the option really has (unless the help tells it)."""
        if (self.help is None or default is None or isinstance(default, bool)
                or default in ("", {}) or "default" in self.help):
            return self.help
        shown = (f"{default:g}" if isinstance(default, float)
                 else f"{default:,}" if isinstance(default, int) else str(default))
        return f"{self.help} (default {shown})"


def check_declared(instance: Any) -> None:
    """``BadInput`` unless every option field of the dataclass ``instance`` is one of its
    ``choices`` and within its ``bounds`` (None passes: not set)."""
    for f in dataclasses.fields(instance):
        meta = f.metadata.get(_KEY)
        value = getattr(instance, f.name)
        if not meta or value is None:
            continue
        if isinstance(value, str) and value in meta["old_values"]:
            new = meta["old_values"][value]
            warnings.warn(f"{f.name}={value!r} is deprecated: use {new!r}", DeprecationWarning,
                          stacklevel=3)
            object.__setattr__(instance, f.name, new)  # frozen dataclasses too
            value = new
        if meta["choices"] is not None and value not in meta["choices"]:
            raise BadInput(f"{f.name} must be one of {meta['choices']}, got {value!r}")
        if meta["bounds"] is not None and not meta["bounds"].holds(value):
            raise BadInput(f"{f.name} must be {meta['bounds']}, got {value!r}")


DEPRECATED = ("{old} is deprecated and will be removed in the next release: use {new}")


def deprecated(old: str, new: str) -> None:
    """Tell the user (on stderr) that ``old`` is now ``new``."""
    print(f"warning: {DEPRECATED.format(old=old, new=new)}", file=sys.stderr, flush=True)


def _renamed_values(convert: Callable[[str], Any] | None, flag: str,
                    old_values: Mapping[str, Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that takes the old spellings of values too (with a warning)."""
    def parse(text: str) -> Any:
        if text in old_values:
            deprecated(f"{flag} {text}", f"{flag} {old_values[text]}")
            return old_values[text]
        return convert(text) if convert is not None else text

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def renamed_flags(options: Iterable[Option], argv: Sequence[str]) -> list[str]:
    """``argv`` with the old flags of ``options`` (``formerly``) replaced by the new ones, each
    said once on stderr. Done before parsing, so that the parser (its help, its required
    options, its errors) knows the new names only."""
    new = {"--" + old.replace("_", "-"): o.flag for o in options for old in o.formerly}
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag in new:
            deprecated(flag, new[flag])
            arg = new[flag] + eq + value
        out.append(arg)
    return out


def _bounded(convert: Callable[[str], Any], bounds: Bounds) -> Callable[[str], Any]:
    """An argparse ``type`` that converts, then checks the range (usage error, exit 2)."""
    def parse(text: str) -> Any:
        value = convert(text)
        if value is not None and not bounds.holds(value):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value!r}")
        return value

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in errors
    return parse


def options_of(*schemas: type, overrides: Mapping[str, Mapping[str, Any]] | None = None
               ) -> list[Option]:
    """The options the dataclasses declare, in field order by group; ``overrides`` replace
    attributes of named options (a command that reuses another's schema with its own help or
    requirements)."""
    out: list[Option] = []
    for schema in schemas:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            meta = f.metadata.get(_KEY)
            if not meta or not meta["cli"]:
                continue
            kind, optional = _kind(hints[f.name], f"{schema.__name__}.{f.name}")
            if f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:
                default = None
            required = f.default is MISSING and f.default_factory is MISSING and not optional
            out.append(Option(
                name=f.name, flag=meta["flag"] or "--" + f.name.replace("_", "-"), kind=kind,
                default=default, required=required and not meta["exclusive"],
                help=meta["help"], choices=meta["choices"], parse=meta["parse"],
                group=meta["group"], metavar=meta["metavar"], exclusive=meta["exclusive"],
                bounds=meta["bounds"], formerly=meta["formerly"],
                old_values=meta["old_values"]))
    for name, changes in (overrides or {}).items():
        i = next(i for i, o in enumerate(out) if o.name == name)
        out[i] = dataclasses.replace(out[i], **changes)
    # Ungrouped options first, then each group where it first appears (as --help shows them).
    groups = list(dict.fromkeys(o.group for o in out))
    return sorted(out, key=lambda o: (o.group is not None, groups.index(o.group)))


def _kind(hint: Any, where: str) -> tuple[type, bool]:
    """``(base type, accepts None)`` of a field's annotation."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"{where}: an option has one type, got {hint}")
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    if origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return dict, optional
    if origin in (bool, int, float, str):
        return origin, optional
    raise TypeError(f"{where}: options are bool, int, float, str or a mapping, got {hint}")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option],
                config: Mapping[str, Any] | None = None) -> None:
    """Add ``options`` as flags; a ``config`` value becomes the flag's default (so the flag still
    wins) and lifts its requirement."""
    config = config or {}
    options = list(options)
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for o in options:
        container = parser
        if o.group is not None:
            if o.group not in groups:
                groups[o.group] = parser.add_argument_group(o.group)
            container = groups[o.group]
        if o.exclusive is not None:
            if o.exclusive not in exclusive:
                given = any(config.get(x.name) is not None
                            for x in options if x.exclusive == o.exclusive)
                exclusive[o.exclusive] = container.add_mutually_exclusive_group(
                    required=not given)
            container = exclusive[o.exclusive]
        default = config.get(o.name, o.default)
        kwargs: dict[str, Any] = {"dest": o.name, "default": default,
                                  "help": o.help_text(default)}
        if o.kind is bool:
            kwargs["action"] = "store_true"
        else:
            convert = o.parse or (None if o.kind is str else o.kind)
            if o.bounds is not None and convert is not None:
                convert = _bounded(convert, o.bounds)
            if o.old_values:
                convert = _renamed_values(convert, o.flag, o.old_values)
            kwargs.update(type=convert, choices=o.choices, metavar=o.metavar)
            if o.exclusive is None:
                kwargs["required"] = o.required and config.get(o.name) is None
        container.add_argument(o.flag, **kwargs)


def check_value(o: Option, value: Any, where: str) -> Any:
    """``value`` (from YAML) as the option's value; ``ConfigError`` naming ``where`` if not."""
    if o.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        if o.required:
            raise ConfigError(f"{where} is required and cannot be null")
        return None
    if isinstance(value, datetime.date):  # YAML reads an unquoted 2026-11-20 as a date
        value = value.isoformat()
    if isinstance(value, str) and value in o.old_values:
        deprecated(f"{where} {value!r}", repr(o.old_values[value]))
        value = o.old_values[value]
    if o.kind is dict:
        if isinstance(value, str) and o.parse is not None:
            return _parse(o.parse, value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping or '@file.json', got {value!r}")
        return dict(value)
    if o.parse is not None:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a single value, got {value!r}")
        value = _parse(o.parse, str(value), where)
    elif o.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif o.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {type(value).__name__} {value!r} "
                          f"(quote it in the YAML)")
    if o.choices is not None and value not in o.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, o.choices))}, "
                          f"got {value!r}")
    if o.bounds is not None and not o.bounds.holds(value):
        raise ConfigError(f"{where} must be {o.bounds}, got {value!r}")
    return value


def _parse(parse: Callable[[str], Any], text: str, where: str) -> Any:
    try:
        return parse(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def values_for(schema: type, args: argparse.Namespace, **values: Any) -> dict[str, Any]:
    """The keyword arguments of ``schema`` that ``args`` holds, updated with ``values``."""
    out = {f.name: getattr(args, f.name) for f in dataclasses.fields(schema)
           if hasattr(args, f.name)}
    out.update(values)
    return out
