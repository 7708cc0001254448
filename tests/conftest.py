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
    from labeling.tiny import write_tiny_teachers

    return write_tiny_teachers(tmp_path_factory.mktemp("tiny-teachers"))


@pytest.fixture(scope="session")
def fo(tmp_path_factory):
    """FiftyOne, with its MongoDB in a throwaway directory (set before the first import)."""
    os.environ["FIFTYONE_DATABASE_DIR"] = str(tmp_path_factory.mktemp("fiftyone-db"))
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    import fiftyone

    return fiftyone


@pytest.fixture
def dataset_name(fo, request):
    """A throwaway FiftyOne dataset name; the dataset is deleted after the test."""
    import uuid

    name = f"distillery-test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    yield name
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
