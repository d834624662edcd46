"""Shared test fixtures: where the real data lives, and one in-process Ray for the tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels run in the interpreter on a machine without a GPU. The switch is read when triton is first imported
# (torch's optimizers import it), so it is set for the whole run before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real test data not found at {DATA}: the tests expect ../shared beside the repository")
    return DATA


@pytest.fixture(scope="session")
def ray_local():
    """An in-process Ray, started once and shared by the tests that need it (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    return ray


@pytest.fixture(scope="module")
def s3_env():
    """A real S3 API on localhost (moto's threaded server) with the bucket ``crawl-bucket``, and the standard
    variables pointing at it (``AWS_ENDPOINT_URL``, keys, region), set before any Ray process of the module starts:
    workers inherit them. A Ray started earlier is shut down first (its workers would know no endpoint), and the
    module's own at the end."""
    import logging
    import socket

    import ray
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    from core.storage import location

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per HTTP request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test-key",
           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    S3FileSystem.clear_instance_cache()  # an instance made for an earlier module's server keeps that endpoint
    ray.shutdown()
    try:
        location("s3://crawl-bucket").fs.makedirs("crawl-bucket", exist_ok=True)  # moto keeps buckets per process
        yield env
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        S3FileSystem.clear_instance_cache()
        server.stop()
