"""Shared fixtures: one local Ray instance per test session, a model file, the real photos."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # Keep Ray quiet and small on a 2-core CI machine.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray's processes report their metrics every second (default 10 s): the scrape tests wait
    # less.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


@pytest.fixture(scope="session")
def ray_metrics_url():
    """Where the session's Ray node exports its metrics (Prometheus text), on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="session")
def ray_session(ray_metrics_url):
    """A local Ray instance shared by every test that runs a job (metrics on a known port)."""
    import ray

    port = int(ray_metrics_url.rsplit(":", 1)[1].split("/")[0])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1 << 30,
             configure_logging=False, _metrics_export_port=port)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A model file with seeded random weights, and the model itself."""
    from pipeline.model.network import load_model, save_model

    model, _ = load_model(init="random", seed=7)
    path = tmp_path_factory.mktemp("model") / "landmarks.pt"
    version = save_model(model, str(path), metadata={"made_by": "tests"})
    return str(path), model, version



@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory):
    """The URL of a real Pushgateway on loopback, or None where the binary is not installed
    (``.ci/run`` installs it): the tests that need it skip then, saying so."""
    from support.pushgateway_server import start

    started = start(tmp_path_factory.mktemp("pushgateway"))
    if started is None:
        yield None
        return
    url, proc = started
    yield url
    proc.terminate()
    proc.wait(timeout=10)
