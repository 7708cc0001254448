"""Label record <-> FiftyOne sample, in FiftyOne's conventions.

One sample per stored image (``filepath`` absolute). Its instances are ``fo.Detection`` s in
the field :data:`~distillery.labeling.curation.database.FIELD`: ``bounding_box`` is relative
``[x, y, width, height]`` in [0, 1] of the EXIF-corrected frame, and ``mask`` is a boolean
array covering exactly the pixels FiftyOne pastes it onto -- columns
``int(W * x) .. int(W * (x + width))`` and the same for rows (``eta.core.geometry``
``BoundingBox.coords_in``), so pasting it back (``Detection.to_segmentation``) gives the
stored mask inside the box bit for bit. Mask pixels outside the box are not shown by
FiftyOne; their share is the attribute ``mask_outside``. Each detection's ``instance_uid`` is
the store's instance id (:attr:`distillery.engine.record.LabelRecord.instance_ids`; FiftyOne
reserves ``instance_id``); ``teacher_label`` keeps the teacher's class.
"""

from __future__ import annotations

import os

import numpy as np
from pycocotools import mask as mask_utils

from distillery.engine.images import error_kind
from distillery.engine.record import LabelRecord
from distillery.labeling.curation.config import CurationConfig
from distillery.labeling.curation.database import FIELD, load_fiftyone
from distillery.labeling.curation.signals import instance_signals, phash


def relative_box(box_xyxy: np.ndarray, width: int, height: int) -> list[float]:
    """xyxy absolute pixels -> FiftyOne ``[x, y, w, h]`` relative to ``(width, height)``."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]


def mask_region(rel_box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel region ``(x0, y0, x1, y1)`` (end-exclusive) that FiftyOne pastes a detection mask
    onto: eta's ``BoundingBox.coords_in`` truncates ``W * x`` and ``W * (x + w)`` to int."""
    x, y, w, h = rel_box
    return int(width * 1.0 * x), int(height * 1.0 * y), int(width * 1.0 * (x + w)), int(height * 1.0 * (y + h))


def record_to_sample(rec: LabelRecord, classes: list[str], cfg: CurationConfig, store_row: str,
                     carried: dict | None = None, with_phash: bool = True):
    """One ``fo.Sample`` for one label record.

    Args:
        rec: the record; an error record becomes a sample tagged ``error:<kind>`` with the
            reason in ``error`` and no detections.
        classes: the label set's ontology.
        cfg: thresholds for the review signals.
        store_row: ``"<shard>:<row>"`` where the record lives (used by incremental sync).
        carried: decisions to restore, ``{instance_id or image_id: {"tags", "label", "rule_decision"}}``
            (:func:`distillery.labeling.curation.decisions.carried_from_table`).
        with_phash: compute the perceptual hash (decodes the image once more).
    """
    fo = load_fiftyone()
    carried = carried or {}
    path = os.path.abspath(rec.path)
    s = fo.Sample(filepath=path, image_id=rec.image_id, store_row=store_row, error=rec.error)
    if rec.error is not None:
        s.tags = [f"error:{error_kind(rec.error)}"]
        s["num_instances"] = 0
        s[FIELD] = None
        return s
    W, H = rec.width, rec.height
    s.metadata = fo.ImageMetadata(width=W, height=H)
    s["num_instances"] = rec.num_instances
    if with_phash:
        s["phash"] = phash(rec.path)
    img = carried.get(rec.image_id)
    if img:
        s.tags = list(img["tags"])
    sig = instance_signals(rec, classes, cfg)
    decoded = mask_utils.decode(rec.masks) if rec.num_instances else None  # (H, W, N) uint8
    totals = mask_utils.area(rec.masks) if rec.num_instances else None  # pixels per mask
    dets = []
    for k in range(rec.num_instances):
        rel = relative_box(rec.boxes[k], W, H)
        x0, y0, x1, y1 = mask_region(rel, W, H)
        crop = decoded[y0:y1, x0:x1, k].astype(bool)
        total = int(totals[k])
        outside = 0.0 if total == 0 else 1.0 - float(crop.sum()) / total
        teacher_label = classes[int(sig.top[k])]
        d = fo.Detection(
            label=teacher_label,
            bounding_box=rel,
            mask=crop if crop.size else None,
            confidence=float(rec.box_score[k]),
            instance_uid=sig.instance_id[k],
            teacher_label=teacher_label,
            top2_label=classes[int(sig.top2[k])],
            soft_scores=[float(v) for v in rec.scores[k]],
            mask_score=float(rec.mask_score[k]),
            margin=float(sig.margin[k]),
            mask_box_iou=float(sig.mask_box_iou[k]),
            mask_outside=outside,
            area=float(sig.area[k]),
            overlap_iou=float(sig.overlap_iou[k]),
            band=sig.band[k],
            priority=float(sig.priority[k]),
            review_reason=sig.reason[k],
            iscrowd=bool(rec.iscrowd[k]),
            rule_decision=None,
        )
        c = carried.get(sig.instance_id[k])
        if c:  # a class correction travels as its relabel: tag, so removing the tag undoes it
            d.tags = list(c["tags"])
            d["rule_decision"] = c.get("rule_decision")
        dets.append(d)
    s[FIELD] = fo.Detections(detections=dets)
    return s


def sample_to_record(sample, classes: list[str]) -> LabelRecord:
    """Inverse of :func:`record_to_sample` for the teacher output (decisions are not part of a
    record): boxes back to xyxy pixels, masks pasted with FiftyOne's own
    ``Detection.to_segmentation`` and RLE-encoded over the full frame."""
    if sample["error"] is not None:
        return LabelRecord.failed(sample.filepath, sample["error"], len(classes), sample["image_id"])
    W, H = sample.metadata.width, sample.metadata.height
    dets = sample[FIELD].detections if sample[FIELD] is not None else []
    boxes, masks = [], []
    for d in dets:
        x, y, w, h = d.bounding_box
        boxes.append([x * W, y * H, (x + w) * W, (y + h) * H])
        full = np.zeros((H, W), np.uint8)
        if d.mask is not None:
            full = d.to_segmentation(frame_size=(W, H), target=1).mask.astype(np.uint8)
        masks.append(mask_utils.encode(np.asfortranarray(full)))
    return LabelRecord(
        image_id=sample["image_id"], path=sample.filepath, width=W, height=H, num_classes=len(classes),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4).clip(0, [W, H, W, H]),
        scores=np.asarray([d["soft_scores"] for d in dets], np.float32).reshape(-1, len(classes)),
        box_score=[d.confidence for d in dets], masks=masks, mask_score=[d["mask_score"] for d in dets],
        iscrowd=[bool(d["iscrowd"]) for d in dets],
    )
