"""Training data for the student, read straight from the label store (no image copies, no
label files).

:func:`build_table` selects instances from a label set with its curation decisions and
per-class thresholds, once, in memory (Parquet columns; seconds for 100k images).
:class:`StoreSegDataset` subclasses ultralytics' ``YOLODataset``: the images are read in place
from the paths in the store, labels come from the table, so ultralytics' rule of finding
label files by rewriting ``/images/`` in the resolved path never applies and cannot lose a
label. Masks travel as store RLE and become polygons once per run, when the dataset is built
(:meth:`StoreSegDataset.get_labels`, before the dataloader's workers start), never per sample or
epoch: by :func:`distillery.engine.polygons.mask_to_polygon` (the YOLO-seg export's conversion
too, at its 0.5 px Douglas-Peucker tolerance): every outline *and hole* is kept, joined into one
"keyhole" polygon (zero-width bridges), which ``cv2.fillPoly`` in ultralytics' ``polygon2mask``
fills back with holes open and all parts present. Each mask is traced in the finest frame
ultralytics ever fills it in (:meth:`StoreSegDataset.polygon_scale`: ``imgsz * (1 + scale)``
longest side), not at the photo's full size, so a small ``imgsz`` pays for no vertices it
cannot draw. The polygons stay in memory with the labels, as ultralytics keeps the segments
of its label files (float32, 8 bytes per vertex).

Training instances carry their global row id in ``cls`` through ultralytics' augmentations
(every transform filters ``cls`` with the instances); the trainer maps rows to the hard
class, soft score vector, loss weight and ignore flag (:class:`TrainTable` lookups).
"""

from __future__ import annotations

import time
from collections import Counter
from multiprocessing.pool import ThreadPool
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils
from ultralytics.data.augment import Format
from ultralytics.data.dataset import YOLODataset
from ultralytics.utils.instance import Instances

from distillery.engine.polygons import mask_to_polygon
from distillery.engine.split import is_val
from distillery.engine.store import LabelSet, StoreError

#: Confidence -> loss weight mappings (``weight``: ``score``, ``sqrt``: score ** 0.5, ``none``: 1).
WEIGHT_MAPPINGS = {"score": lambda s: s, "sqrt": np.sqrt, "none": np.ones_like}


@dataclass(frozen=True)
class Selection:
    """Which teacher instances the student learns, ignores or treats as background.

    Attributes:
        min_score: box score at or above which an undecided instance is a training target.
        class_min_score: per-class overrides of ``min_score`` (class name -> score).
        ignore_min_score: undecided instances with ``ignore_min_score <= score < threshold``
            become ignore regions (neither positive nor negative); below it, background.
        weight: teacher confidence -> box/mask loss weight, one of :data:`WEIGHT_MAPPINGS`.
            Instances a person accepted or relabeled weigh 1.
        classes: train on these ontology classes only (None: all); instances whose top
            class is another become background and the soft vectors keep these columns.
        val_fraction: share of images (by image id, :func:`distillery.engine.split.is_val`) held out.
        curation: curation version to apply (None: the latest; 0: none).
    """

    min_score: float = 0.25
    class_min_score: dict = field(default_factory=dict)
    ignore_min_score: float = 0.1
    weight: str = "score"
    classes: tuple | None = None
    val_fraction: float = 0.1
    curation: int | None = None

    def check(self, ontology: list[str]) -> None:
        """Raises ValueError naming the bad setting."""
        for name, v in (("min_score", self.min_score), ("ignore_min_score", self.ignore_min_score),
                        ("val_fraction", self.val_fraction), *self.class_min_score.items()):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if self.ignore_min_score > self.min_score:
            raise ValueError(f"ignore_min_score ({self.ignore_min_score}) must not exceed min_score ({self.min_score})")
        if self.weight not in WEIGHT_MAPPINGS:
            raise ValueError(f"weight mapping {self.weight!r} unknown; use one of {sorted(WEIGHT_MAPPINGS)}")
        unknown = sorted((set(self.class_min_score) | set(self.classes or ())) - set(ontology))
        if unknown:
            raise ValueError(f"class(es) {unknown} are not in the label set's ontology ({', '.join(ontology[:20])}...)")


@dataclass
class TrainTable:
    """Selected images and instances.

    Attributes:
        names: class names, index = student class id.
        images: per split (``train``, ``val``) a list of ``(path, (height, width), rows)``.
        hard: int64 ``(R,)`` class id per instance row (-1 for ignore regions).
        soft: float32 ``(R, C)`` soft class targets (teacher scores, or one-hot for corrections).
        weight: float32 ``(R,)`` box/mask loss weight.
        ignore: bool ``(R,)`` the row is an ignore region (its box; no mask target).
        boxes: float32 ``(R, 4)`` xyxy absolute pixels; ``masks``: ``R`` RLE dicts.
        stats: counts of what the selection did (``kept``, ``ignored``, ``background``,
            ``rejected``, ``relabeled``, ``crowd_ignored``, ``empty_mask_ignored``, images...)
            and why (``instances`` seen in the images kept, ``below_min_score``: undecided
            and under their class threshold, ``outside_classes``: top class not in
            ``Selection.classes``).
        labelset: id; ``curation_version``: the version applied (0: none).
    """

    names: list
    images: dict
    hard: np.ndarray
    soft: np.ndarray
    weight: np.ndarray
    ignore: np.ndarray
    boxes: np.ndarray
    masks: list
    stats: Counter
    labelset: str
    curation_version: int
    seconds: float = 0.0


def build_table(labelset: LabelSet, sel: Selection | None = None, require_train: bool = True) -> TrainTable:
    """Select training instances from ``labelset`` (see :class:`Selection` and the module doc).

    Per instance, in order: an image-level ``reject`` or ``ignore`` drops the image; a
    ``reject`` drops the instance (background); crowds, ``ignore`` decisions and instances
    with an empty mask become ignore regions; a class correction makes a one-hot target of
    weight 1; ``accept`` keeps it (weight 1 if a person decided, else the mapping); an
    undecided instance is kept at or above its class threshold, an ignore region from
    ``ignore_min_score``, background below.

    Raises:
        ValueError: a bad selection setting; StoreError: no such curation version, or (when
        ``require_train``) no training image or no training target left; the message counts
        what the thresholds and decisions removed.
    """
    t0 = time.perf_counter()
    sel = sel or Selection()
    ontology = labelset.classes
    sel.check(ontology)
    keep_cls = list(sel.classes) if sel.classes else list(ontology)
    col = np.array([ontology.index(c) for c in keep_cls])
    cls_of = {c: i for i, c in enumerate(keep_cls)}
    thr = np.array([sel.class_min_score.get(c, sel.min_score) for c in keep_cls], np.float32)
    wmap = WEIGHT_MAPPINGS[sel.weight]

    version = sel.curation
    if version == 0:
        dec_rows, version = [], 0
    else:
        t, meta = labelset.curation(version)
        dec_rows, version = t.to_pylist(), meta["version"]
    inst_dec = {r["instance_id"]: r for r in dec_rows if r["instance_id"] is not None}
    img_dec = {r["image_id"]: r["decision"] for r in dec_rows if r["instance_id"] is None}

    images = {"train": [], "val": []}
    hard, soft, weight, ignore, boxes, masks = [], [], [], [], [], []
    st: Counter = Counter()
    best_below = None  # highest box score under its class threshold (for the zero-target message)
    C = len(ontology)
    for rec in labelset.iter_records():
        if rec.error is not None:
            st["error_images"] += 1
            continue
        d = img_dec.get(rec.image_id)
        if d in ("reject", "ignore"):
            st[f"images_{d}ed" if d == "reject" else "images_ignored"] += 1
            continue
        split = "val" if is_val(rec.image_id, sel.val_fraction) else "train"
        rows = []
        areas = mask_utils.area(rec.masks) if rec.num_instances else []
        st["instances"] += rec.num_instances
        for k, iid in enumerate(rec.instance_ids):
            score = float(rec.box_score[k])
            top = int(rec.scores[k].argmax()) if C else 0
            r = inst_dec.get(iid)
            decision, label, manual = (r["decision"], r["label"], r["source"] == "manual") if r else (None, None, False)
            target = cls_of.get(label or ontology[top])
            if decision == "reject":
                st["rejected"] += 1
                continue
            if target is None and decision != "ignore":
                st["background"] += 1  # a class outside Selection.classes
                st["outside_classes"] += 1
                continue
            if decision == "ignore" or rec.iscrowd[k] or areas[k] == 0:
                why = "ignored" if decision == "ignore" else ("crowd_ignored" if rec.iscrowd[k] else "empty_mask_ignored")
                kind = "ignore"
            elif label is not None:
                kind, why = "relabel", "relabeled"
            elif decision == "accept":
                kind, why = "keep", "kept"
            elif score >= thr[target]:
                kind, why = "keep", "kept"
            elif score >= sel.ignore_min_score:
                kind, why = "ignore", "ignored"
                best_below = max(score, best_below or 0.0)
                st["below_min_score"] += 1
                st["ignored_below_min_score"] += 1
            else:
                best_below = max(score, best_below or 0.0)
                st["background"] += 1
                st["below_min_score"] += 1
                continue
            st[why] += 1
            if split == "val" and kind == "ignore":
                continue  # validation measures against hard targets only
            s = np.zeros(len(keep_cls), np.float32)
            if kind == "relabel":
                s[target] = 1.0
                w = 1.0
            else:
                s = rec.scores[k, col].astype(np.float32)
                w = 1.0 if (manual and decision == "accept") else float(wmap(np.float32(score)))
            hard.append(-1 if kind == "ignore" else target), soft.append(s), weight.append(w)
            ignore.append(kind == "ignore"), boxes.append(rec.boxes[k]), masks.append(rec.masks[k])
            rows.append(len(hard) - 1)
        images[split].append((rec.path, (rec.height, rec.width), rows))
    st["train_images"], st["val_images"] = len(images["train"]), len(images["val"])
    if require_train and not images["train"]:
        raise StoreError(f"label set {labelset.id}: no training images after selection ({dict(st)}); "
                         "lower --min-score, check curation decisions, or lower --val-fraction")
    if require_train and not any(hard[r] >= 0 for _, _, rows in images["train"] for r in rows):
        raise StoreError(f"label set {labelset.id}: no training targets after selection: "
                         f"{removed_summary(st, sel, best_below)}")
    return TrainTable(
        names=keep_cls, images=images,
        hard=np.asarray(hard, np.int64), soft=np.asarray(soft, np.float32).reshape(-1, len(keep_cls)),
        weight=np.asarray(weight, np.float32), ignore=np.asarray(ignore, bool),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4), masks=masks, stats=st,
        labelset=labelset.id, curation_version=version, seconds=time.perf_counter() - t0,
    )


# -- masks -> ultralytics segments ----------------------------------------------------------

def _box_polygon(box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


class StoreFormat(Format):
    """ultralytics ``Format`` that rasterises only real instances' masks: ignore regions
    (``row_is_ignore[row]``) are appended after them with no mask pixels, so they never hide
    another instance's mask in the overlap mask, and are never assigned (see the loss)."""

    row_is_ignore: np.ndarray | None = None

    def _format_segments(self, instances, cls, w, h):
        if self.row_is_ignore is None or not len(cls):
            return super()._format_segments(instances, cls, w, h)
        ign = self.row_is_ignore[cls[:, 0].astype(np.int64)]
        real, skip = np.flatnonzero(~ign), np.flatnonzero(ign)
        if len(real):
            masks, inst_r, cls_r = super()._format_segments(instances[real], cls[real], w, h)
        else:
            nh, nw = h // self.mask_ratio, w // self.mask_ratio
            masks = np.zeros((1 if self.mask_overlap else 0, nh, nw), np.uint8)
            inst_r, cls_r = instances[real], cls[real]
        if len(skip):
            if not self.mask_overlap:
                masks = np.concatenate([masks, np.zeros((len(skip), *masks.shape[1:]), masks.dtype)], 0)
            inst_r = Instances.concatenate([inst_r, instances[skip]])
            cls_r = np.concatenate([cls_r, cls[skip]], 0)
        return masks, inst_r, cls_r


class StoreSegDataset(YOLODataset):
    """ultralytics ``YOLODataset`` over a :class:`TrainTable` split.

    Args:
        table: the selection; split: ``train`` (``cls`` holds row ids, ignore regions
            included) or ``val`` (``cls`` holds class ids); other arguments as ``YOLODataset``.
    """

    format_class = StoreFormat

    def __init__(self, *args, table: TrainTable, split: str, **kwargs):
        self.table, self.split = table, split
        hyp = kwargs.get("hyp")
        #: longest side, px, that an image of this split ever has where ultralytics rasterises its
        #: polygons (``polygon2mask``: vertices truncated to int32, ``cv2.fillPoly`` at the augmented
        #: image's size, then resized to the loss's mask frame): loaded at ``imgsz`` (longest side),
        #: zoomed by at most ``1 + hyp.scale`` (``RandomPerspective``, training only).
        self.fill_side = kwargs["imgsz"] * (1 + (float(getattr(hyp, "scale", 0.5)) if kwargs.get("augment") else 0.0))
        super().__init__(*args, **kwargs)

    def get_img_files(self, img_path):
        return [p for p, _, _ in self.table.images[self.split]]

    def get_labels(self) -> list[dict]:
        """One ultralytics label dict per image of the split, with its instances' polygons
        (:meth:`segments`) converted here, once, for the whole run."""
        t = self.table
        labels = []
        for path, (h, w), rows in t.images[self.split]:
            rows = np.asarray(rows, np.int64)
            xyxy = t.boxes[rows] if len(rows) else np.zeros((0, 4), np.float32)
            xywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                             (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h], 1).astype(np.float32)
            # train: row ids, float64 (exact to 2**53 rows); val: class ids as ultralytics has them
            cls = rows.astype(np.float64) if self.split == "train" else t.hard[rows].astype(np.float32)
            labels.append({
                "im_file": path, "shape": (h, w), "cls": cls.reshape(-1, 1), "bboxes": xywh,
                "store_shape": (h, w), "segments": [], "keypoints": None, "normalized": True, "bbox_format": "xywh",
            })
        todo = [(i, r) for i, (_, _, rows) in enumerate(t.images[self.split]) for r in rows]
        if todo:
            from ultralytics.utils import NUM_THREADS, TQDM

            segs = {}
            scales = [self.polygon_scale(h, w) for _, (h, w), _ in t.images[self.split]]
            with ThreadPool(NUM_THREADS) as pool:  # cv2 and pycocotools release the GIL for most of the work
                it = pool.imap(lambda ir: (ir, self.segment(ir[1], scales[ir[0]])), todo, chunksize=8)
                for (i, r), seg in TQDM(it, total=len(todo), desc=f"{self.prefix}masks to polygons (once per run)"):
                    segs[i, r] = seg
            for i, (_, (h, w), rows) in enumerate(t.images[self.split]):
                labels[i]["segments"] = [segs[i, r] / np.array([w, h], np.float32) for r in rows]
        return labels

    def polygon_scale(self, h: int, w: int) -> float:
        """The factor, ``<= 1``, from an ``h x w`` image's pixels to the finest frame ultralytics
        fills its polygons in (:attr:`fill_side`). Masks are traced there (``mask_to_polygon(...,
        scale=)``, 0.5 px Douglas-Peucker in that frame's pixels), so detail that ``fillPoly``
        cannot draw costs no vertices: ultralytics resamples every polygon of an image (and of a
        mosaic) to the longest one's length and transforms every vertex on every load, so a
        ragged mask's vertices slow every sample that holds it. Targets ultralytics rasterises
        from these polygons are as close to the mask as from full-resolution ones
        (``tests/student/test_data.py``)."""
        return min(1.0, self.fill_side / max(h, w))

    def segment(self, row: int, scale: float = 1.0) -> np.ndarray:
        """float32 ``(K, 2)`` polygon, ``(x, y)`` absolute pixels, of a table row: its mask's
        keyhole polygon (:func:`distillery.engine.polygons.mask_to_polygon`, traced at
        ``scale``), or its box outline for an ignore region or an empty mask."""
        t = self.table
        if t.ignore[row]:
            return _box_polygon(t.boxes[row])
        seg = mask_to_polygon(mask_utils.decode(t.masks[row]), scale=scale)
        return seg if len(seg) else _box_polygon(t.boxes[row])

    def update_labels_info(self, label: dict) -> dict:
        """Check the decoded image still has the labeled size, then let ultralytics build its
        ``Instances`` from the polygons :meth:`get_labels` made."""
        h, w = label.pop("store_shape")
        if tuple(label["ori_shape"]) != (h, w):
            raise ValueError(
                f"{label['im_file']}: decoded as {label['ori_shape'][1]}x{label['ori_shape'][0]} but labeled as {w}x{h} "
                "(file changed since labeling, or EXIF orientation read differently); relabel it"
            )
        return super().update_labels_info(label)

    def build_transforms(self, hyp):
        transforms = super().build_transforms(hyp)
        transforms.transforms[-1].row_is_ignore = self.table.ignore if self.split == "train" else None
        return transforms


def removed_summary(st: Counter, sel: Selection, best_below: float | None = None) -> str:
    """What the selection removed, by reason (``st``: :attr:`TrainTable.stats`), for a run that
    would have nothing to learn; ``best_below``: the highest box score under its threshold."""
    thr = f"--min-score {sel.min_score}" + (f" (per class: {', '.join(f'{k}={v}' for k, v in sel.class_min_score.items())})"
                                            if sel.class_min_score else "")
    parts = [f"{st['instances']} instances in the images kept: {st['below_min_score']} below {thr} "
             f"({st['ignored_below_min_score']} of them ignore regions from --ignore-min-score {sel.ignore_min_score}, "
             f"the rest background{'' if best_below is None else f'; the highest of their box scores is {best_below:.3f}'})",
             f"{st['rejected']} rejected and {st['ignored'] - st['ignored_below_min_score']} ignored by curation decisions",
             f"{st['crowd_ignored']} crowd and {st['empty_mask_ignored']} empty-mask ignore regions",
             f"{st['outside_classes']} outside --classes",
             f"{st['kept'] + st['relabeled']} targets, all in validation images ({st['val_images']} held out by "
             f"--val-fraction {sel.val_fraction})" if st["kept"] + st["relabeled"] else "no targets",
             f"images dropped: {st['images_rejected']} rejected, {st['images_ignored']} ignored, "
             f"{st['error_images']} errors"]
    return "; ".join(parts) + "; lower --min-score, review the curation decisions, or choose other --classes"


def table_summary(t: TrainTable) -> str:
    s = t.stats
    return (f"label set {t.labelset} (curation v{t.curation_version}): {s['train_images']} train / {s['val_images']} val "
            f"images; instances kept {s['kept']}, relabeled {s['relabeled']}, ignore regions "
            f"{s['ignored'] + s['crowd_ignored'] + s['empty_mask_ignored']}, background {s['background']}, "
            f"rejected {s['rejected']}; images dropped by curation {s['images_rejected'] + s['images_ignored']}, "
            f"error images {s['error_images']} ({t.seconds:.1f} s)")

