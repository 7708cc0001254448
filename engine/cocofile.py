"""COCO instances files at the pycocotools boundary: checks that name the offending entry,
segmentations rasterised safely, and ids renumbered before pycocotools sees them.

Shared by ``labels import`` (:mod:`distillery.labeling.coco`) and evaluation
(:mod:`distillery.engine.evaluation`), so a file is accepted or refused the same way by both.

Why each rule exists (pycocotools 2.0.11, measured):

- Ids. ``COCOeval.evaluateImg`` records a match by writing the matched GT annotation's id into
  ``dtMatches``, and ``accumulate`` counts a detection as a true positive where that value is
  non-zero: a GT annotation with id 0 is never a true positive (tests/labeling/test_coco_ids.py's
  GT with annotation ids 0, 1, 2 scored 0.626 against itself, duplicated ids 0.168). ``COCO.createIndex`` keys annotations by id, so duplicated ids
  overwrite each other; string ids cannot be written into those float arrays; mixed string and
  integer ids cannot be sorted. Ids in the wild are 0-based, duplicated, strings, mixed, huge or
  missing, so :func:`for_pycocotools` renumbers images, categories and annotations 1..N and no
  id from a file ever reaches pycocotools. Image and category ids must still be unique integers
  or strings (annotations refer to them); annotation ids are only used in messages.
- Polygons. pycocotools' ``rleFrPoly`` walks every polygon edge at 5x resolution, so a vertex at
  x = 2e8 allocates about 1e9 points and kills the process (segfault or out of memory), and a NaN
  vertex segfaults. Non-finite coordinates are refused; a polygon with a vertex outside the window
  ``[-W, 2W] x [-H, 2H]`` around the frame is clipped to that window first (Sutherland-Hodgman,
  matplotlib's ``Path.clip_to_bbox``), which leaves the in-frame pixels unchanged and bounds
  every edge by three frame diagonals. Polygons inside the window are passed on untouched.
- RLE. pycocotools' ``decode`` fills only the pixels the runs cover and leaves the rest of the
  mask uninitialised: compressed counts whose runs do not sum to height * width are refused
  (:func:`compressed_runs`), as are uncompressed ones.

Coordinates are COCO's: absolute pixels, ``bbox`` ``[x, y, width, height]``, polygons flat
``[x1, y1, x2, y2, ...]``, RLE ``size`` ``[height, width]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
from pycocotools import mask as mask_utils


class CocoError(ValueError):
    """A COCO file is malformed or does not match its images; the message names the entry."""


def _is_id(v) -> bool:
    return (isinstance(v, Integral) and not isinstance(v, bool)) or (isinstance(v, str) and v != "")


def _id_order(v):
    """Sort key for ids that may mix integers and strings: integers first (numeric), then strings."""
    return (0, int(v), "") if isinstance(v, Integral) else (1, 0, str(v))


def image_name(i: int, im) -> str:
    """``image #i (id X, 'file_name')`` for messages (``i`` is the 0-based position in ``images``)."""
    if not isinstance(im, dict):
        return f"image #{i}"
    return f"image #{i} (id {im.get('id')!r}, {im.get('file_name')!r})"


def annotation_name(i: int, a) -> str:
    """``annotation #i (id X)`` for messages (``i`` is the 0-based position in ``annotations``)."""
    if isinstance(a, dict) and "id" in a:
        return f"annotation #{i} (id {a['id']!r})"
    return f"annotation #{i} (no id)"


def _ref_hint(v, defined: set) -> str:
    other = str(v) if isinstance(v, Integral) else (int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else None)
    if other is not None and other in defined:
        return f" (it defines {other!r}: an integer and a string id differ)"
    return ""


def validate_instances(coco) -> None:
    """Check everything an instances dict needs before import or evaluation.

    Checks: ``images``, ``annotations``, ``categories`` lists; images with ``id``, a non-empty
    string ``file_name`` and positive integer ``width``/``height``; categories with ``id`` and ``name``; image and
    category ids unique, each an integer or a non-empty string (not a bool or float); category
    names unique non-empty strings; every
    annotation with ``image_id``/``category_id`` that are defined, a ``bbox`` of 4 finite numbers
    with non-negative width and height, and a segmentation (if any) that is a list of polygons
    (even-length lists of finite numbers) or an RLE dict whose ``size`` is its image's
    ``[height, width]``. Annotation ids are not checked: they are renumbered (module docstring).

    Raises:
        CocoError: naming the first offending entry by position and id, and what to fix.
    """
    if not isinstance(coco, dict):
        raise CocoError("not a COCO instances file: the top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise CocoError(f"not a COCO instances file: missing the '{key}' list")
    cat_ids, cat_names = set(), set()
    for i, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise CocoError(f"category #{i} {c!r} needs 'id' and 'name'")
        if not isinstance(c["name"], str) or not c["name"]:
            raise CocoError(f"category #{i} (id {c['id']!r}): name {c['name']!r} must be a non-empty string")
        if not _is_id(c["id"]):
            raise CocoError(f"category #{i} ({c['name']!r}): id {c['id']!r} must be an integer or a non-empty string")
        if c["id"] in cat_ids:
            raise CocoError(f"category id {c['id']!r} is given to several categories (#{i}, {c['name']!r}); ids must be unique")
        if c["name"] in cat_names:
            raise CocoError(f"category name {c['name']!r} is given to several categories (#{i}, id {c['id']!r}); classes "
                            "are matched by name, so names must be unique")
        cat_ids.add(c["id"])
        cat_names.add(c["name"])
    sizes, file_names = {}, {}
    for i, im in enumerate(coco["images"]):
        missing = [k for k in ("id", "file_name", "width", "height") if not isinstance(im, dict) or k not in im]
        if missing:
            raise CocoError(f"{image_name(i, im)} lacks {', '.join(missing)}")
        if not _is_id(im["id"]):
            raise CocoError(f"{image_name(i, im)}: id must be an integer or a non-empty string")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise CocoError(f"{image_name(i, im)}: file_name must be a non-empty string")
        if im["id"] in sizes:
            raise CocoError(f"image id {im['id']!r} is given to several images ({image_name(i, im)}); ids must be unique")
        if im["file_name"] in file_names:  # one file, two entries: one entry's annotations would be lost
            raise CocoError(f"file_name {im['file_name']!r} is given to several images (ids {file_names[im['file_name']]!r} "
                            f"and {im['id']!r}); merge their annotations under one image entry")
        file_names[im["file_name"]] = im["id"]
        w, h = im["width"], im["height"]
        if not all(isinstance(v, Integral) and not isinstance(v, bool) and v > 0 for v in (w, h)):
            raise CocoError(f"{image_name(i, im)}: width and height must be positive integers, got {w!r} x {h!r}")
        sizes[im["id"]] = (int(h), int(w))
    for i, a in enumerate(coco["annotations"]):
        name = annotation_name(i, a)
        missing = [k for k in ("image_id", "category_id", "bbox") if not isinstance(a, dict) or k not in a]
        if missing:
            raise CocoError(f"{name} lacks {', '.join(missing)}")
        if not _is_id(a["image_id"]) or a["image_id"] not in sizes:
            raise CocoError(f"{name} refers to image_id {a['image_id']!r}, which 'images' does not define"
                            + _ref_hint(a["image_id"], set(sizes)))
        if not _is_id(a["category_id"]) or a["category_id"] not in cat_ids:
            raise CocoError(f"{name} refers to category_id {a['category_id']!r}, which 'categories' does not define"
                            + _ref_hint(a["category_id"], cat_ids))
        bb = a["bbox"]
        if not (isinstance(bb, list) and len(bb) == 4 and all(_finite(v) for v in bb) and bb[2] >= 0 and bb[3] >= 0):
            raise CocoError(f"{name}: bbox must be [x, y, width, height] of finite numbers with width, height >= 0, "
                            f"got {bb!r}")
        segm = a.get("segmentation")
        if segm not in (None, [], {}):
            try:
                check_segmentation(segm, *sizes[a["image_id"]])
            except CocoError as e:
                raise CocoError(f"{name}: {e}") from None


def _finite(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def check_segmentation(segm, height: int, width: int) -> None:
    """Structure of one segmentation: polygons as even-length lists of finite numbers, or an RLE
    dict with ``counts`` (list or str) and ``size == [height, width]``.

    Raises:
        CocoError: what is wrong (without the annotation's name; callers add it).
    """
    if isinstance(segm, list):
        for k, p in enumerate(segm):
            if not isinstance(p, list) or len(p) % 2 or not all(_finite(v) for v in p):
                shown = p if not isinstance(p, list) or len(p) <= 8 else p[:8] + ["..."]
                raise CocoError(f"polygon {k} must be an even-length list [x1, y1, x2, y2, ...] of finite numbers, "
                                f"got {shown!r}")
    elif isinstance(segm, dict):
        if not isinstance(segm.get("counts"), (list, str, bytes)) or "size" not in segm:
            raise CocoError("RLE segmentation needs 'counts' (a list or a string) and 'size'")
        if not isinstance(segm["size"], list) or list(segm["size"]) != [height, width]:
            raise CocoError(f"segmentation size {segm['size']!r} != image [height, width] {[height, width]}")
    else:
        raise CocoError(f"unknown segmentation type {type(segm).__name__} (polygons or RLE)")


def clip_polygon(poly, height: int, width: int) -> list[list[float]]:
    """One flat COCO polygon (absolute pixels) -> polygons whose vertices all lie in the window
    ``[-width, 2 * width] x [-height, 2 * height]`` (module docstring), covering the same
    in-frame pixels.

    A polygon already inside the window is returned unchanged (``[poly]``); one entirely outside
    gives ``[]``. Coordinates must be finite (:func:`check_segmentation`).
    """
    xy = np.asarray(poly, np.float64).reshape(-1, 2)
    lo, hi = np.array([-width, -height], np.float64), np.array([2 * width, 2 * height], np.float64)
    if ((xy >= lo) & (xy <= hi)).all():
        return [list(poly)]
    from matplotlib.path import Path as MplPath
    from matplotlib.transforms import Bbox

    ring = MplPath(np.vstack([xy, xy[:1]]), closed=True)
    clipped = ring.clip_to_bbox(Bbox([lo, hi]), inside=True)
    out = []
    for q in clipped.to_polygons(closed_only=False):
        q = np.clip(q, lo, hi)  # the clipper's float rounding may leave a hair outside
        if len(q) >= 3:
            out.append(q.reshape(-1).tolist())
    return out


def compressed_runs(counts: bytes) -> list[int]:
    """The run lengths (zeros first, alternating) of a compressed COCO RLE ``counts`` string.

    The decoding loop of pycocotools' ``rleFrString`` (``common/maskApi.c``): 6-bit characters
    offset by 48, 5 value bits each, bit 0x20 continues a number, bit 0x10 of its last
    character is the sign; from the fourth run on a value is a delta to the run two before.
    pycocotools exposes no run lengths, and its ``decode`` leaves memory uninitialised when
    the runs fall short of height * width: this is how the total is checked first.

    Raises:
        CocoError: a character outside ``'0'..'o'`` or a number cut off at the end.
    """
    runs, p, n = [], 0, len(counts)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                raise CocoError("compressed RLE counts end inside a number")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise CocoError(f"compressed RLE counts hold {chr(counts[p])!r}, outside '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def segmentation_to_rle(segm, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE
    ``{"size": [height, width], "counts": bytes}`` over the full frame
    (``pycocotools.mask.frPyObjects`` + ``merge``), with polygons clipped (:func:`clip_polygon`)
    before they are rasterised. Polygons with fewer than 3 points are skipped as pycocotools'
    ``annToRLE`` would keep them (a degenerate line); a polygon lying outside the frame gives
    an empty mask, as it would in pycocotools.

    Raises:
        CocoError: a malformed segmentation (:func:`check_segmentation`), no polygon of 3 or more
            points, or RLE counts that do not decode to ``height * width`` pixels.
    """
    check_segmentation(segm, height, width)
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            raise CocoError("polygon segmentation with fewer than 3 points")
        polys = [q for p in polys for q in clip_polygon(p, height, width)]
        if not polys:
            return {"size": [int(height), int(width)], "counts": mask_utils.encode(np.zeros((height, width), np.uint8,
                                                                                              order="F"))["counts"]}
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm["counts"], list):
        if not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 0 for v in segm["counts"]):
            raise CocoError("uncompressed RLE counts must be non-negative integers")
        if sum(segm["counts"]) != height * width:
            raise CocoError(f"uncompressed RLE counts sum to {sum(segm['counts'])}, not height * width = {height * width}")
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        counts = segm["counts"]
        if isinstance(counts, str) and not counts.isascii():
            raise CocoError("compressed RLE counts must be an ASCII string")
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        try:
            runs = compressed_runs(rle["counts"])
        except CocoError as e:
            raise CocoError(f"RLE counts cannot be decoded: {e}") from None
        if min(runs, default=0) < 0 or sum(runs) != height * width:
            raise CocoError(f"RLE counts cannot be decoded: runs sum to {sum(runs)} (negative runs: "
                            f"{sum(r < 0 for r in runs)}), not height * width = {height * width}")
    try:
        area = int(mask_utils.area({"size": [height, width], "counts": rle["counts"]}))
    except Exception as e:  # noqa: BLE001 - pycocotools raises several types for bad counts
        raise CocoError(f"RLE counts cannot be decoded ({e})") from e
    if not 0 <= area <= height * width:
        raise CocoError(f"RLE counts are corrupt: area {area} outside [0, {height * width}]")
    return {"size": [int(height), int(width)], "counts": rle["counts"]}


def annotation_geometry(a: dict, height: int, width: int) -> tuple[list[float], dict, bool]:
    """An annotation's box and mask in the frame, as import and evaluation both use them.

    The box is clipped to ``[0, width] x [0, height]``; the mask is the segmentation
    (:func:`segmentation_to_rle`), or the clipped box when the annotation has none.

    Returns:
        ``(xyxy, rle, box_mask)``: float box xyxy in absolute pixels, compressed RLE
        (``counts`` bytes, ``size`` ``[height, width]``), and whether the mask was made from the box.

    Raises:
        CocoError: a malformed segmentation.
    """
    x, y, bw, bh = (float(v) for v in a["bbox"])
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + bw, 0.0), width), min(max(y + bh, 0.0), height)
    segm = a.get("segmentation")
    box_mask = segm in (None, [], {})
    if box_mask:
        rle = mask_utils.merge(mask_utils.frPyObjects([[x1, y1, x2, y1, x2, y2, x1, y2]], height, width))
        rle = {"size": [int(height), int(width)], "counts": rle["counts"]}
    else:
        rle = segmentation_to_rle(segm, height, width)
    return [x1, y1, x2, y2], rle, box_mask


def unmatchable(a: dict, xyxy: list[float], rle: dict) -> str | None:
    """Why no prediction can ever match this GT instance (IoU 0 with anything), or None.

    A box with no area inside the frame, or a mask with no pixel in it, counts as a miss for
    every model in ``COCOeval``.
    """
    x1, y1, x2, y2 = xyxy
    h, w = rle["size"]
    if x2 <= x1 or y2 <= y1:
        return f"bbox {a['bbox']!r} has no area inside the {w}x{h} image"
    if not mask_utils.area(rle):
        return f"its segmentation covers no pixel of the {w}x{h} image"
    return None


@dataclass
class PycocoGT:
    """What :func:`for_pycocotools` returns.

    Attributes:
        dataset: the renumbered COCO dict for ``pycocotools.coco.COCO``.
        image_map, category_map: original id -> new id (only kept images in ``image_map``).
        unmatchable: ``"annotation #i (id X): why"`` for GT instances no prediction can match
            (:func:`unmatchable`); they stay in ``dataset`` and count as misses, as in COCOeval.
    """

    dataset: dict
    image_map: dict
    category_map: dict
    unmatchable: list[str] = field(default_factory=list)


def for_pycocotools(coco: dict, image_ids=None) -> PycocoGT:
    """A validated copy of ``coco`` that pycocotools' ``COCO``/``COCOeval`` score correctly.

    Images, categories and annotations get ids 1..N (images and annotations in file order,
    categories in :func:`category_order`). Boxes are clipped to the frame and every annotation
    gets a compressed RLE ``segmentation`` (``counts`` str) from :func:`annotation_geometry`,
    exactly as ``labels import`` stores it, so pycocotools rasterises nothing itself; ``area`` is
    kept when given, else the mask's pixel count; a missing ``iscrowd`` is 0 (as import reads it;
    ``COCOeval.computeIoU`` raises KeyError without it). Each new annotation keeps its original id, if
    it had one, as ``source_id``. The input is not modified.

    Args:
        coco: COCO instances dict.
        image_ids: keep only these images (original ids) and their annotations; None: all.

    Raises:
        CocoError: from :func:`validate_instances` or :func:`annotation_geometry`, naming the entry.
    """
    validate_instances(coco)
    keep = None if image_ids is None else set(image_ids)
    images, image_map, sizes = [], {}, {}
    for im in coco["images"]:
        if keep is not None and im["id"] not in keep:
            continue
        image_map[im["id"]] = len(images) + 1
        sizes[im["id"]] = (int(im["height"]), int(im["width"]))
        images.append({**im, "id": len(images) + 1})
    cats = category_order(coco["categories"])
    cat_map = {c["id"]: j + 1 for j, c in enumerate(cats)}
    categories = [{**c, "id": cat_map[c["id"]]} for c in cats]
    anns, bad = [], []
    for i, a in enumerate(coco["annotations"]):
        if a["image_id"] not in image_map:
            continue
        try:
            xyxy, rle, _ = annotation_geometry(a, *sizes[a["image_id"]])
        except CocoError as e:
            raise CocoError(f"{annotation_name(i, a)}: {e}") from None
        why = unmatchable(a, xyxy, rle)
        if why:
            bad.append(f"{annotation_name(i, a)}: {why}")
        x1, y1, x2, y2 = xyxy
        new = {k: v for k, v in a.items() if k != "id"}
        if "id" in a:
            new["source_id"] = a["id"]
        new.update(id=len(anns) + 1, image_id=image_map[a["image_id"]], category_id=cat_map[a["category_id"]],
                   bbox=[x1, y1, x2 - x1, y2 - y1], iscrowd=int(bool(a.get("iscrowd", 0))),
                   segmentation={"size": rle["size"], "counts": rle["counts"].decode("ascii")})
        if not _finite(new.get("area")):
            new["area"] = float(mask_utils.area(rle))
        anns.append(new)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations", "categories")}
    out.update(images=images, annotations=anns, categories=categories)
    return PycocoGT(out, image_map, cat_map, bad)


def category_order(categories: list[dict]) -> list[dict]:
    """Categories sorted by id: integer ids numerically, then string ids (ids may mix both)."""
    return sorted(categories, key=lambda c: _id_order(c["id"]))
