"""What every command shares: the ``Command`` record the registry mounts, and the resolved config
a job prints and saves."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.files import add_config_argument, dump_config, resolved_config, save_config
from pipeline.config.options import Option, add_options, option, options_of
from pipeline.io.pushgateway import RunOutcome, push

# Options of a run that are not settings of the job: never saved with its config (a gateway's
# URL may carry credentials).
RUN_ONLY = ("pushgateway",)


@dataclass(frozen=True)
class PushOption:
    """``--pushgateway``: shared by every command that runs a job."""

    pushgateway: str | None = option(
        "Prometheus Pushgateway URL (e.g. http://pushgateway:9091): at the end of the run, push "
        "its duration, rows, errors and, if it succeeded, landmarks_last_success_timestamp_"
        "seconds, grouped by job and output (a failed push is logged, never fails the run)",
        default=None, group="monitoring")


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
    """Print the resolved config (without the ``leave_out`` options and ``RUN_ONLY``), save it
    to ``uri`` if given, and return it."""
    config = {k: v for k, v in job_config(args).items()
              if k not in leave_out and k not in RUN_ONLY}
    print(f"resolved config:\n{dump_config(config)}", end="", flush=True)
    if uri:
        save_config(config, uri, storage_options)
        logging.info("resolved config saved to %s (reuse it with --config)", uri)
    return config


@contextlib.contextmanager
def pushed_outcome(args: argparse.Namespace, job: str, output: str) -> Iterator[RunOutcome]:
    """The run's ``RunOutcome``, pushed to ``--pushgateway`` (when given) however the run ends:
    the command sets ``success`` and the figures; an exception leaves it a failure."""
    outcome = RunOutcome(job, output)
    try:
        yield outcome
    finally:
        if getattr(args, "pushgateway", None):
            push(args.pushgateway, outcome)
