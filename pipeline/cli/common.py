"""What every command shares: the ``Command`` record the registry mounts, and the resolved config
a job prints and saves."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.files import add_config_argument, dump_config, resolved_config, save_config
from pipeline.config.options import Option, add_options, options_of


@dataclass(frozen=True)
class Command:
    """One subcommand of ``landmarks``.

    A job command lists its ``schema``: the dataclasses whose ``option`` fields are its flags and
    its ``--config`` keys (``overrides`` adjust a reused option's help or requirement). A command
    without a config adds plain argparse ``arguments`` instead."""

    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    epilog: str | None = None
    schema: tuple[type, ...] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    arguments: Callable[[argparse.ArgumentParser], None] | None = None

    @property
    def takes_config(self) -> bool:
        return bool(self.schema)

    def options(self) -> list[Option]:
        return options_of(*self.schema, overrides=self.overrides)

    def configure(self, parser: argparse.ArgumentParser,
                  config: Mapping[str, Any] | None = None) -> None:
        """Add the command's flags to its parser; ``config`` values become their defaults."""
        if self.takes_config:
            add_config_argument(parser)
            add_options(parser, self.options(), config)
        if self.arguments is not None:
            self.arguments(parser)
        parser.set_defaults(run=self.run)


def job_config(args: argparse.Namespace) -> dict:
    """The job's resolved settings (config file, flags and defaults merged; no secrets)."""
    return resolved_config(args.options, args, args.storage_reference)


def announce_config(args: argparse.Namespace, uri: str | None = None,
                    storage_options=None, leave_out: Sequence[str] = ()) -> dict:
    """Print the resolved config (without the ``leave_out`` options), save it to ``uri`` if
    given, and return it."""
    config = {k: v for k, v in job_config(args).items() if k not in leave_out}
    print(f"resolved config:\n{dump_config(config)}", end="", flush=True)
    if uri:
        save_config(config, uri, storage_options)
        logging.info("resolved config saved to %s (reuse it with --config)", uri)
    return config
