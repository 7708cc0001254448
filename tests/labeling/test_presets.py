from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distillery.engine.cli import main
from distillery.labeling.ontology import Ontology, OntologyError
from distillery.labeling.teachers import PresetError, TeacherPreset


def write(tmp_path, data, name="p.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("change, message", [
    ({"device": "tpu"}, "device must be"),
    ({"device": "cpu", "precision": "fp16"}, "needs a GPU"),
    ({"precision": "float32"}, "fp32, fp16 or bf16"),
    ({"detector": {"batch_size": 0}}, "detector.batch_size must be a positive integer"),
    ({"detector": {"batch_size": "four"}}, "positive integer"),
    ({"detector": {"box_floor": 2}}, r"box_floor must be a number in \[0.0, 1.0\]"),
    ({"detector": {"image_size": {"shortest_edge": 800}}}, "image_size"),
    ({"segmenter": {"model_type": "vit_zz"}}, "vit_h, vit_l, vit_b, vit_tiny"),
    ({"segmenter": {"checkpoint": "nope/sam.pth"}}, "segment-anything release"),
    ({"detector": {"colour": 1}}, r"unknown key\(s\) \['colour'\] in detector"),
])
def test_bad_presets_name_the_key_and_the_fix(tmp_path, tiny_teachers, change, message):
    data = yaml.safe_load(Path(tiny_teachers).read_text())
    for k, v in change.items():
        if isinstance(v, dict):
            data[k].update(v)
        else:
            data[k] = v
    data["detector"]["model"] = str(Path(tiny_teachers).parent / "grounding-dino")
    if "checkpoint" not in change.get("segmenter", {}):
        data["segmenter"]["checkpoint"] = str(Path(tiny_teachers).parent / "sam_vit_tiny.pth")
    p = write(tmp_path, data)
    with pytest.raises(PresetError, match=message) as e:
        TeacherPreset.load(p)
    assert str(p) in str(e.value)


def test_preset_shape_and_duplicate_keys(tmp_path):
    with pytest.raises(PresetError, match="is a mapping"):
        TeacherPreset.load(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(PresetError, match="given twice"):
        TeacherPreset.load(write(tmp_path, "device: cpu\ndevice: auto\n"))
    with pytest.raises(OntologyError, match="'car' is given twice"):
        Ontology.load(write(tmp_path, "car: vehicle\ntruck: vehicle\ncar: automobile\n", "o.yaml"))
    with pytest.raises(OntologyError, match="empty"):
        Ontology.load(write(tmp_path, "", "o.yaml"))


def test_missing_detector_and_bad_ontology_fail_before_a_label_set_exists(tmp_path, tiny_teachers, coco128):
    data = yaml.safe_load(Path(tiny_teachers).read_text())
    data["segmenter"]["checkpoint"] = str(Path(tiny_teachers).parent / "sam_vit_tiny.pth")
    data["detector"]["model"] = "no-such-dir"
    p = write(tmp_path, data)
    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["label", str(coco128 / "images"), "--classes", "cat", "--store", str(store),
                                  "--teachers", str(p)], env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 1 and "detector.model 'no-such-dir' cannot be loaded" in r.output
    onto = write(tmp_path, "Car: car\ncar: automobile\n", "o.yaml")
    r = CliRunner().invoke(main, ["label", str(coco128 / "images"), "--ontology", str(onto), "--store", str(store),
                                  "--teachers", str(tiny_teachers)])
    assert r.exit_code == 1 and "same tokens" in r.output and str(onto) in r.output
    assert not store.exists()
