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

from distillery.engine.images import content_id, exif_size
from distillery.engine.record import LabelRecord
from distillery.engine.store import LabelSet, LabelStore
from distillery.labeling.ontology import Ontology


class CocoError(ValueError):
    """A COCO file is malformed or does not match its images."""


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


def segmentation_to_rle(segm, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE
    ``{"size": [height, width], "counts": bytes}`` (``pycocotools.mask.frPyObjects`` + ``merge``).

    Raises:
        CocoError: an empty or malformed segmentation.
    """
    try:
        if isinstance(segm, list):
            polys = [p for p in segm if len(p) >= 6]
            if not polys:
                raise CocoError("polygon segmentation with fewer than 3 points")
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, height, width)
        elif isinstance(segm, dict):
            counts = segm["counts"]
            rle = {"size": list(segm["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise CocoError(f"unknown segmentation type {type(segm).__name__}")
    except (KeyError, TypeError, IndexError) as e:
        raise CocoError(f"malformed segmentation ({e})") from e
    if list(rle["size"]) != [height, width]:
        raise CocoError(f"segmentation size {list(rle['size'])} != image [height, width] {[height, width]}")
    try:
        area = int(mask_utils.area({"size": [height, width], "counts": rle["counts"]}))
    except Exception as e:  # noqa: BLE001 - pycocotools raises several types for bad counts
        raise CocoError(f"RLE counts cannot be decoded ({e})") from e
    if not 0 <= area <= height * width:
        raise CocoError(f"RLE counts are corrupt: area {area} outside [0, {height * width}]")
    return {"size": [int(height), int(width)], "counts": rle["counts"]}


def validate_coco(coco: dict) -> None:
    """Check the structure an instances file needs before anything is imported.

    Raises:
        CocoError: naming the first offending entry: a missing ``images``, ``annotations``
            or ``categories`` list; an image without ``id``/``file_name``/``width``/``height``;
            an annotation without ``image_id``/``category_id``/``bbox`` of 4 numbers, or whose
            image or category id is not defined.
    """
    if not isinstance(coco, dict):
        raise CocoError("not a COCO instances file: the top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise CocoError(f"not a COCO instances file: missing the '{key}' list")
    for c in coco["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise CocoError(f"category {c!r} needs 'id' and 'name'")
    for im in coco["images"]:
        missing = [k for k in ("id", "file_name", "width", "height") if not isinstance(im, dict) or k not in im]
        if missing:
            raise CocoError(f"image {im.get('id', im) if isinstance(im, dict) else im!r} lacks {', '.join(missing)}")
    image_ids = {im["id"] for im in coco["images"]}
    if len(image_ids) != len(coco["images"]):
        seen, dup = set(), None
        for im in coco["images"]:
            if im["id"] in seen:
                dup = im["id"]
                break
            seen.add(im["id"])
        raise CocoError(f"image id {dup} is given to several images; ids must be unique")
    cat_ids = {c["id"] for c in coco["categories"]}
    for a in coco["annotations"]:
        aid = a.get("id", "?") if isinstance(a, dict) else a
        missing = [k for k in ("image_id", "category_id", "bbox") if not isinstance(a, dict) or k not in a]
        if missing:
            raise CocoError(f"annotation {aid} lacks {', '.join(missing)}")
        if a["image_id"] not in image_ids:
            raise CocoError(f"annotation {aid} refers to image_id {a['image_id']}, which 'images' does not define")
        if a["category_id"] not in cat_ids:
            raise CocoError(f"annotation {aid} refers to category_id {a['category_id']}, which 'categories' does not define")
        bb = a["bbox"]
        if not (isinstance(bb, list) and len(bb) == 4 and all(isinstance(v, (int, float)) for v in bb)):
            raise CocoError(f"annotation {aid}: bbox must be [x, y, width, height], got {bb!r}")


def coco_to_records(coco: dict, images_dir: str | os.PathLike, classes: list[str] | None = None):
    """COCO instances dict -> (ontology classes, label records) with score 1.0, one-hot soft
    vectors, ``mask_score`` 1.0 and ``iscrowd`` kept.

    Each image is opened (header only) for its content hash and EXIF-corrected size; an
    image that is missing, unreadable, or whose size differs from the COCO ``width`` x
    ``height`` becomes an error record (its annotations are counted in
    ``stats["dropped_annotations"]``). Annotations without a segmentation get the box as
    their mask (``stats["box_masks"]``); a malformed segmentation is an error.

    Returns:
        ``(classes, records, stats)``; classes are the category names in id order.

    Raises:
        CocoError: the dict lacks ``images``/``annotations``/``categories``, or two
            categories share a name.
    """
    validate_coco(coco)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    images, anns = coco["images"], coco["annotations"]
    names = [c["name"] for c in cats]
    if len(set(names)) != len(names):
        raise CocoError("two categories share a name; class names must be unique")
    classes = classes or names
    col = {c["id"]: classes.index(c["name"]) for c in cats}
    C = len(classes)
    by_image = defaultdict(list)
    for a in anns:
        by_image[a["image_id"]].append(a)
    stats = {"box_masks": 0, "crowd": 0, "dropped_annotations": 0}
    records = []
    base = Path(images_dir)
    for im in images:
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
        for a in by_image.get(im["id"], []):
            x, y, bw, bh = a["bbox"]
            x1, y1 = np.clip([x, y], 0, [w, h])
            x2, y2 = np.clip([x + bw, y + bh], 0, [w, h])
            if a.get("segmentation") in (None, [], {}):
                box = mask_utils.frPyObjects([[x1, y1, x2, y1, x2, y2, x1, y2]], h, w)
                rle = {"size": [h, w], "counts": mask_utils.merge(box)["counts"]}
                stats["box_masks"] += 1
            else:
                try:
                    rle = segmentation_to_rle(a["segmentation"], h, w)
                except CocoError as e:
                    raise CocoError(f"annotation {a.get('id', '?')} (image {im['file_name']}): {e}") from e
            onehot = np.zeros(C, np.float32)
            onehot[col[a["category_id"]]] = 1.0
            boxes.append([x1, y1, x2, y2])
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
