"""Compare teachers on held-out human labels (``distillery teachers eval``): did fine-tuning
help, and for which classes.

The ground truth is a label set of kind ``import`` (``distillery labels import``), with its
latest curation decisions applied (:func:`gt_records`); its images are the evaluation images.
Each teacher labels those images through the normal label path (:func:`label_teacher`:
:func:`~distillery.labeling.teachers.teacher_stages` and
:func:`~distillery.engine.job.run_label_job`) over the GT's ontology, into a teacher label set
of the same store. That label set *is* the prediction cache: it is keyed by the teacher's
fingerprint (:func:`~distillery.labeling.teachers.labelset_spec`), so a rerun labels nothing
again, a changed teacher gets a new one, and an existing label set of the same teacher and
ontology (from ``distillery label``) is reused and only gains the images it lacked. Nothing
here writes a second prediction format.

Scores per teacher (:func:`score_teacher`):

* box and mask AP (COCOeval mAP50-95, mAP50, per-class AP) by
  :func:`distillery.engine.evaluation.evaluate`; classes are mapped by exact name;
* mask mIoU, :func:`mask_miou` (definition there).

The first teacher is the baseline: every other teacher gets a per-class delta (teacher minus
baseline), and a class where any delta is negative is listed as worse (:func:`compare`).

Split (:func:`choose_split`): images are in the validation split when
:func:`distillery.engine.split.is_val` (a hash of the image's content id) says so, the same
split the fine-tuning trainer holds out. A fine-tuned teacher has a ``finetune.json`` beside
its preset, of which two keys are read: ``labelset`` (id or name of the label set it was
trained on) and ``val_fraction``. When any teacher has one, evaluation is on the validation
split by default (the smallest ``val_fraction`` of them: its validation images are held out
by every one of them, since the split is a threshold on one hash); otherwise on all images.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from distillery.engine.evaluation import evaluate, records_to_predictions
from distillery.engine.record import LabelRecord
from distillery.engine.split import is_val
from distillery.engine.store import LabelSet, LabelStore, StoreError, fingerprint

#: ``--val-fraction`` when no teacher has a ``finetune.json`` (the default of ``labels export``).
DEFAULT_VAL_FRACTION = 0.1
METRICS = ("box AP50-95", "mask AP50-95", "mask mIoU")
SHORT = {"box AP50-95": "box AP", "mask AP50-95": "mask AP", "mask mIoU": "mIoU"}


class TeacherEvalError(ValueError):
    """The GT label set, a teacher's ``finetune.json`` or the chosen images cannot be evaluated."""


@dataclass
class Teacher:
    """One ``--teachers`` preset: ``label`` names it in tables (unique), ``finetune`` is its
    ``finetune.json`` (None: not fine-tuned)."""

    label: str
    preset_path: Path
    finetune: dict | None = None
    finetune_path: Path | None = None


def teacher_label(preset_path: Path) -> str:
    """A short name for a preset: its file stem, or its folder's name when the stem is the
    generic ``teachers`` (``teachers tiny`` and fine-tuning write ``DIR/teachers.yaml``)."""
    p = Path(preset_path)
    return p.parent.name if p.stem == "teachers" and p.parent.name else p.stem


def read_finetune(preset_path: Path) -> tuple[dict | None, Path]:
    """``finetune.json`` beside ``preset_path`` (as ``teachers finetune`` writes it:
    ``labelset: {id, name, kind}``, ``hyperparameters.val_fraction``), read into
    ``{"labelset": id, "val_fraction": float}`` plus its other keys; None when there is none.

    Raises:
        TeacherEvalError: unreadable JSON, or a missing or invalid ``labelset.id`` /
            ``hyperparameters.val_fraction`` (naming the file and the key).
    """
    path = Path(preset_path).parent / "finetune.json"
    if not path.is_file():
        return None, path
    try:
        ft = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TeacherEvalError(f"{path}: cannot be read as JSON ({e}); it records how the teacher was fine-tuned") from e
    ls = ft.get("labelset") if isinstance(ft, dict) else None
    if not isinstance(ls, dict) or not isinstance(ls.get("id"), str):
        raise TeacherEvalError(f"{path}: key 'labelset.id' (the label set fine-tuned on) is missing; it is not a "
                               "finetune.json written by `distillery teachers finetune`")
    v = (ft.get("hyperparameters") or {}).get("val_fraction")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise TeacherEvalError(f"{path}: key 'hyperparameters.val_fraction' must be a number in [0, 1], got {v!r}")
    return {**ft, "labelset": ls["id"], "val_fraction": v}, path


def gt_records(gt: LabelSet, curation: int | None = None) -> tuple[list[LabelRecord], int]:
    """The GT label set's records with a curation version applied (None: the latest; 0: none).

    An image-level ``reject`` or ``ignore`` drops the image; an instance ``reject`` drops the
    instance; an ``ignore`` makes it a crowd region (COCOeval neither rewards nor punishes
    detections on it); a class correction makes its one-hot scores the new class. Error
    records are dropped. Returns ``(records, curation version applied)``.

    Raises:
        TeacherEvalError: ``gt`` is not of kind ``import``, or a class correction names a class
            outside its ontology. StoreError: no such curation version.
    """
    kind = gt.manifest.get("kind")
    if kind != "import":
        raise TeacherEvalError(f"label set {gt.name or gt.id} is of kind {kind!r}, not human labels; give a label set "
                               "made by `distillery labels import` as --labelset")
    rows, version = [], 0
    if curation != 0:
        t, meta = gt.curation(curation)
        rows, version = t.to_pylist(), meta["version"]
    inst = {r["instance_id"]: r for r in rows if r["instance_id"] is not None}
    drop_images = {r["image_id"] for r in rows if r["instance_id"] is None and r["decision"] in ("reject", "ignore")}
    C = len(gt.classes)
    out = []
    for rec in gt.iter_records():
        if rec.error is not None or rec.image_id in drop_images:
            continue
        keep, scores, crowd = [], rec.scores.copy(), rec.iscrowd.copy()
        for k, iid in enumerate(rec.instance_ids):
            d = inst.get(iid)
            if d is not None and d["decision"] == "reject":
                continue
            if d is not None and d["label"] is not None:
                if d["label"] not in gt.classes:
                    raise TeacherEvalError(f"label set {gt.name or gt.id}, curation v{version}: instance {iid} is "
                                           f"relabelled {d['label']!r}, not a class of its ontology")
                scores[k] = 0.0
                scores[k, gt.classes.index(d["label"])] = 1.0
            crowd[k] |= d is not None and d["decision"] == "ignore"
            keep.append(k)
        out.append(LabelRecord(image_id=rec.image_id, path=rec.path, width=rec.width, height=rec.height, num_classes=C,
                               boxes=rec.boxes[keep], scores=scores[keep], masks=[rec.masks[k] for k in keep],
                               iscrowd=crowd[keep]))
    return out, version


def choose_split(teachers: list[Teacher], val_only: bool | None, val_fraction: float | None) -> tuple[float | None, str]:
    """The validation fraction to keep (None: every image) and why, as one sentence.

    ``val_only`` None: True when any teacher is fine-tuned. ``val_fraction`` None: the
    smallest ``val_fraction`` of the fine-tuned teachers, else :data:`DEFAULT_VAL_FRACTION`.

    Raises:
        TeacherEvalError: ``val_fraction`` given with ``val_only=False``.
    """
    tuned = [t for t in teachers if t.finetune is not None]
    if val_only is False:
        if val_fraction is not None:
            raise TeacherEvalError("--val-fraction selects the validation split; it cannot go with --all-images")
        return None, "all images (--all-images)"
    if val_only is None and not tuned:
        return None, "all images (no teacher has a finetune.json; --val-only to keep the validation split)"
    if val_fraction is not None:
        return val_fraction, f"validation split, --val-fraction {val_fraction:g}"
    if tuned:
        f = min(float(t.finetune["val_fraction"]) for t in tuned)
        who = ", ".join(f"{t.label} {float(t.finetune['val_fraction']):g}" for t in tuned)
        return f, f"validation split held out by fine-tuning (val_fraction {f:g}; finetune.json: {who})"
    return DEFAULT_VAL_FRACTION, f"validation split, val_fraction {DEFAULT_VAL_FRACTION:g} (default)"


def training_overlap(store: LabelStore, teacher: Teacher, image_ids: set[str]) -> int | None:
    """How many of ``image_ids`` were in ``teacher``'s fine-tuning split (not validation by
    its ``val_fraction``, among the images of the label set its ``finetune.json`` names);
    None when that label set is not in ``store`` (cannot tell); 0 when not fine-tuned."""
    if teacher.finetune is None:
        return 0
    try:
        ls = store.open(teacher.finetune["labelset"])
    except StoreError:
        return None
    t = ls.read_columns(["image_id", "error"])
    f = float(teacher.finetune["val_fraction"])
    trained = {i for i, e in zip(*(t.column(c).to_pylist() for c in ("image_id", "error"))) if e is None and not is_val(i, f)}
    return len(trained & image_ids)


def checked_preset(teacher: Teacher, gt: LabelSet):
    """``(preset, ontology)``: ``teacher``'s preset loaded and its detector checked against
    ``gt``'s classes (tokenizer and config, no weights).

    Raises:
        PresetError: the preset or its detector cannot be loaded; TeacherEvalError: the GT's
        classes do not tokenize.
    """
    from distillery.labeling.ontology import Ontology, OntologyError
    from distillery.labeling.teachers import TeacherPreset

    preset = TeacherPreset.load(teacher.preset_path)
    onto = Ontology.from_dict(gt.manifest["ontology"])
    try:
        preset.check_detector(onto, str(teacher.preset_path))
    except OntologyError as e:
        raise TeacherEvalError(f"the classes of label set {gt.name or gt.id} do not fit the detector of "
                               f"{teacher.preset_path}: {e}") from e
    return preset, onto


def label_teacher(store: LabelStore, teacher: Teacher, gt: LabelSet, paths: list[str], *, runner: str = "local",
                  ray_address: str | None = None, progress: bool = False, checked=None) -> tuple[LabelSet, int]:
    """Label ``paths`` with ``teacher`` over the GT's ontology into the store (the prediction
    cache, see the module docstring). A new label set is named ``eval-<label>-<8 hex of its
    id>`` (unique per teacher fingerprint); an existing one keeps its name. ``checked``: the
    ``(preset, ontology)`` :func:`checked_preset` already returned for it (None: check here).

    Returns:
        ``(label set, images labelled by this call)`` (0 on a cached rerun).

    Raises:
        PresetError: the preset or its detector cannot be loaded; TeacherEvalError: the GT's
        classes do not tokenize.
    """
    from distillery.engine.job import run_label_job
    from distillery.labeling.teachers import labelset_spec, teacher_stages

    preset, onto = checked or checked_preset(teacher, gt)
    spec = labelset_spec(onto, preset)
    ls_id = fingerprint(spec)
    exists = any(s.id == ls_id for s in store.labelsets())
    name = None if exists else f"eval-{re.sub(r'[^A-Za-z0-9._-]', '-', teacher.label)[:40]}-{ls_id[3:11]}"
    ls = store.create(spec, extra={"teachers_preset": preset.to_dict(), "evaluated_on": gt.id}, name=name)
    s = run_label_job(paths, ls, teacher_stages(preset, onto), runner=runner, ray_address=ray_address, progress=progress)
    return ls, s.processed


def mask_miou(gt: list[LabelRecord], pred: dict[str, LabelRecord], classes: list[str], min_score: float = 0.0) -> dict:
    """Mask mIoU over matched instances: the mean, over every non-crowd GT instance g, of
    ``max_p IoU(mask(g), mask(p))`` over the predictions p on the same image whose class (the
    argmax of the soft scores, as :func:`~distillery.engine.evaluation.records_to_predictions`
    assigns) is g's class and whose ``box_score >= min_score``; 0 when there is none.

    This is the Average Best Overlap of Uijlings et al., "Selective Search for Object
    Recognition" (IJCV 2013, section 5.1), restricted to predictions of the GT instance's
    class; IoU is ``pycocotools.mask.iou`` on the RLE masks (full frame, ``[height, width]``).
    It measures how well each object is segmented when found, and recall: extra predictions
    never lower it, so read it together with AP, which does penalise them.

    Args:
        gt: GT records (crowd instances are skipped).
        pred: teacher records by ``image_id``; an image missing here has no predictions.

    Returns:
        ``{"mIoU": mean over GT instances (None when there are none), "instances": n,
        "per_class": {name: {"mIoU", "gt_instances"}}}`` for classes with GT instances.
    """
    ious: dict[int, list[float]] = {}
    for g in gt:
        p = pred.get(g.image_id)
        gcls = g.scores.argmax(1) if g.num_instances else np.zeros(0, int)
        pcls = p.scores.argmax(1) if p is not None and p.num_instances else np.zeros(0, int)
        for c in np.unique(gcls[~g.iscrowd]):
            gk = [k for k in range(g.num_instances) if gcls[k] == c and not g.iscrowd[k]]
            pk = [k for k in range(len(pcls)) if pcls[k] == c and p.box_score[k] >= min_score]
            if pk:
                iou = np.asarray(mask_utils.iou([p.masks[k] for k in pk], [g.masks[k] for k in gk], [0] * len(gk)))
                best = iou.reshape(len(pk), len(gk)).max(0)
            else:
                best = np.zeros(len(gk))
            ious.setdefault(int(c), []).extend(float(v) for v in best)
    every = [v for vs in ious.values() for v in vs]
    return {"mIoU": float(np.mean(every)) if every else None, "instances": len(every),
            "per_class": {classes[c]: {"mIoU": float(np.mean(v)), "gt_instances": len(v)} for c, v in sorted(ious.items())}}


def score_teacher(gt_coco: dict, gt: list[LabelRecord], pred: dict[str, LabelRecord], classes: list[str]) -> dict:
    """:func:`~distillery.engine.evaluation.evaluate` report of one teacher's records (keyed
    by ``image_id``; GT ``file_name`` entries are image ids) plus ``mask_mIoU`` (:func:`mask_miou`)."""
    records = []
    for g in gt:
        if g.image_id in pred:
            r = pred[g.image_id]
            records.append(LabelRecord(image_id=r.image_id, path=g.image_id, width=r.width, height=r.height,
                                       num_classes=len(classes), boxes=r.boxes, scores=r.scores, box_score=r.box_score,
                                       masks=r.masks, mask_score=r.mask_score))
    report = evaluate(gt_coco, records_to_predictions(records, classes), classes,  # the numbers are in the report
                      image_files=[g.image_id for g in gt], quiet=True)
    report["mask_mIoU"] = mask_miou(gt, pred, classes)
    return report


def per_class_values(report: dict, name: str, gt_instances: int) -> dict:
    """``{metric: value}`` of one class (:data:`METRICS`); AP 0.0 where the teacher predicted nothing."""
    box = report["bbox"]["per_class"].get(name, {}).get("AP50-95")
    segm = report["segm"]["per_class"].get(name, {}).get("AP50-95")
    miou = report["mask_mIoU"]["per_class"].get(name, {}).get("mIoU")
    zero = 0.0 if gt_instances else None
    return {"box AP50-95": zero if box is None else box, "mask AP50-95": zero if segm is None else segm,
            "mask mIoU": zero if miou is None else miou}


def compare(reports: dict[str, dict], classes: list[str]) -> list[dict]:
    """Per class with GT instances: each teacher's :data:`METRICS`, the deltas of every
    teacher after the first (the baseline) against it, and ``worse``: ``{teacher: [metrics
    whose delta is negative]}`` (only teachers with any)."""
    labels = list(reports)
    first = reports[labels[0]]
    rows = []
    for name in classes:
        n = first["mask_mIoU"]["per_class"].get(name, {}).get("gt_instances", 0)
        if not n:
            continue
        vals = {t: per_class_values(reports[t], name, n) for t in labels}
        delta = {t: {m: vals[t][m] - vals[labels[0]][m] for m in METRICS} for t in labels[1:]}
        worse = {t: [m for m in METRICS if d[m] < 0] for t, d in delta.items()}
        rows.append({"class": name, "gt_instances": n, "values": vals, "delta": delta,
                     "worse": {t: w for t, w in worse.items() if w}})
    return rows


def summary(report: dict) -> dict:
    """Headline numbers of one teacher: box/mask mAP50-95 and mAP50, mask mIoU."""
    return {"box mAP50-95": report["bbox"]["mAP50-95"], "box mAP50": report["bbox"]["mAP50"],
            "mask mAP50-95": report["segm"]["mAP50-95"], "mask mAP50": report["segm"]["mAP50"],
            "mask mIoU": report["mask_mIoU"]["mIoU"]}


@dataclass
class TeacherEval:
    """What :func:`run_teacher_eval` measured; ``report`` is what ``report.json`` holds."""

    report: dict
    rows: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def run_teacher_eval(store: LabelStore, gt: LabelSet, teachers: list[Teacher], *, val_only: bool | None = None,
                     val_fraction: float | None = None, limit: int | None = None, curation: int | None = None,
                     runner: str = "local", ray_address: str | None = None, progress: bool = False,
                     predictions: dict[str, LabelSet] | None = None) -> TeacherEval:
    """Label the GT's evaluation images with each teacher and score them (module docstring).

    Args:
        teachers: in order; the first is the baseline of the deltas.
        val_only, val_fraction: see :func:`choose_split`. limit: keep the first N evaluation
            images by path. curation: GT curation version (None: latest; 0: none).
        predictions: label sets to score as they are, by teacher label, instead of labelling
            with that teacher (label sets made elsewhere; the GT itself as an oracle).

    Raises:
        TeacherEvalError: bad GT, split or ``finetune.json``; no evaluation image; a teacher
        has no labels for an evaluation image (its error named). Errors of
        :func:`label_teacher` and :func:`~distillery.engine.evaluation.evaluate`.
    """
    if len({t.label for t in teachers}) != len(teachers):
        raise TeacherEvalError(f"teacher labels repeat: {[t.label for t in teachers]}")
    records, version = gt_records(gt, curation)
    fraction, why = choose_split(teachers, val_only, val_fraction)
    held = [r for r in records if fraction is None or is_val(r.image_id, fraction)]
    held = sorted(held, key=lambda r: r.path)[:limit]
    if not held:
        raise TeacherEvalError(f"no evaluation images: label set {gt.name or gt.id} has {len(records)} usable images, "
                               f"none left by the {why}; raise --val-fraction or use --all-images")
    if not any((~r.iscrowd).any() for r in held):
        raise TeacherEvalError(f"the {len(held)} evaluation images of label set {gt.name or gt.id} hold no GT instance "
                               "(after curation); AP is undefined: use --all-images or a larger --val-fraction")
    ids, held_paths = {r.image_id for r in held}, {r.path for r in held}
    warnings = []
    gt_coco = _gt_coco(held, gt.classes)
    reports, made = {}, {}
    checked = {}  # every preset checked before the first teacher labels (hours, with real teachers)
    for t in teachers:
        if t.label not in (predictions or {}):
            checked[t.label] = checked_preset(t, gt)
            if not ray_address:
                checked[t.label][0].check_device_here(str(t.preset_path))
    for t in teachers:
        overlap = training_overlap(store, t, ids)
        if overlap:
            warnings.append(f"{t.label} was fine-tuned on {overlap} of the {len(held)} evaluation images ({t.finetune_path}: "
                            f"val_fraction {t.finetune['val_fraction']:g}); its scores are optimistic: use --val-only "
                            f"with --val-fraction at most {t.finetune['val_fraction']:g}")
        elif overlap is None:
            warnings.append(f"{t.label}: the label set {t.finetune['labelset']!r} it was fine-tuned on is not in {store.root}; "
                            "cannot check that the evaluation images were held out")
        if t.label in (predictions or {}):
            ls, n_new = predictions[t.label], 0
        else:
            ls, n_new = label_teacher(store, t, gt, [r.path for r in held], runner=runner, ray_address=ray_address,
                                      progress=progress, checked=checked[t.label])
        pred, failed = {}, {}
        for r in ls.iter_records():
            if r.image_id in ids and r.error is None:
                pred[r.image_id] = r
            elif r.error is not None and r.path in held_paths:
                failed[r.path] = r.error
        missing = [h for h in held if h.image_id not in pred]
        if missing:
            p = missing[0].path
            raise TeacherEvalError(f"teacher {t.label} has no labels for {len(missing)} of the {len(held)} evaluation "
                                   f"images (label set {ls.id}), e.g. {p}: {failed.get(p, 'not labelled')}")
        reports[t.label] = score_teacher(gt_coco, held, pred, gt.classes)
        made[t.label] = {"labelset": ls.id, "labelset_name": ls.name, "labelled_now": n_new}
    rows = compare(reports, gt.classes)
    report = {
        "gt": {"labelset": gt.id, "name": gt.name, "curation_version": version},
        "images": len(held), "split": {"val_fraction": fraction, "why": why, "limit": limit},
        "baseline": teachers[0].label, "metrics": list(METRICS), "warnings": warnings,
        "teachers": [{"label": t.label, "preset": str(t.preset_path), "finetune": t.finetune, **made[t.label],
                      **summary(reports[t.label])} for t in teachers],
        "per_class": rows, "reports": reports,
    }
    return TeacherEval(report=report, rows=rows, warnings=warnings)


def _gt_coco(records: list[LabelRecord], classes: list[str]) -> dict:
    """GT records -> COCO dict whose ``file_name`` is the image id (unique where basenames
    may repeat across folders; :func:`evaluate` matches images by basename)."""
    from distillery.labeling.coco import records_to_coco

    coco = records_to_coco(records, classes)
    for im in coco["images"]:
        im["file_name"] = im["distillery_image_id"]
    return coco
