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
import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.options import ConfigError, Option, check_value, deprecated
from pipeline.io.storage import read_bytes, redact_values, write_bytes

# The resolved config a job saves beside its output (reused with --config).
CONFIG_FILE = "_config.yaml"

__all__ = ["ConfigError", "check_config", "read_config", "resolved_config", "save_config"]
REDACTED = "<redacted>"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE",
        help="YAML job config (any fsspec URI) whose keys are this command's options, e.g. "
             "'batch_size: 128'; flags given on the command line override it")


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


def check_config(options: Iterable[Option], data: Mapping[str, Any],
                 source: str) -> dict[str, Any]:
    """Validate ``data`` against the command's options; return the values by option name."""
    options = list(options)
    known = {o.name: o for o in options}
    former = {old: o.name for o in options for old in o.formerly}
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in former:
            deprecated(f"{source}: key {raw_key!r}", repr(former[key]))
            key = former[key]
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {raw_key!r}{hint}; known keys: "
                              f"{', '.join(sorted(known))}")
        if key in values:
            raise ConfigError(f"{source}: key {raw_key!r} is given twice")
        values[key] = check_value(known[key], value, f"{source}: key {raw_key!r}")
    return values


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


def resolved_config(options: Iterable[Option], args: argparse.Namespace,
                    storage_reference: str | None = None) -> dict[str, Any]:
    """The job's effective settings, as a config mapping (secrets left out).

    Storage options given by reference keep the reference; inline values are redacted."""
    out: dict[str, Any] = {}
    for o in options:
        value = getattr(args, o.name, None)
        if o.name == "storage_options":
            if storage_reference:
                value = storage_reference
            elif value:
                value = _redact(value)
            else:
                value = None
        out[o.name] = redact_values(value)  # URL passwords and presigned query strings
    return out


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact(v) for k, v in value.items()}
    return REDACTED


def storage_reference(options: Iterable[Option], argv: Sequence[str],
                      config: Mapping[str, Any]) -> str | None:
    """The ``@file`` the storage options came from, when they were given by reference."""
    if not any(o.name == "storage_options" for o in options):
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
