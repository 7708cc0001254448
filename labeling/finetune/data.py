"""Training data for teacher fine-tuning, read from a label set and its curation decisions.

Grounding DINO's loss (transformers ``GroundingDinoImageLoss``: Hungarian matching, then a
sigmoid focal loss) treats every prediction left unmatched as background. An image may
therefore train the detector only when a person reviewed it *exhaustively*; a partly
reviewed image would teach the detector to miss the objects nobody looked at. Exhaustive
means one of:

* the label set is human ground truth (kind ``import``, from ``distillery labels import``);
* a person accepted the whole image (sample tag ``accept``);
* every instance of the image carries a person's decision (``accept``, ``reject``,
  ``ignore`` or a class correction). A decision the curation rules set (``source ==
  "rules"``) is not a review: rules that decide every instance would otherwise turn the
  teacher's own output, misses included, into training data.

Inside a selected image, per instance:

* ``accept``, a class correction ``relabel:<class>``, and (in a ground-truth set or an
  accepted image) an undecided instance: a positive, of the corrected class if any;
* ``reject``: background (no target; the loss pushes predictions there to "no object");
* ``ignore``, and COCO crowd annotations of ground truth: ignore regions, which the loss
  leaves alone where it can (:mod:`distillery.labeling.finetune.detector`).

An image-level ``reject`` or ``ignore`` drops the image. Images are split into train and
validation by image id (:func:`distillery.engine.split.is_val`), as the student's data is.

The instance-level part serves the SAM trainer too: with ``exhaustive=False`` every image
that is not dropped is kept, and its positives are the instances a person confirmed
(accepted, relabelled, or in an accepted image) or ground truth, each with its mask. A
mask loss is per instance, so unreviewed neighbours do no harm there.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from distillery.engine.split import is_val
from distillery.engine.store import LabelSet
from distillery.labeling.ontology import Ontology


@dataclass(frozen=True)
class TrainImage:
    """One selected image and its training instances.

    Attributes:
        image_id, path: as in the label record; height, width: pixels of the EXIF-corrected frame.
        boxes: float32 ``(N, 4)`` positives, xyxy absolute pixels of that frame.
        classes: int64 ``(N,)`` class index of each positive into the label set's ontology
            (a class correction already applied).
        instance_ids: ``N`` store instance ids (:attr:`LabelRecord.instance_ids`) of the positives.
        masks: ``N`` COCO RLE dicts (``size == [height, width]``) of the positives.
        ignore_boxes: float32 ``(M, 4)`` ignore regions, xyxy absolute pixels.
        val: True when the image is in the validation split.
    """

    image_id: str
    path: str
    height: int
    width: int
    boxes: np.ndarray
    classes: np.ndarray
    instance_ids: tuple
    masks: tuple
    ignore_boxes: np.ndarray
    val: bool


@dataclass
class FinetuneData:
    """The selection: images with their positives and ignore regions, and what was left out.

    Attributes:
        labelset: the label set's id (its fingerprint); labelset_name: its name or None;
            kind: ``teacher`` or ``import``.
        ontology: the label set's ontology (class ``j`` of ``TrainImage.classes``).
        curation_version: the curation version applied (0: none committed).
        val_fraction: share of images held out by image id.
        images: the selected images, train and validation, in store order.
        counts: images ``used_train`` / ``used_val`` and ``skipped_<reason>``
            (``error``, ``image_rejected``, ``image_ignored``, ``unreviewed``: no decision by
            a person, ``partly_reviewed``: some instances undecided or decided by rules only,
            ``no_confirmed_instances``: with ``exhaustive=False``); instances of the used
            images: ``positives`` (``relabeled`` of them), ``rejected`` (background),
            ``ignored`` and ``crowd`` (ignore regions).
    """

    labelset: str
    labelset_name: str | None
    kind: str
    ontology: Ontology
    curation_version: int
    val_fraction: float
    images: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    @property
    def train(self) -> list[TrainImage]:
        return [im for im in self.images if not im.val]

    @property
    def val(self) -> list[TrainImage]:
        return [im for im in self.images if im.val]

    def instance_ids_sha256(self) -> str:
        """sha256 over the sorted lines ``image_id instance_id class`` of every training
        positive, plus ``image_id -`` for each training image (images without positives
        are negatives, training data too): the same training data gives the same hash."""
        names = self.ontology.classes
        lines = []
        for im in self.train:
            lines.append(f"{im.image_id} -")
            lines += [f"{im.image_id} {iid} {names[c]}" for iid, c in zip(im.instance_ids, im.classes)]
        return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()

    def summary(self) -> str:
        """One line: images used per split, images skipped by reason, instances by role."""
        c = self.counts
        skipped = ", ".join(f"{k[len('skipped_'):]} {v}" for k, v in sorted(c.items()) if k.startswith("skipped_") and v)
        return (f"label set {self.labelset} (curation v{self.curation_version}): {c['used_train']} train / "
                f"{c['used_val']} val images; skipped: {skipped or 'none'}; instances: {c['positives']} positives "
                f"({c['relabeled']} relabeled), {c['rejected']} rejected as background, "
                f"{c['ignored'] + c['crowd']} ignore regions ({c['crowd']} crowd)")


def _decisions(labelset: LabelSet, curation: int | None) -> tuple[dict, dict, int]:
    """``(image decision by image id, decision row by instance id, version)``; version 0: none."""
    if curation == 0:
        return {}, {}, 0
    table, meta = labelset.curation(curation)  # StoreError for a version that does not exist
    rows = table.to_pylist()
    images = {r["image_id"]: r["decision"] for r in rows if r["instance_id"] is None}
    instances = {r["instance_id"]: r for r in rows if r["instance_id"] is not None}
    return images, instances, int(meta["version"])


def select_training_data(labelset: LabelSet, curation: int | None = None, val_fraction: float = 0.1,
                         exhaustive: bool = True) -> FinetuneData:
    """Select the images and instances teachers may learn from (rules in the module docstring).

    Args:
        labelset: a teacher label set with curation decisions, or a ground-truth import.
        curation: curation version to apply (None: the latest; 0: none).
        val_fraction: share of images held out for validation, by image id, in [0, 1).
        exhaustive: keep only exhaustively reviewed images (the detector); False keeps the
            confirmed instances of every image not dropped (per-instance losses, e.g. SAM).

    Raises:
        ValueError: ``val_fraction`` outside [0, 1).
        distillery.engine.store.StoreError: ``curation`` names a version that does not exist.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val fraction must lie in [0, 1), got {val_fraction}")
    kind = labelset.manifest.get("kind") or "teacher"
    gt = kind == "import"
    ontology = Ontology.from_dict(labelset.manifest["ontology"])
    index = {c: i for i, c in enumerate(ontology.classes)}
    img_dec, inst_dec, version = _decisions(labelset, curation)
    data = FinetuneData(labelset.id, labelset.name, kind, ontology, version, float(val_fraction))
    c = data.counts
    for rec in labelset.iter_records():
        if rec.error is not None:
            c["skipped_error"] += 1
            continue
        image_decision = img_dec.get(rec.image_id)
        if image_decision in ("reject", "ignore"):
            c["skipped_image_rejected" if image_decision == "reject" else "skipped_image_ignored"] += 1
            continue
        ids = rec.instance_ids
        rows = [inst_dec.get(i) for i in ids]
        manual = [r is not None and r["source"] == "manual" for r in rows]
        confirmed_image = gt or image_decision == "accept"
        if exhaustive and not confirmed_image and not (ids and all(manual)):
            c["skipped_partly_reviewed" if any(manual) else "skipped_unreviewed"] += 1
            continue
        keep, classes, ignore, n = [], [], [], Counter()
        for k, r in enumerate(rows):
            decision, label = (r["decision"], r["label"]) if r else (None, None)
            if label is not None and label not in index:
                raise ValueError(f"label set {labelset.id}, curation v{version}: instance {ids[k]} is relabelled to "
                                 f"{label!r}, which is not in its ontology; fix the decision and commit again")
            if decision == "reject":
                n["rejected"] += 1
            elif decision == "ignore" or rec.iscrowd[k]:
                ignore.append(k)
                n["ignored" if decision == "ignore" else "crowd"] += 1
            elif confirmed_image or (manual[k] and (decision == "accept" or label is not None)):
                keep.append(k)
                classes.append(index[label] if label is not None else int(rec.scores[k].argmax()))
                n["positives"] += 1
                n["relabeled"] += label is not None
            # else (exhaustive=False only): an unconfirmed instance, neither target nor background
        if not exhaustive and not keep:
            c["skipped_no_confirmed_instances"] += 1
            continue
        val = is_val(rec.image_id, val_fraction)
        c.update(n)
        c["used_val" if val else "used_train"] += 1
        data.images.append(TrainImage(
            image_id=rec.image_id, path=rec.path, height=rec.height, width=rec.width,
            boxes=rec.boxes[keep].reshape(-1, 4), classes=np.asarray(classes, np.int64),
            instance_ids=tuple(ids[k] for k in keep), masks=tuple(rec.masks[k] for k in keep),
            ignore_boxes=rec.boxes[ignore].reshape(-1, 4), val=val,
        ))
    return data
