"""YAML job configs: ``landmarks infer --config job.yaml [--flag value ...]``.

A job config is a YAML mapping whose keys are the job's command-line options, spelled either way
(``batch_size`` or ``batch-size``); command-line flags override it. Values are checked against
the option they set before anything runs: an unknown key or a value of the wrong type is an
error that names the key and the file. Storage options are given by reference
(``storage_options: "@/secrets/s3.json"``) so a config can be checked in and printed; inline
options are allowed but their values are never printed or saved.

After the job's arguments are final, :func:`resolved_config` gives the effective settings (file,
overrides and defaults merged) that the job prints and saves beside its output, and that
``--config`` reads back unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.io.storage import read_bytes, storage_options_arg, write_bytes

# Options that are not job settings: never read from a config nor written to one.
NOT_SETTINGS = {"help", "config", "run", "command"}
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE",
        help="YAML job config (any fsspec URI) whose keys are this command's options, e.g. "
             "'batch_size: 128'; flags given on the command line override it")


def settings_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options that a config may set, by ``dest``."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in NOT_SETTINGS and a.help != argparse.SUPPRESS}


def read_config(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The YAML mapping in ``uri`` (a local path or any fsspec URI)."""
    try:
        text = read_bytes(uri, storage_options).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {uri} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {uri} is not UTF-8 text: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {uri} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {uri} must hold a mapping of option: value, "
                          f"not a {type(data).__name__}")
    return data


def check_config(parser: argparse.ArgumentParser, data: Mapping[str, Any],
                 source: str) -> dict[str, Any]:
    """Validate ``data`` against ``parser``'s options; return the values by ``dest``."""
    actions = settings_actions(parser)
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {raw_key!r}{hint}; known keys: "
                              f"{', '.join(sorted(actions))}")
        if key in values:
            raise ConfigError(f"{source}: key {raw_key!r} is given twice")
        values[key] = _check_value(actions[key], value, f"{source}: key {raw_key!r}")
    return values


def _check_value(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        if action.required:
            raise ConfigError(f"{where} is required and cannot be null")
        return None
    if isinstance(value, datetime.date):  # YAML reads an unquoted 2026-11-20 as a date
        value = value.isoformat()
    kind = action.type
    if kind is storage_options_arg:
        if isinstance(value, str):
            return _call_type(kind, value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping or '@file.json', got {value!r}")
        return dict(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif kind is None or kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {type(value).__name__} "
                              f"{value!r} (quote it in the YAML)")
    elif callable(kind):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a single value, got {value!r}")
        value = _call_type(kind, str(value), where)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, action.choices))}, "
                          f"got {value!r}")
    return value


def _call_type(kind, text: str, where: str):
    try:
        return kind(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def apply_config(parser: argparse.ArgumentParser, values: Mapping[str, Any]) -> None:
    """Make ``values`` the parser's defaults; options they set are no longer required."""
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values and values[action.dest] is not None:
            action.required = False
    # Required mutually exclusive groups (e.g. evaluate's --weights | --predictions).
    for group in parser._mutually_exclusive_groups:
        if group.required and any(a.dest in values and values[a.dest] is not None
                                  for a in group._group_actions):
            group.required = False


def config_path(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (before the parser runs), or None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--config="):
            found = arg.split("=", 1)[1]
    return found


def resolved_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    storage_reference: str | None = None) -> dict[str, Any]:
    """The job's effective settings, as a config mapping (secrets left out).

    Storage options given by reference keep the reference; inline values are redacted."""
    out: dict[str, Any] = {}
    for dest in settings_actions(parser):
        value = getattr(args, dest, None)
        if dest == "storage_options":
            if storage_reference:
                value = storage_reference
            elif value:
                value = _redact(value)
            else:
                value = None
        out[dest] = value
    return out


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact(v) for k, v in value.items()}
    return REDACTED


def storage_reference(parser: argparse.ArgumentParser, argv: Sequence[str],
                      config: Mapping[str, Any]) -> str | None:
    """The ``@file`` the storage options came from, when they were given by reference."""
    if "storage_options" not in settings_actions(parser):
        return None
    given = None
    for key in ("storage_options", "storage-options"):
        if isinstance(config.get(key), str):
            given = config[key]
    for i, arg in enumerate(argv):
        if arg == "--storage-options" and i + 1 < len(argv):
            given = argv[i + 1]
        elif arg.startswith("--storage-options="):
            given = arg.split("=", 1)[1]
    return given if isinstance(given, str) and given.startswith("@") else None


def dump_config(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def save_config(config: Mapping[str, Any], uri: str,
                storage_options: Mapping[str, Any] | None = None) -> None:
    """Write the resolved config as YAML (``--config`` reads it back)."""
    if "://" not in uri:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    write_bytes(uri, dump_config(config).encode(), storage_options)
