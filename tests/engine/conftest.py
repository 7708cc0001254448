"""Fixtures shared by the label-job tests (test_job.py, test_faults.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def preset_path(tiny_teachers, tmp_path_factory):
    """Tiny teachers, at most 8 boxes per image, one image per detector forward (bit-reproducible)."""
    data = yaml.safe_load(Path(tiny_teachers).read_text())
    data["detector"]["max_detections"] = 8
    data["detector"]["batch_size"] = 1
    data["detector"]["model"] = str(Path(tiny_teachers).parent / "grounding-dino")
    data["segmenter"]["checkpoint"] = str(Path(tiny_teachers).parent / "sam_vit_tiny.pth")
    p = tmp_path_factory.mktemp("preset") / "teachers.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@contextlib.contextmanager
def writer_held_by_another_process(store):
    """A child process that holds the writer lock of the only label set of ``store`` until the
    block ends (then SIGKILL); yields its ``Popen``."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from distillery.engine.store import LabelStore; "
         f"w = LabelStore({str(store)!r}).open().writer(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
