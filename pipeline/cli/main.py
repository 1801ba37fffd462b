"""``landmarks``: the one command line (also ``python jobs/<job>.py ...``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from pipeline.cli.registry import parse_args
from pipeline.io.storage import RedactingFilter, redact


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # no URL password or signature in any log
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        args = parse_args(argv)
        return args.run(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:  # ConfigError: ValueError
        # Bad arguments or input, or storage the job may not read or write (credentials, bucket
        # policy): said in one line, before any work where it can be checked first.
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not getattr(exc, "stops_job", False):
            raise
        print(f"error: {redact(str(exc))}", file=sys.stderr)  # a stage failed, or stalled
        return 1


if __name__ == "__main__":
    sys.exit(main())
