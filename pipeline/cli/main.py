"""``landmarks``: the one command line (also ``python jobs/<job>.py ...``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from pipeline.cli.registry import parse_args
from pipeline.config.errors import PipelineError
from pipeline.io.storage import RedactingFilter, redact


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # no URL password or signature in any log
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        args = parse_args(argv)
        return args.run(args)
    except PipelineError as exc:  # bad input (2) or a job that could not finish (1)
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, PermissionError) as exc:
        # Storage the job may not read or write (a path, credentials, a bucket policy): bad
        # input, said in one line. Any other exception is a bug: its traceback is shown.
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
