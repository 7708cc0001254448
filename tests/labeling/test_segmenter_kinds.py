"""Segmenter kinds sam2 and sam-hq (labeling/segmenter_hf.py): tiny random teachers written by
`distillery teachers tiny --kind`, labeling through `distillery label`, label-set identity,
and the geometry oracle (tests/oracle.py) through each kind's real processor."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from distillery.engine.cli import main
from distillery.engine.images import decode
from distillery.engine.store import LabelStore, fingerprint
from distillery.labeling.kinds import build_segmenter
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import TeacherPreset, labelset_spec
from distillery.labeling.tiny import write_tiny_hf_segmenter
from tests.labeling.test_geometry import INVERSE, SAM_IMAGES, exif_oriented_inputs, gt_instances
from tests.oracle import GroundTruth, OracleSam2, OracleSamHQ

KINDS = ("sam2", "sam-hq")
ORACLES = {"sam2": OracleSam2, "sam-hq": OracleSamHQ}
#: two coco128 images: 640x426 landscape, 480x640 portrait
LABEL_IMAGES = ("000000000074.jpg", "000000000064.jpg")


@pytest.fixture(scope="module")
def kind_teachers(tmp_path_factory) -> dict:
    """kind -> preset path written by `distillery teachers tiny OUT --kind KIND`."""
    out = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(f"tiny-{kind}")
        r = CliRunner().invoke(main, ["teachers", "tiny", str(d), "--kind", kind])
        assert r.exit_code == 0, r.output
        out[kind] = d / "teachers.yaml"
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_teacher_of_kind_labels_coco128(kind, kind_teachers, coco128, tmp_path):
    preset = yaml.safe_load(kind_teachers[kind].read_text())
    assert preset["segmenter"] == {"kind": kind, "model": kind, "boxes_per_call": 32, "batch_size": 4, "actors": 1}
    store = tmp_path / "store"
    paths = [str(coco128 / "images" / f) for f in LABEL_IMAGES]
    r = CliRunner().invoke(main, ["label", *paths, "--classes", "person,dog", "--store", str(store),
                                  "--teachers", str(kind_teachers[kind]), "--runner", "local", "--quiet"])
    assert r.exit_code == 0, r.output
    ls = LabelStore(store).open()
    assert ls.id == fingerprint(labelset_spec(Ontology.from_classes(["person", "dog"]),
                                                               TeacherPreset.load(kind_teachers[kind])))
    records = sorted(ls.iter_records(), key=lambda rec: rec.path)
    assert [rec.path for rec in records] == sorted(paths) and all(rec.error is None for rec in records)
    # the stored masks are the teacher's: a fresh segmenter of the preset gives the same RLEs
    seg = build_segmenter(TeacherPreset.load(kind_teachers[kind]))
    assert type(seg).__name__ == {"sam2": "Sam2Teacher", "sam-hq": "SamHQTeacher"}[kind]
    total = 0
    for rec in records:
        w, h = Image.open(rec.path).size
        assert (rec.width, rec.height) == (w, h)
        n = len(rec.boxes)
        total += n
        masks = mask_utils.decode(rec.masks).reshape(h, w, n)  # pycocotools decodes every stored RLE
        np.testing.assert_array_equal(masks.sum(axis=(0, 1)), mask_utils.area(rec.masks))
        rles, score = seg(decode(rec.path).pixels, rec.boxes.copy())
        assert [r_["counts"] for r_ in rles] == [m["counts"] for m in rec.masks]
        np.testing.assert_allclose(rec.mask_score, score, atol=1e-6)
    assert total > 0  # the tiny detector's max_detections (20) boxes per image


def test_label_set_id_names_kind_and_weights(kind_teachers, tmp_path):
    onto = Ontology.from_classes(["person"])
    presets = {k: TeacherPreset.load(p) for k, p in kind_teachers.items()}
    sam = presets["sam2"].model_copy(deep=True)
    sam.segmenter = sam.segmenter.model_copy(update={"kind": "sam", "model": None, "model_type": "vit_tiny"})
    ids = {k: fingerprint(labelset_spec(onto, p)) for k, p in {**presets, "sam": sam}.items()}
    assert len(set(ids.values())) == 3, ids
    for k, p in presets.items():
        assert labelset_spec(onto, p)["teachers"]["segmenter"]["type"] == k
    # other weights of the same kind (seed 1): another id
    other = write_tiny_hf_segmenter("sam2", tmp_path / "sam2-seed1", seed=1)
    p = presets["sam2"].model_copy(deep=True)
    p.segmenter = p.segmenter.model_copy(update={"model": str(other)})
    assert fingerprint(labelset_spec(onto, p)) != ids["sam2"]


def _oracle(kind, kind_teachers):
    preset = TeacherPreset.load(kind_teachers[kind])
    seg = ORACLES[kind](preset.segmenter.model, device="cpu")
    seg.gt = GroundTruth()
    return seg


def _input_frame(kind, h, w):
    """(new_h, new_w) of the model's input frame, from its published preprocessing."""
    if kind == "sam2":
        return 1024, 1024  # Sam2ImageProcessor: 1024x1024, aspect ratio not kept
    s = 1024 / max(h, w)  # SAM / SAM-HQ: longest side to 1024 (ResizeLongestSide)
    return int(h * s + 0.5), int(w * s + 0.5)


def _mask_ious(seg, kind, pixels, boxes, cls, masks):
    seg.gt.add(pixels, boxes, cls, masks)
    boxes = np.asarray(boxes, np.float32)
    h, w = pixels.shape[:2]
    seg.embed(pixels)
    nh, nw = _input_frame(kind, h, w)
    np.testing.assert_allclose(seg.input_boxes(boxes).numpy(), boxes * [nw / w, nh / h, nw / w, nh / h],
                               rtol=1e-6, atol=1e-3)
    rles, score = seg(pixels, boxes)
    assert all(r["size"] == [h, w] for r in rles) and (score == 1.0).all()
    return np.diag(np.asarray(mask_utils.iou(rles, masks, [0] * len(masks))).reshape(len(masks), -1))


@pytest.mark.parametrize("kind", KINDS)
def test_oracle_geometry_of_kind(kind, kind_teachers, coco128, coco128_gt):
    """GT low-res logits in the kind's input frame, through its real box transform and mask
    post-processing, give the GT masks back (module tests/oracle.py)."""
    seg = _oracle(kind, kind_teachers)
    classes = [c["name"] for c in sorted(coco128_gt["categories"], key=lambda c: c["id"])]
    ious = []
    for im in (i for i in coco128_gt["images"] if i["id"] in SAM_IMAGES):
        d = decode(str(coco128 / "images" / im["file_name"]))
        ious.extend(_mask_ious(seg, kind, d.pixels, *gt_instances(coco128_gt, im, classes)))
    ious = np.array(ious)
    print(f"{kind} oracle on {len(ious)} instances: mask IoU median {np.median(ious):.4f} "
          f"p5 {np.percentile(ious, 5):.4f} min {ious.min():.4f}")
    assert len(ious) == 24  # 8 + 7 + 4 + 5 non-crowd instances
    assert np.median(ious) >= 0.95 and np.percentile(ious, 5) >= 0.85


@pytest.mark.parametrize("orientation", sorted(INVERSE))
@pytest.mark.parametrize("kind", KINDS)
def test_oracle_geometry_of_kind_under_exif_rotation(kind, orientation, kind_teachers, coco128, coco128_gt, tmp_path):
    """EXIF orientations 2-8 (mirrored, rotated, transposed): the decoded frame is the original
    one and the kind's masks land on the GT."""
    seg = _oracle(kind, kind_teachers)
    # 597: 640x248, far from square
    classes, (im,), _, _, (d,) = exif_oriented_inputs(coco128, coco128_gt, (597,), orientation, tmp_path)
    ious = _mask_ious(seg, kind, d.pixels, *gt_instances(coco128_gt, im, classes))
    print(f"{kind} oracle, EXIF {orientation}, {len(ious)} instances: mask IoU median {np.median(ious):.4f} min {ious.min():.4f}")
    assert len(ious) == 7 and np.median(ious) >= 0.95 and np.percentile(ious, 5) >= 0.85


def test_weights_of_another_kind_or_missing_fail_in_one_line(kind_teachers, tmp_path):
    from distillery.labeling.segmenter_hf import Sam2Teacher, SamHQTeacher

    hq_dir = str(TeacherPreset.load(kind_teachers["sam-hq"]).segmenter.model)
    with pytest.raises(ValueError, match=r"is a 'sam_hq' model, not the 'sam2' that segmenter.kind sam2 loads") as e:
        Sam2Teacher(hq_dir, device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"segmenter.model '.*no-such-dir' \(kind sam-hq\) cannot be loaded") as e:
        SamHQTeacher(str(tmp_path / "no-such-dir"), device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", KINDS)
def test_boxes_per_call_batches_give_the_same_masks(kind, kind_teachers, coco128):
    """7 boxes decoded 3 per call equal the same boxes decoded in one call; no box, no encoder."""
    preset = TeacherPreset.load(kind_teachers[kind])
    one = build_segmenter(preset)
    preset.segmenter = preset.segmenter.model_copy(update={"boxes_per_call": 3})
    three = build_segmenter(preset)
    pixels = decode(str(coco128 / "images" / LABEL_IMAGES[0])).pixels
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (7, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 300, (7, 2))], 1).astype(np.float32)
    rles1, s1 = one(pixels, boxes)
    rles3, s3 = three(pixels, boxes)
    assert len(set(mask_utils.area(rles1))) == 7  # seven different masks (random weights), not all empty
    assert [r["counts"] for r in rles1] == [r["counts"] for r in rles3]
    np.testing.assert_allclose(s1, s3, atol=1e-6)
    three.encode = None  # would raise if called
    rles, score = three(pixels, np.zeros((0, 4), np.float32))
    assert rles == [] and score.dtype == np.float32 and score.shape == (0,)
