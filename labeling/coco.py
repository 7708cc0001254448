"""COCO instances <-> label records (pure converters) and COCO import/export of label sets.

COCO conventions at this boundary (cocodataset.org/#format-data): ``bbox`` is
``[x, y, width, height]`` in absolute pixels; ``segmentation`` is polygons or RLE
(uncompressed ``counts`` lists for crowds, or compressed strings); category ids are
arbitrary integers. Inside Distillery boxes are xyxy and classes are ontology indices;
the mapping happens here only.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
from pycocotools import mask as mask_utils

from distillery.engine.cocofile import (  # noqa: F401 - CocoError, segmentation_to_rle are re-exported
    CocoError, annotation_geometry, annotation_name, category_order, image_name, segmentation_to_rle,
    unmatchable, validate_instances,
)
from distillery.engine.images import content_id, exif_size
from distillery.engine.record import LabelRecord
from distillery.engine.store import LabelSet, LabelStore
from distillery.labeling.ontology import Ontology


def records_to_coco(records: Iterable[LabelRecord], classes: list[str], min_score: float = 0.0) -> dict:
    """Label records -> a COCO instances dict.

    Images get ids 1..M in record order (``file_name`` = the record's path, plus
    ``distillery_image_id``); categories ids 1..C in ontology order with the class names.
    Each annotation carries ``bbox`` (xywh px), compressed-RLE ``segmentation`` (counts as
    str), ``area`` (mask pixels), ``iscrowd``, ``score`` (= box_score), ``soft_scores``
    (the full per-class vector), ``mask_score``. Error records are skipped; instances with
    ``box_score < min_score`` are dropped.
    """
    out = {
        "info": {"description": "Distillery label set export"},
        "images": [],
        "annotations": [],
        "categories": [{"id": j + 1, "name": c, "supercategory": ""} for j, c in enumerate(classes)],
    }
    ann_id = 0
    for rec in records:
        if rec.error is not None:
            continue
        img_id = len(out["images"]) + 1
        out["images"].append(
            {"id": img_id, "file_name": rec.path, "width": rec.width, "height": rec.height,
             "distillery_image_id": rec.image_id}
        )
        areas = mask_utils.area(rec.masks) if rec.num_instances else []
        for k in range(rec.num_instances):
            if rec.box_score[k] < min_score:
                continue
            x1, y1, x2, y2 = (float(v) for v in rec.boxes[k])
            ann_id += 1
            out["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": img_id,
                    "category_id": int(rec.scores[k].argmax()) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(areas[k]),
                    "segmentation": {"size": list(rec.masks[k]["size"]), "counts": rec.masks[k]["counts"].decode("ascii")},
                    "iscrowd": int(rec.iscrowd[k]),
                    "score": float(rec.box_score[k]),
                    "soft_scores": [round(float(s), 6) for s in rec.scores[k]],
                    "mask_score": float(rec.mask_score[k]),
                }
            )
    return out


def validate_coco(coco: dict) -> None:
    """Check the structure an instances file needs before anything is imported
    (:func:`distillery.engine.cocofile.validate_instances`: the same rules evaluation applies).

    Raises:
        CocoError: naming the first offending entry by position and id.
    """
    validate_instances(coco)


def coco_to_records(coco: dict, images_dir: str | os.PathLike, classes: list[str] | None = None):
    """COCO instances dict -> (ontology classes, label records) with score 1.0, one-hot soft
    vectors, ``mask_score`` 1.0 and ``iscrowd`` kept.

    Each image is opened (header only) for its content hash and EXIF-corrected size; an
    image that is missing, unreadable, or whose size differs from the COCO ``width`` x
    ``height`` becomes an error record (its annotations are counted in
    ``stats["dropped_annotations"]``). Annotations without a segmentation get the box as
    their mask (``stats["box_masks"]``); a malformed segmentation is an error.

    Boxes are clipped to the frame and polygons clipped before they are rasterised
    (:func:`distillery.engine.cocofile.annotation_geometry`, the same geometry evaluation uses);
    ids of any form are accepted as :func:`validate_coco` allows (they are not stored).

    Returns:
        ``(classes, records, stats)``; classes are the category names in id order (integer ids
        numerically, then string ids).

    Raises:
        CocoError: naming the entry: a structural fault (:func:`validate_coco`), two categories
            sharing a name, or an annotation that cannot be rasterised or has no area in its image.
    """
    validate_coco(coco)
    cats = category_order(coco["categories"])
    images, anns = coco["images"], coco["annotations"]
    names = [c["name"] for c in cats]
    classes = classes or names
    col = {c["id"]: classes.index(c["name"]) for c in cats}
    C = len(classes)
    by_image = defaultdict(list)
    for i, a in enumerate(anns):
        by_image[a["image_id"]].append((i, a))
    stats = {"box_masks": 0, "crowd": 0, "dropped_annotations": 0}
    records = []
    base = Path(images_dir)
    for n, im in enumerate(images):
        path = str((base / im["file_name"]).absolute())
        image_id, failure = "", None
        try:
            with open(path, "rb") as f:
                image_id = content_id(f.read())
            w, h = exif_size(path)
            if (w, h) != (im["width"], im["height"]):
                failure = f"size-mismatch: image is {w}x{h}, COCO says {im['width']}x{im['height']}"
        except FileNotFoundError:
            failure = "missing: file not found"
        except OSError as e:
            failure = f"unreadable: {e.strerror or e}" if not image_id else f"not-an-image: {e}"
        except Exception as e:  # noqa: BLE001 - Pillow raises several types for non-images
            failure = f"not-an-image: {e}"
        if failure is not None:
            records.append(LabelRecord.failed(path, failure, C, image_id))
            stats["dropped_annotations"] += len(by_image.get(im["id"], []))
            continue
        boxes, scores, masks, crowd = [], [], [], []
        for i, a in by_image.get(im["id"], []):
            try:
                box, rle, box_mask = annotation_geometry(a, h, w)
                why = unmatchable(a, box, rle)
                if why:
                    raise CocoError(f"{why}: no prediction could match it; remove the annotation or fix its coordinates")
            except CocoError as e:
                raise CocoError(f"{annotation_name(i, a)} of {image_name(n, im)}: {e}") from None
            stats["box_masks"] += int(box_mask)
            onehot = np.zeros(C, np.float32)
            onehot[col[a["category_id"]]] = 1.0
            boxes.append(box)
            scores.append(onehot)
            masks.append(rle)
            crowd.append(bool(a.get("iscrowd", 0)))
            stats["crowd"] += int(crowd[-1])
        records.append(LabelRecord(
            image_id=image_id, path=path, width=w, height=h, num_classes=C,
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4), scores=np.asarray(scores, np.float32).reshape(-1, C),
            masks=masks, iscrowd=np.asarray(crowd, bool),
        ))
    return classes, records, stats


def load_coco(path: str | os.PathLike) -> dict:
    """Read a COCO JSON file. Raises :class:`CocoError` naming the file on bad JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise CocoError(f"COCO file {str(path)!r} not found") from e
    except ValueError as e:
        raise CocoError(f"{path}: invalid JSON ({e})") from e


def import_coco(store: LabelStore, coco_path: str, images_dir: str, shard_size: int = 256,
                name: str | None = None) -> tuple[LabelSet, dict]:
    """Import a COCO instances file as a label set (kind ``import``), keyed by the file's hash.

    Re-importing the same file into the same store reopens the same label set and adds
    nothing. ``name`` (e.g. ``coco128-gt``) names the label set; see
    :meth:`distillery.engine.store.LabelStore.create` for names on a rerun. Returns the label
    set and import stats (images, instances, crowd, errors).

    Raises:
        CocoError: the file is not a COCO instances file, or none of its images is in
            ``images_dir`` (nothing is created then).
        ValueError / StoreError: a bad or taken name.
    """
    from distillery.labeling.teachers import file_sha256

    coco = load_coco(coco_path)
    validate_coco(coco)
    base = Path(images_dir)
    if coco["images"] and not any(os.path.lexists(base / im["file_name"]) for im in coco["images"]):
        raise CocoError(
            f"none of the {len(coco['images'])} images of {coco_path} is in {images_dir} (e.g. "
            f"{base / coco['images'][0]['file_name']} does not exist); give the folder its file_name entries are "
            "relative to"
        )
    classes, records, stats = coco_to_records(coco, images_dir)
    spec = {
        "kind": "import",
        "ontology": Ontology.from_classes(classes).to_dict(),
        "teachers": {"import": {"format": "coco", "file": Path(coco_path).name, "sha256": file_sha256(coco_path)}},
        "preprocessing": {"decode": "pillow-exif_transpose-rgb", "images_dir": str(Path(images_dir).absolute())},
        "thresholds": {},
    }
    ls = store.create(spec, extra={"coco_categories": [{"id": c["id"], "name": c["name"]} for c in coco["categories"]]},
                      name=name)
    added = 0
    with ls.writer(shard_size) as w:
        for r in records:
            if r.path not in w.done_paths:
                w.add(r.to_row())
                added += 1
    stats.update(images=len(records), added=added, instances=sum(r.num_instances for r in records),
                 errors=sum(r.error is not None for r in records))
    return ls, stats


def align_to_gt(pred: dict, gt: dict, iou_type: str = "segm") -> list[dict]:
    """Predictions exported by :func:`records_to_coco` as a ``COCO.loadRes`` results list in
    the ids of ground truth ``gt``: images matched by file basename, categories by name.

    ``iou_type="bbox"`` drops the segmentation so that ``loadRes`` keeps the boxes as given;
    ``"segm"`` keeps both. Predictions on images or classes absent from ``gt`` are dropped.
    """
    gt_img = {os.path.basename(im["file_name"]): im["id"] for im in gt["images"]}
    gt_cat = {c["name"]: c["id"] for c in gt["categories"]}
    img_map = {im["id"]: gt_img.get(os.path.basename(im["file_name"])) for im in pred["images"]}
    cat_map = {c["id"]: gt_cat.get(c["name"]) for c in pred["categories"]}
    out = []
    for a in pred["annotations"]:
        i, c = img_map.get(a["image_id"]), cat_map.get(a["category_id"])
        if i is None or c is None:
            continue
        r = {"image_id": i, "category_id": c, "score": a["score"], "bbox": a["bbox"]}
        if iou_type == "segm":
            r["segmentation"] = a["segmentation"]
        out.append(r)
    return out
