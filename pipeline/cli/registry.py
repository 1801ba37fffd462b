"""The commands of ``landmarks``, by name, and the parsing of a command line.

Each command lives in a module of ``pipeline.cli`` as a :class:`~pipeline.cli.common.Command`;
only the one a command line names is imported, so ``landmarks ledger`` or ``landmarks submit
--help`` do not import torch. Commands that take other commands' arguments (``submit``) check
them here, with the same parser the job will use.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeline.cli.common import Command
from pipeline.config.files import check_config, config_path, read_config, storage_reference
from pipeline.config.options import renamed_flags
from pipeline.io.storage import resolve_storage_options

# name -> (module holding COMMANDS[name], one-line help for `landmarks --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "infer": ("pipeline.cli.infer", "run the inference job"),
    "generate": ("pipeline.cli.infer", "write a synthetic labelled face archive"),
    "finetune": ("pipeline.cli.train",
                 "fine-tune the landmark model on labelled shards (Ray Train)"),
    "evaluate": ("pipeline.cli.train",
                 "score a model file or inference output against labelled shards"),
    "import-pts": ("pipeline.cli.train",
                   "turn images with 300-W .pts annotations into labelled tar shards"),
    "nightly": ("pipeline.cli.nightly",
                "incremental run over date partitions (default: yesterday, UTC)"),
    "ledger": ("pipeline.cli.nightly", "list the nightly runs recorded under an output"),
    "report": ("pipeline.cli.report", "write a run's HTML report from its manifest"),
    "submit": ("pipeline.cli.submit",
               "submit a job to a Ray cluster (Ray Jobs API) and wait for it"),
}


def command(name: str) -> Command:
    module, _ = COMMANDS[name]
    return importlib.import_module(module).COMMANDS[name]


def build_parser(name: str | None = None, config=None) -> argparse.ArgumentParser:
    """The ``landmarks`` parser with command ``name`` mounted whole (the others by name only)."""
    parser = argparse.ArgumentParser(
        prog="landmarks", description="68-point facial landmarks over image archives on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    for each, (_, help_text) in COMMANDS.items():
        if each != name:
            commands.add_parser(each, help=help_text)
            continue
        spec = command(each)
        sub = commands.add_parser(each, help=help_text, description=spec.description,
                                  epilog=spec.epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        spec.configure(sub, config)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line, applying the command's ``--config FILE`` first (flags win).

    Raises ``ConfigError`` (a ``ValueError``) for a config that names an unknown option or
    gives one a value of the wrong type; ``SystemExit`` for bad flags, as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    position = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    name = argv[position] if position is not None else None
    spec = command(name) if name else None
    options, config, reference = [], {}, None
    if spec is not None and spec.takes_config:
        options = spec.options()
        rest = argv[position + 1:]
        path = config_path(rest)
        raw = read_config(path, resolve_storage_options({}, [path])) if path else {}
        config = check_config(options, raw, path) if path else {}
        reference = storage_reference(options, rest, raw)
    if spec is not None and spec.takes_config:  # old flags of renamed options, for a release
        argv = argv[:position + 1] + renamed_flags(options, argv[position + 1:])
    args = build_parser(name, config).parse_args(argv)
    args.options, args.storage_reference = options, reference
    return args
