"""The errors a user can act on, each with the exit status the command line gives it.

``landmarks`` prints a ``PipelineError`` as one line (``error: ...``) and exits with its
``exit_code``; any other exception is a bug and keeps its traceback (exit status 1). So an
internal ``ValueError`` is never mistaken for bad input, and a new user-facing error says what
it is by its class, not by the built-in it happens to inherit:

- ``BadInput`` (exit 2): bad arguments, config, input or model file, or an output that another
  run holds: said before any work where it can be checked first;
- ``JobFailed`` (exit 1): the job started and could not finish (a stage failed for good, or
  stalled, or the run lost its output's lease); what was committed stays, and a rerun resumes.

``BadInput`` is also a ``ValueError`` and ``JobFailed`` a ``RuntimeError``, so code (and tests)
that catch those keep working.
"""

from __future__ import annotations


class PipelineError(Exception):
    """An error with a message for the user and the command line's exit status."""

    exit_code = 1


class BadInput(PipelineError, ValueError):
    """Bad arguments, config, input or model file (exit status 2)."""

    exit_code = 2


class JobFailed(PipelineError, RuntimeError):
    """The job could not finish (exit status 1); what it committed stays."""

    exit_code = 1
