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


DETECTOR_KEYS = "kind, model, revision, box_floor, nms_iou, merge, image_size, max_detections, batch_size, actors, adapter"

#: (YAML text, key path, what the message must say after "<file>: <key path>: ").
BAD_PRESETS = [
    ("detector: {kind: yolo-world}\n", "detector.kind", "unknown detector kind 'yolo-world'; known: grounding-dino, mm-grounding-dino, owlv2"),
    ("segmenter: {kind: sam, model: facebook/sam-vit-base}\n", "segmenter",
     "kind sam loads model_type + checkpoint (segment-anything); remove 'model'"),
    ("teacher: {kind: sam9, model: x}\n", "teacher.kind", "unknown teacher kind 'sam9'; known: sam3"),
    ("teacher: {kind: sam3, model: x, points: 4}\n", "teacher.points",
     "unknown key; known keys in teacher: kind, model, revision, box_floor, nms_iou, merge, max_detections, "
     "min_region_area, batch_size, actors"),
    ("teacher: {kind: sam3, model: x, min_region_area: -1}\n", "teacher.min_region_area",
     "must be a non-negative integer, got -1"),
    ("colour: red\n", "colour", "unknown key; known keys: detector, segmenter, teacher, device, precision"),
    ("detector: {colour: 1}\n", "detector.colour", f"unknown key; known keys in detector: {DETECTOR_KEYS}"),
    ("detector: {image_size: {shortest_edge: 800, longest_edge: 1333, max_size: 2000}}\n",
     "detector.image_size.max_size", "unknown key; known keys in detector.image_size: shortest_edge, longest_edge"),
    ("segmenter: {points: 4}\n", "segmenter.points",
     "unknown key; known keys in segmenter: kind, model, revision, model_type, checkpoint, boxes_per_call, min_region_area, batch_size, actors"),
    ("detector: {batch_size: four}\n", "detector.batch_size", "must be a positive integer, got 'four'"),
    ("detector: {batch_size: '4'}\n", "detector.batch_size",
     "must be a positive integer, got '4' (a number in quotes is text: remove the quotes)"),
    ("detector: {nms_iou: true}\n", "detector.nms_iou", "must be a number in [0.0, 1.0], got True"),
    ("detector: {box_floor: 1e-3}\n", "detector.box_floor",
     "must be a number in [0.0, 1.0], got '1e-3' (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)"),
    ("detector: [a, b]\n", "detector", f"must be a mapping with keys {DETECTOR_KEYS}, got ['a', 'b']"),
    ("detector: {image_size: 800}\n", "detector.image_size",
     "must be a mapping with keys shortest_edge, longest_edge, or null, got 800"),
    ("detector: {nms_iou: 1.5}\n", "detector.nms_iou", "must be a number in [0.0, 1.0], got 1.5"),
    ("detector: {box_floor: -0.1}\n", "detector.box_floor", "must be a number in [0.0, 1.0], got -0.1"),
    ("segmenter: {boxes_per_call: 0}\n", "segmenter.boxes_per_call", "must be a positive integer, got 0"),
    ("segmenter: {min_region_area: -1}\n", "segmenter.min_region_area", "must be a non-negative integer, got -1"),
    ("detector: {image_size: {shortest_edge: 0, longest_edge: 1333}}\n", "detector.image_size.shortest_edge",
     "must be a positive integer, got 0"),
    ("detector: {image_size: {shortest_edge: 800}}\n", "detector.image_size.longest_edge",
     "is required (a positive integer)"),
    ("precision: float32\n", "precision", "must be one of fp32, fp16, bf16, got 'float32'"),
    ("segmenter: {model_type: vit_zz}\n", "segmenter.model_type",
     "must be one of vit_h, vit_l, vit_b, vit_tiny, got 'vit_zz'"),
]


@pytest.mark.parametrize("text, key, problem", BAD_PRESETS, ids=[b[1] + "-" + b[2][:12] for b in BAD_PRESETS])
def test_bad_preset_files_give_one_line_with_file_key_and_allowed_values(tmp_path, text, key, problem):
    # no checkpoint and a hub id: no file is needed for these checks
    p = write(tmp_path, text)
    with pytest.raises(PresetError) as e:
        TeacherPreset.load(p)
    assert str(e.value) == f"{p}: {key}: {problem}"


def test_every_bad_key_of_a_preset_gets_its_own_line(tmp_path):
    p = write(tmp_path, "detector: {nms_iou: 2, actors: 0, extra: 1}\nprecision: half\n")
    with pytest.raises(PresetError) as e:
        TeacherPreset.load(p)
    lines = str(e.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["detector.nms_iou", "detector.actors", "detector.extra",
                                                       "precision"]
    assert all(line.startswith(f"{p}: ") for line in lines)


@pytest.mark.parametrize("change, message", [
    ({"device": "tpu"}, "device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({"device": "cuda:x"}, "device: must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ({"device": "cpu", "precision": "fp16"}, "precision fp16 needs a GPU; use fp32 with device: cpu"),
    ({"segmenter": {"checkpoint": "nope/sam.pth"}}, "segmenter.checkpoint: '{dir}/nope/sam.pth' not found: download "
     "the vit_tiny checkpoint from the segment-anything release"),
    ({"detector": {"adapter": "nope"}}, "detector.adapter: '{dir}/nope' is not a LoRA adapter folder (no "
     "adapter_config.json in it)"),
])
def test_checks_that_need_torch_or_files(tmp_path, tiny_teachers, change, message):
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
    with pytest.raises(PresetError) as e:
        TeacherPreset.load(p)
    assert str(e.value).startswith(f"{p}: " + message.format(dir=tmp_path.resolve()))
    assert len(str(e.value).splitlines()) == 1


def test_relative_paths_resolve_against_the_preset_and_round_trip(tiny_teachers, tmp_path):
    folder = Path(tiny_teachers).parent
    preset = TeacherPreset.load(tiny_teachers)  # written with model: grounding-dino, checkpoint: sam_vit_tiny.pth
    assert preset.detector.model == str((folder / "grounding-dino").resolve())
    assert preset.segmenter.checkpoint == str((folder / "sam_vit_tiny.pth").resolve())
    assert preset.detector.image_size == {"shortest_edge": 320, "longest_edge": 512}
    assert type(preset.detector.image_size) is dict  # hashed as is into the label set id
    assert TeacherPreset.from_dict(preset.to_dict()) == preset
    # a model that is not a folder next to the preset stays a hub id
    p = write(tmp_path, "detector: {model: IDEA-Research/grounding-dino-base}\n"
                        f"segmenter: {{model_type: vit_tiny, checkpoint: {folder / 'sam_vit_tiny.pth'}}}\n")
    assert TeacherPreset.load(p).detector.model == "IDEA-Research/grounding-dino-base"
    # edited values are checked again by validate()
    preset.detector.batch_size = 0
    with pytest.raises(PresetError) as e:
        preset.validate("edited")
    assert str(e.value) == "edited: detector.batch_size: must be a positive integer, got 0"


def test_preset_shape_and_duplicate_keys(tmp_path):
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(PresetError) as e:
        TeacherPreset.load(p)
    assert str(e.value) == f"{p}: must be a mapping with keys detector, segmenter, teacher, device, precision, got list"
    with pytest.raises(PresetError, match="given twice"):
        TeacherPreset.load(write(tmp_path, "device: cpu\ndevice: auto\n"))
    # an empty preset, or one without a segmenter: SAM's weights must be named, never random by default
    for text in ("", "detector: {model: IDEA-Research/grounding-dino-base}\n", "segmenter: {model_type: vit_h}\n"):
        p = write(tmp_path, text)
        with pytest.raises(PresetError) as e:
            TeacherPreset.load(p)
        model_type = "vit_h" if "vit_h" in text else "vit_b"
        assert str(e.value) == (f"{p}: segmenter.checkpoint is not set, so SAM {model_type} would run with random "
                                "weights; set it to the segment-anything checkpoint (the shipped default preset uses "
                                "~/.cache/distillery/sam_vit_b_01ec64.pth), or write tiny test teachers with "
                                "`distillery teachers tiny DIR`")
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


def test_full_size_random_teachers_have_the_real_architectures():
    """`teachers tiny --size full` builds Grounding DINO-T (172M parameters, the model card of
    IDEA-Research/grounding-dino-tiny) and SAM ViT-B (93.7M: the segment-anything vit_b checkpoint's
    tensor count); counted on the meta device, nothing written."""
    import torch
    from segment_anything import sam_model_registry
    from transformers import GroundingDinoForObjectDetection

    from distillery.labeling.tiny import full_grounding_dino_config

    with torch.device("meta"):
        gd = GroundingDinoForObjectDetection(full_grounding_dino_config())
        sam = sam_model_registry["vit_b"](checkpoint=None)
    assert sum(p.numel() for p in gd.parameters()) == 172_250_626
    assert list(gd.config.backbone_config.depths) == [2, 2, 6, 2] and gd.config.num_queries == 900
    assert round(sum(p.numel() for p in sam.parameters()) / 1e6, 1) == 93.7


def test_a_model_folder_of_another_kind_fails_before_any_label_set(tiny_teachers, tmp_path):
    gd = str(Path(tiny_teachers).parent / "grounding-dino")
    sam = {"model_type": "vit_tiny", "checkpoint": str(Path(tiny_teachers).parent / "sam_vit_tiny.pth")}
    p = TeacherPreset.from_dict({"detector": {"kind": "owlv2", "model": gd}, "segmenter": sam})
    with pytest.raises(PresetError, match="is a 'grounding-dino' model, not the 'owlv2' that detector.kind owlv2 loads"):
        p.check_detector(Ontology.from_classes("person"), "p.yaml")
    p = TeacherPreset.from_dict({"detector": {"model": gd}, "segmenter": {"kind": "sam2", "model": gd}})
    with pytest.raises(PresetError, match="is a 'grounding-dino' model, not the 'sam2' that segmenter.kind sam2 loads"):
        p.check_detector(Ontology.from_classes("person"), "p.yaml")
    p = TeacherPreset.from_dict({"detector": {"model": gd}, "segmenter": {"kind": "sam-hq", "model": "w/sam.pth"}})
    with pytest.raises(PresetError, match="is a weights file"):
        p.check_detector(Ontology.from_classes("person"), "p.yaml")


def test_sam_checkpoint_check_reads_both_torch_save_formats(tmp_path):
    """A state dict saved in the zip format (read with mmap) and in the pre-1.6 format (mmap
    cannot read it: read whole) both pass; a pickled non-state-dict and a YAML file do not."""
    import torch

    from distillery.labeling.teachers import check_sam_checkpoint

    torch.save({"w": torch.zeros(2)}, tmp_path / "new.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    check_sam_checkpoint(str(tmp_path / "new.pth"), "k")
    check_sam_checkpoint(str(tmp_path / "old.pth"), "k")  # was refused: "mmap can only be used with ..."
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(PresetError, match=r"k .*list.pth is a PyTorch file but not a state dict of tensors"):
        check_sam_checkpoint(str(tmp_path / "list.pth"), "k")
    (tmp_path / "p.yaml").write_text("a: 1\n")
    with pytest.raises(PresetError, match=r"k .*p.yaml is a YAML file, not a PyTorch state dict of SAM weights"):
        check_sam_checkpoint(str(tmp_path / "p.yaml"), "k")
