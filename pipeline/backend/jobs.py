"""The Ray Jobs API client of ``landmarks submit``: the one place it imports Ray."""

from __future__ import annotations

import logging
import os


class _KnownExcludesNotice(logging.Filter):
    """Drops Ray's notice that .git / .venv are now left out of uploads: EXCLUDES does that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now ignored by default" not in record.getMessage()


def quiet_upload_notices() -> None:
    log = logging.getLogger("ray._private.runtime_env.working_dir")
    if not any(isinstance(f, _KnownExcludesNotice) for f in log.filters):
        log.addFilter(_KnownExcludesNotice())


def _local_token_headers() -> dict[str, str]:
    """The Authorization header for this machine's Ray token (~/.ray/auth_token,
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH), or {} when there is none."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return {}
    try:
        loader = AuthenticationTokenLoader.instance()
        if loader.has_token(ignore_auth_mode=True):
            return dict(loader.get_token_for_http_header())
    except Exception:  # no usable token: go on without one
        pass
    return {}


def connect(address: str):
    """A JobSubmissionClient for ``address``.

    Recent Ray clusters may require a token (Ray 2.60's ``ray start`` turns it on when
    ~/.ray/auth_token exists). The SDK only sends it when RAY_AUTH_MODE=token is set here, so
    when the server asks for one and the mode is not set, the local token is sent, as
    ``ray.init`` does when it joins a cluster.
    """
    import ray.exceptions
    from ray.job_submission import JobSubmissionClient

    auth_error = getattr(ray.exceptions, "AuthenticationError", None)  # not in older Ray
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        if auth_error is None or not isinstance(exc, auth_error) or "RAY_AUTH_MODE" in os.environ:
            raise
        headers = _local_token_headers()
        if not headers:
            raise
        return JobSubmissionClient(address, headers=headers)
