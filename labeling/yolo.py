"""Label set -> ultralytics YOLO segmentation dataset (docs.ultralytics.com/datasets/segment/).

Layout written::

    OUT/data.yaml                    # path, train, val, names
    OUT/images/{train,val}/NAME      # hard links to the originals (copies across filesystems)
    OUT/labels/{train,val}/STEM.txt  # one line per instance: class x1 y1 x2 y2 ... (normalised)

Images are hard-linked or copied, never symlinked: ultralytics finds labels by rewriting
``/images/`` to ``/labels/`` in the *resolved* image path, so a symlink loses its labels.
A YOLO polygon holds one outline: every part and hole of a mask is joined into one
"keyhole" polygon by :func:`distillery.engine.polygons.mask_to_polygon`, the conversion the
student's training data uses too, simplified to within 0.5 px of the exact outline (coco128 GT
masks of >= 1000 px rasterised back by pycocotools: mean IoU 0.9967). Each instance is
converted once per export. The class of an instance is its argmax soft score.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import yaml
from pycocotools import mask as mask_utils

from distillery.engine.polygons import mask_to_polygon
from distillery.engine.record import LabelRecord
from distillery.engine.split import is_val
from distillery.engine.store import LabelSet


val_split = is_val  # deterministic split by image id (engine.split), shared with the student


def record_to_yolo_lines(rec: LabelRecord, min_score: float = 0.0) -> list[str]:
    """YOLO-seg label lines (``class x1 y1 ... xn yn``, coordinates normalised to [0, 1]).

    Polygons come from :func:`distillery.engine.polygons.mask_to_polygon` (continuous pixel
    coordinates at its default tolerance, divided by the image width/height); an empty mask is
    written as its box: no instance is dropped.
    """
    lines = []
    for k in range(rec.num_instances):
        if rec.box_score[k] < min_score or rec.iscrowd[k]:
            continue
        xy = mask_to_polygon(mask_utils.decode(rec.masks[k]))
        if not len(xy):
            x1, y1, x2, y2 = rec.boxes[k]
            xy = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
        xy = np.clip(xy / np.array([rec.width, rec.height], np.float32), 0.0, 1.0)
        coords = " ".join(f"{v:.6f}" for v in xy.reshape(-1))
        lines.append(f"{int(rec.scores[k].argmax())} {coords}")
    return lines


def _readable_by_ultralytics(suffix: str) -> bool:
    """Whether ultralytics' ``YOLODataset`` lists an image with this suffix (``ultralytics.data.utils.IMG_FORMATS``;
    it silently skips any other file, and its label with it)."""
    from ultralytics.data.utils import IMG_FORMATS

    return suffix.lower().lstrip(".") in IMG_FORMATS


def _convert_to_png(rec: LabelRecord, dst: Path) -> bool:
    """Write ``rec``'s image as PNG, pixels as ``label`` decodes them (EXIF orientation applied, RGB);
    False if it no longer decodes to the record's size."""
    from PIL import Image

    from distillery.engine.images import decode

    d = decode(rec.path)
    if d.pixels is None or (d.width, d.height) != (rec.width, rec.height):
        return False
    Image.fromarray(d.pixels).save(dst)
    return True


def _place(src: str, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


#: What :func:`export_yolo_seg` writes in its folder.
EXPORT_PARTS = ("images", "labels", "data.yaml")


def _is_yolo_export(out: Path) -> bool:
    """``out`` holds a ``data.yaml`` of the shape :func:`export_yolo_seg` writes."""
    try:
        data = yaml.safe_load((out / "data.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "names" in data and set(data) <= {"path", "train", "val", "names"}


def export_yolo_seg(
    labelset: LabelSet, out_dir: str | os.PathLike, val_fraction: float = 0.1, min_score: float = 0.0,
    overwrite: bool = False,
) -> dict:
    """Write the ultralytics layout for ``labelset`` (see module docstring).

    Raises:
        FileExistsError: ``out_dir`` already holds ``images/`` or ``labels/`` and not
            ``overwrite`` (stale files would pair old images with new labels); or it is a
            folder holding anything but an earlier export (never written into, even with
            ``overwrite``).

    Crowd instances are skipped (YOLO has no crowd flag). Images no longer at their
    recorded path, or no longer decoding to their recorded size, are skipped and listed in
    ``counts["missing_images"]``. Images in a format ultralytics' dataset does not list
    (suffix not in ``ultralytics.data.utils.IMG_FORMATS``, e.g. ``.gif``) are written as PNG
    (decoded pixels, EXIF orientation applied) and listed in ``counts["converted_images"]``.
    Returns counts per split.
    File names keep the original name; a second image of the same name gets
    ``_<image_id[:8]>`` appended to its stem.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; yolo-seg export writes a directory")
    stale = [d for d in (out / "images", out / "labels") if d.is_dir() and any(p.is_file() for p in d.rglob("*"))]
    if out.is_dir():  # never write into, or with --overwrite empty, a folder that is not an export
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_PARTS)
        foreign = (stale or (out / "data.yaml").exists()) and not _is_yolo_export(out)
        if others or foreign:
            what = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "") if others else \
                "images/labels without an export's data.yaml"
            raise FileExistsError(f"{out} is a folder that is not a yolo-seg export ({what}); export to a new or "
                                  "empty folder (--overwrite replaces only an earlier export)")
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset; export to a new directory or pass --overwrite")
    for d in (out / "images", out / "labels"):
        if d.is_dir():
            shutil.rmtree(d)
    counts = {"train": 0, "val": 0, "instances": 0, "missing_images": [], "converted_images": []}
    used: set[str] = set()
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    for rec in labelset.iter_records():
        if rec.error is not None:
            continue
        split = "val" if val_split(rec.image_id, val_fraction) else "train"
        src = Path(rec.path)
        if not src.is_file():
            counts["missing_images"].append(rec.path)  # moved or deleted since labeling
            continue
        stem, suffix = src.stem, src.suffix.lower()
        if stem in used:
            stem = f"{stem}_{rec.image_id[:8]}"
        if _readable_by_ultralytics(suffix):
            _place(rec.path, out / "images" / split / f"{stem}{suffix}")
        elif _convert_to_png(rec, out / "images" / split / f"{stem}.png"):
            counts["converted_images"].append(rec.path)
        else:
            counts["missing_images"].append(rec.path)  # changed since labeling: no longer its recorded size
            continue
        used.add(stem)
        lines = record_to_yolo_lines(rec, min_score)
        (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        counts[split] += 1
        counts["instances"] += len(lines)
    data = {
        "path": str(out.absolute()),
        "train": "images/train",
        "val": "images/val",
        "names": {j: c for j, c in enumerate(labelset.classes)},
    }
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return counts
