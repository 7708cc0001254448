"""Every config that ships with Distillery (``distillery.configs``) loads through its validator
and states the values its file says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distillery.engine.config import CONFIG_KINDS, shipped_configs
from distillery.export.tensorrt import DeviceProfile
from distillery.labeling.curation.config import CurationConfig
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import TeacherPreset

SHIPPED = [(kind, name, path) for kind, names in shipped_configs().items() for name, path in names.items()]


def test_every_config_kind_ships_at_least_one_file():
    assert {kind for kind, _, _ in SHIPPED} == set(CONFIG_KINDS)


@pytest.mark.parametrize("kind, name, path", SHIPPED, ids=[f"{k}-{n}" for k, n, _ in SHIPPED])
def test_shipped_config_loads_and_keeps_its_values(kind, name, path, tmp_path, monkeypatch):
    data = yaml.safe_load(Path(path).read_text())
    if kind == "teachers":
        # the SAM checkpoint is named under ~ and must exist: give it a stand-in home
        monkeypatch.setenv("HOME", str(tmp_path))
        ckpt = Path(data["segmenter"]["checkpoint"].replace("~", str(tmp_path), 1))
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
        preset = TeacherPreset.load(path)
        assert preset.to_dict() == {**data, "segmenter": {**data["segmenter"], "checkpoint": str(ckpt)}}
    elif kind == "ontology":
        onto = Ontology.load(path)
        assert list(onto.prompts) == list(data) and len(onto.classes) == len(set(data.values()))
        assert [onto.classes[c] for c in onto.prompt_class] == list(data.values())
        if name == "coco80":
            assert len(onto.classes) == 80 and onto.classes[:3] == ("person", "bicycle", "car")
    elif kind == "rules":
        assert CurationConfig.load(path).to_dict() == data
    elif kind == "device-profile":
        profile = DeviceProfile.load(path)
        assert profile.model_dump() == {"name": name, **data}
    else:
        pytest.fail(f"no loader for shipped {kind} configs: add one to this test")
