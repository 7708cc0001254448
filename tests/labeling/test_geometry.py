"""Geometry is exact: GT-derived raw model outputs through the real pipeline give GT back."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distillery.engine.images import decode
from distillery.engine.job import StageSpec, run_label_job
from distillery.engine.store import LabelStore
from distillery.labeling.coco import align_to_gt, records_to_coco, segmentation_to_rle
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import DetectStage, SegmentStage, TeacherPreset, labelset_spec
from tests.oracle import GroundTruth, OracleDetector, OracleSegmenter

pytestmark = pytest.mark.slow

# PIL.ImageOps.exif_transpose's method per orientation; the stored image is its inverse.
INVERSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


class OracleDetectStage(DetectStage):
    teacher_class = OracleDetector

    def __init__(self, preset, ontology, gt):
        super().__init__(preset, ontology)
        self.teacher.gt = gt


class OracleSegmentStage(SegmentStage):
    teacher_class = OracleSegmenter

    def __init__(self, preset, num_classes, gt):
        super().__init__(preset, num_classes)
        self.teacher.gt = gt


def gt_instances(coco: dict, image: dict, classes: list[str]):
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
    h, w = image["height"], image["width"]
    boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
    classes_ = [classes.index(cats[a["category_id"]]) for a in anns]
    masks = [segmentation_to_rle(a["segmentation"], h, w) for a in anns]
    return boxes, classes_, masks


def run_oracle(paths, gt, onto, tiny_teachers, store):
    preset = TeacherPreset.load(tiny_teachers)
    preset.detector.max_detections = 300  # the tiny preset caps boxes at 20; coco128 has up to ~60 per image
    ls = LabelStore(store).create(labelset_spec(onto, preset))
    pd = preset.to_dict()
    stages = [
        StageSpec(OracleDetectStage, {"preset": pd, "ontology": onto.to_dict(), "gt": gt}, batch_size=4),
        StageSpec(OracleSegmentStage, {"preset": pd, "num_classes": len(onto.classes), "gt": gt}, batch_size=4),
    ]
    summary = run_label_job(paths, ls, stages, runner="local", progress=False)
    assert summary.processed == len(paths) and not summary.errors
    return records_to_coco(ls.iter_records(), ls.classes)


def evaluate(pred: dict, gt_coco: dict, image_ids: list[int]):
    """box AP (COCOeval stats[0]) and the IoU of each non-crowd GT mask with its best prediction."""
    gt = COCO()
    gt.dataset = copy.deepcopy({k: gt_coco[k] for k in ("images", "annotations", "categories")})
    gt.createIndex()
    res = gt.loadRes(align_to_gt(pred, gt_coco, "bbox"))
    ev = COCOeval(gt, res, "bbox")
    ev.params.imgIds = image_ids
    ev.evaluate(), ev.accumulate(), ev.summarize()
    segm = align_to_gt(pred, gt_coco, "segm")
    ious = []
    for i in image_ids:
        g = [a for a in gt.imgToAnns[i] if not a["iscrowd"]]
        p = [r["segmentation"] for r in segm if r["image_id"] == i]
        if not g:
            continue
        assert p, f"image {i}: no predicted masks"
        im = gt.imgs[i]
        grles = [segmentation_to_rle(a["segmentation"], im["height"], im["width"]) for a in g]
        iou = mask_utils.iou(p, grles, [0] * len(grles))
        ious.extend(np.asarray(iou).max(axis=0).tolist())
    return ev.stats[0], np.array(ious)


def test_coco128_geometry_is_exact(coco128, coco128_gt, tiny_teachers, tmp_path):
    classes = [c["name"] for c in sorted(coco128_gt["categories"], key=lambda c: c["id"])]
    onto = Ontology.from_classes(classes)
    gt = GroundTruth()
    paths = []
    for im in coco128_gt["images"]:
        path = str(coco128 / "images" / im["file_name"])
        d = decode(path)
        assert (d.width, d.height) == (im["width"], im["height"])
        gt.add(d.pixels, *gt_instances(coco128_gt, im, classes))
        paths.append(path)
    pred = run_oracle(paths, gt, onto, tiny_teachers, tmp_path / "store")
    ap, ious = evaluate(pred, coco128_gt, [im["id"] for im in coco128_gt["images"]])
    print(f"coco128 geometry: box AP {ap:.4f}, mask IoU median {np.median(ious):.4f} mean {ious.mean():.4f}")
    assert ap >= 0.99, ap
    assert np.median(ious) >= 0.95, np.median(ious)
    # soft vectors: one column per class, the GT class on top
    for a in pred["annotations"][:50]:
        assert len(a["soft_scores"]) == 80
        assert np.argmax(a["soft_scores"]) + 1 == a["category_id"]


@pytest.mark.parametrize("orientation", sorted(INVERSE))
def test_exif_orientations_keep_geometry(orientation, coco128, coco128_gt, tiny_teachers, tmp_path):
    classes = [c["name"] for c in sorted(coco128_gt["categories"], key=lambda c: c["id"])]
    onto = Ontology.from_classes(classes)
    images = [im for im in coco128_gt["images"] if any(a["image_id"] == im["id"] for a in coco128_gt["annotations"])][:8]
    gt, paths = GroundTruth(), []
    (tmp_path / "img").mkdir()
    for im in images:
        src = Image.open(coco128 / "images" / im["file_name"])
        stored = src.transpose(INVERSE[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = tmp_path / "img" / im["file_name"]
        stored.save(out, quality=95, subsampling=0, exif=exif.tobytes())
        d = decode(str(out))
        assert (d.width, d.height) == (im["width"], im["height"]), "EXIF orientation not applied"
        diff = np.abs(d.pixels.astype(int) - np.asarray(src.convert("RGB"), int)).mean()
        assert diff < 5.0, f"decoded pixels differ from the original frame (mean abs {diff:.1f})"
        gt.add(d.pixels, *gt_instances(coco128_gt, im, classes))
        paths.append(str(out))
    pred = run_oracle(paths, gt, onto, tiny_teachers, tmp_path / "store")
    ap, ious = evaluate(pred, coco128_gt, [im["id"] for im in images])
    print(f"EXIF {orientation}: box AP {ap:.4f}, mask IoU median {np.median(ious):.4f}")
    assert ap >= 0.99, ap
    assert np.median(ious) >= 0.95, np.median(ious)
