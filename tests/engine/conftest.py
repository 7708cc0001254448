"""Fixtures shared by the label-job tests (test_job.py, test_faults.py)."""

from __future__ import annotations

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
