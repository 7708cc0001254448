"""Label store <-> FiftyOne: incremental sync of a label set into a persistent dataset,
saved review views, and reading decisions back.

One sample per stored image (``filepath`` absolute). Its instances are ``fo.Detection`` s in
the field ``pseudo`` in FiftyOne's conventions: ``bounding_box`` is relative
``[x, y, width, height]`` in [0, 1] of the EXIF-corrected frame, and ``mask`` is a boolean
array covering exactly the pixels FiftyOne pastes it onto -- columns
``int(W * x) .. int(W * (x + width))`` and the same for rows (``eta.core.geometry``
``BoundingBox.coords_in``), so pasting it back (``Detection.to_segmentation``) gives the
stored mask inside the box bit for bit. Mask pixels outside the box are not shown by
FiftyOne; their share is the attribute ``mask_outside``.

Decisions are label tags (``accept``, ``reject``, ``ignore``) and ``relabel:<class>`` for a
class correction; sample tags ``accept`` / ``reject`` / ``ignore`` decide a whole image.
Teacher output is never changed: ``teacher_label`` keeps the teacher's class. Each
detection's ``instance_uid`` is the store's instance id
(:attr:`distillery.engine.record.LabelRecord.instance_ids`; FiftyOne reserves ``instance_id``).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from distillery.engine.images import error_kind
from distillery.engine.record import LabelRecord
from distillery.engine.store import CURATION_SCHEMA, DECISIONS, LabelSet, StoreError
from distillery.labeling.curation.config import CurationConfig
from distillery.labeling.curation.signals import fired_rules, instance_signals, near_duplicate_groups, phash, rule_decision

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")  # an offline tool: no usage analytics

FIELD = "pseudo"
RELABEL = "relabel:"
_BATCH = 500


class CurationError(ValueError):
    """A dataset, its decisions or a request about them is inconsistent; the message says how to fix it."""


_DB_CHECKED = False


def _fo():
    """FiftyOne, after checking that its database is the one asked for (:func:`check_database`)."""
    global _DB_CHECKED
    import fiftyone as fo

    if not _DB_CHECKED:
        check_database()
        _DB_CHECKED = True
    return fo


def check_database() -> None:
    """Raise :class:`CurationError` if ``FIFTYONE_DATABASE_DIR`` asks for one folder but FiftyOne
    is connected to a MongoDB that keeps its files elsewhere.

    FiftyOne attaches to a database service that another FiftyOne process already runs,
    whatever folder that one uses (``fiftyone.core.service.DatabaseService``); writing there
    silently would mix datasets. With ``FIFTYONE_DATABASE_URI`` set, the URI decides and
    nothing is checked.
    """
    want = os.environ.get("FIFTYONE_DATABASE_DIR")
    if not want or os.environ.get("FIFTYONE_DATABASE_URI"):
        return
    from fiftyone.core.odm.database import get_db_client

    try:
        opts = get_db_client().admin.command("getCmdLineOpts")
        got = opts.get("parsed", {}).get("storage", {}).get("dbPath")
    except Exception:  # noqa: BLE001 - a MongoDB that will not say where it is: nothing to compare
        return
    if got and os.path.realpath(got) != os.path.realpath(os.path.expanduser(want)):
        raise CurationError(
            f"FiftyOne is connected to a MongoDB that keeps its files in {got}, not in the requested "
            f"database dir {want}: another FiftyOne process on this machine already runs a database service, and "
            "FiftyOne attaches to it. Stop that process, or run a MongoDB of your own and pass --database-uri "
            "(FIFTYONE_DATABASE_URI)."
        )


# -- conversion ---------------------------------------------------------------------------

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
        carried: decisions to restore, ``{instance_id or image_id: {"tags", "label", "rule_decision"}}``.
        with_phash: compute the perceptual hash (decodes the image once more).
    """
    fo = _fo()
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
    decoded = mask_utils.decode(rec.masks) if rec.num_instances else None
    dets = []
    for k in range(rec.num_instances):
        rel = relative_box(rec.boxes[k], W, H)
        x0, y0, x1, y1 = mask_region(rel, W, H)
        full = decoded[:, :, k].astype(bool)
        crop = full[y0:y1, x0:x1]
        total = int(full.sum())
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


# -- decisions ----------------------------------------------------------------------------

#: Per-detection fields that carry decisions, read together by commit and by re-sync.
_DECISION_FIELDS = [f"{FIELD}.detections.{f}" for f in ("instance_uid", "tags", "label", "teacher_label", "rule_decision")]


def _decision_of(tags: list[str], where: str) -> str | None:
    ds = [t for t in tags or [] if t in DECISIONS]
    if len(set(ds)) > 1:
        hint = ("filter by sample tags in the App to find it" if where.startswith("image")
                else "saved view 'conflicting-decisions' lists them")
        raise CurationError(f"{where} has conflicting decision tags {sorted(set(ds))}; keep one ({hint})")
    return ds[0] if ds else None


def collect_decisions(samples, classes: list[str]) -> pa.Table:
    """Every decision in ``samples`` (a dataset or view) as a table of
    :data:`distillery.engine.store.CURATION_SCHEMA`. An instance is in it when it has a decision tag or a
    class correction (``relabel:<class>`` tag, or ``label`` != ``teacher_label``).

    Raises:
        CurationError: an instance or image has two different decision tags, several
            ``relabel:`` tags, or a correction to a class outside the ontology.
    """
    vals = samples.values(["filepath", "image_id", "error", "tags", *_DECISION_FIELDS])
    known = set(classes)
    rows = []
    for path, image_id, error, stags, iids, ltags, labels, teacher, rdec in zip(*vals):
        if error is not None:
            continue  # a failed image has no labels to decide on (the student never sees it)
        d = _decision_of(stags, f"image {path}")
        if d is not None:
            rows.append({"image_id": image_id, "instance_id": None, "decision": d, "label": None, "source": "manual"})
        for iid, tags, lab, tlab, rd in zip(iids or [], ltags or [], labels or [], teacher or [], rdec or []):
            where = f"instance {iid} of {path}"
            d = _decision_of(tags, where)
            rel = [t[len(RELABEL):] for t in tags or [] if t.startswith(RELABEL)]
            if len(set(rel)) > 1:
                raise CurationError(f"{where} has several class corrections {sorted(set(rel))}; keep one")
            new = rel[0] if rel else (lab if lab != tlab else None)
            if new is not None and new not in known:
                raise CurationError(f"{where}: class correction {new!r} is not in the ontology; known: "
                                    f"{', '.join(classes[:20])}{'...' if len(classes) > 20 else ''}")
            if new == tlab:
                new = None
            if d is None and new is None:
                continue
            source = "rules" if (d is not None and d == rd and new is None) else "manual"
            rows.append({"image_id": image_id, "instance_id": iid, "decision": d, "label": new, "source": source})
    return pa.Table.from_pylist(rows, schema=CURATION_SCHEMA)


def _carried_from_table(t: pa.Table) -> dict:
    out = {}
    for r in t.to_pylist():
        key = r["instance_id"] if r["instance_id"] is not None else r["image_id"]
        tags = ([r["decision"]] if r["decision"] else []) + ([RELABEL + r["label"]] if r["label"] else [])
        out[key] = {"tags": tags, "label": r["label"], "rule_decision": r["decision"] if r["source"] == "rules" else None}
    return out


def _carried_from_samples(view) -> dict:
    """Current tags, corrections and rule decisions of the samples in ``view``, keyed by
    instance id (instances) and image id (sample tags)."""
    out = {}
    for image_id, stags, iids, ltags, labels, teacher, rdec in zip(*view.values(["image_id", "tags", *_DECISION_FIELDS])):
        keep = [t for t in stags or [] if not t.startswith("error:")]
        if keep:
            out[image_id] = {"tags": keep, "label": None, "rule_decision": None}
        for iid, tags, lab, tlab, rd in zip(iids or [], ltags or [], labels or [], teacher or [], rdec or []):
            tags = list(tags or [])
            if lab != tlab and not any(t.startswith(RELABEL) for t in tags):
                tags.append(RELABEL + lab)  # a label edited in place becomes the equivalent tag
            if tags or rd:
                out[iid] = {"tags": tags, "label": None, "rule_decision": rd}
    return out


# -- sync ---------------------------------------------------------------------------------

@dataclass
class SyncSummary:
    dataset: str
    labelset: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: int = 0
    instances: int = 0
    restored_decisions: int = 0
    near_duplicate_images: int = 0
    rebanded: int = 0
    seconds: float = 0.0
    views: list = field(default_factory=list)


def bound_labelset(name: str) -> str | None:
    """Id of the label set that dataset ``name`` was synced from; None if there is no such dataset."""
    fo = _fo()
    if not fo.dataset_exists(name):
        return None
    return (fo.load_dataset(name).info or {}).get("distillery", {}).get("labelset")


def open_dataset(name: str, labelset: LabelSet | None = None, create: bool = False):
    """The persistent dataset ``name``; created (bound to ``labelset``) when ``create``.

    Raises:
        CurationError: the dataset does not exist (and not ``create``), or it holds another label set.
    """
    fo = _fo()
    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        bound = (ds.info or {}).get("distillery", {}).get("labelset")
        if bound is None:
            raise CurationError(f"FiftyOne dataset {name!r} was not made by `distillery curate sync`; choose another --dataset")
        if labelset is not None and bound != labelset.id:
            raise CurationError(
                f"FiftyOne dataset {name!r} holds label set {bound}, not {labelset.id}; sync into another --dataset "
                f"or delete it (`fiftyone datasets delete {name}`)"
            )
        return ds
    if not create:
        raise CurationError(f"no FiftyOne dataset {name!r}; create it with `distillery curate sync --dataset {name}`")
    ds = fo.Dataset(name, persistent=True)
    for fname, ftype in (("image_id", fo.StringField), ("store_row", fo.StringField), ("error", fo.StringField),
                         ("num_instances", fo.IntField), ("phash", fo.StringField), ("dup_group", fo.IntField)):
        ds.add_sample_field(fname, ftype)
    ds.info = {"distillery": {"labelset": labelset.id, "store": str(labelset.root.parent.parent.resolve()),
                              "classes": labelset.classes}}
    ds.save()
    return ds


def sync(labelset: LabelSet, name: str, cfg: CurationConfig | None = None, with_phash: bool = True,
         progress: bool = True) -> SyncSummary:
    """Bring FiftyOne dataset ``name`` up to date with ``labelset``: add samples for new images,
    replace samples whose stored row changed (a retried error), leave the rest untouched.

    Decisions are restored on every sample written: those already in the dataset (uncommitted
    edits of a replaced sample) first, then the latest committed curation version, matched by
    instance id and image id; decisions for instances that no longer exist are dropped.

    Raises:
        CurationError: the dataset holds another label set.
    """
    from tqdm import tqdm

    fo = _fo()
    cfg = cfg or CurationConfig()
    t0 = time.perf_counter()
    classes = labelset.classes
    cfg.check_classes(classes)
    committed = labelset.curation()[0]  # before creating anything: a damaged layer fails first
    ds = open_dataset(name, labelset, create=True)
    live = labelset.read_columns(["path"], provenance=True)
    want = {
        os.path.abspath(p): f"{s}:{r}"
        for p, s, r in zip(*(live.column(c).to_pylist() for c in ("path", "shard", "row")))
    }
    have = dict(zip(*ds.values(["filepath", "store_row"]))) if len(ds) else {}
    todo = {p: key for p, key in want.items() if have.get(p) != key}
    summary = SyncSummary(dataset=name, labelset=labelset.id, unchanged=len(want) - len(todo))
    changed = [p for p in todo if p in have]
    carried = _carried_from_table(committed)
    if changed:
        old = ds.select_by("filepath", changed)
        carried.update(_carried_from_samples(old))
        ds.delete_samples(old)
    summary.updated = len(changed)
    summary.added = len(todo) - len(changed)

    by_shard: dict[str, list[int]] = defaultdict(list)
    for key in todo.values():
        shard, row = key.rsplit(":", 1)
        by_shard[shard].append(int(row))
    batch = []
    bar = tqdm(total=len(todo), desc="sync", unit="img", disable=not progress or not todo)
    for shard, rows in sorted(by_shard.items()):
        for row, rec in zip(rows, labelset.records_at(shard, rows)):
            s = record_to_sample(rec, classes, cfg, f"{shard}:{row}", carried, with_phash)
            summary.errors += rec.error is not None
            summary.instances += rec.num_instances
            if s[FIELD] is not None:
                summary.restored_decisions += sum(1 for d in s[FIELD].detections if d.tags or d["rule_decision"])
            summary.restored_decisions += bool(s.tags and rec.error is None)
            batch.append(s)
            if len(batch) >= _BATCH:
                ds.add_samples(batch, progress=False, dynamic=True)
                bar.update(len(batch))
                batch = []
    if batch:
        ds.add_samples(batch, progress=False, dynamic=True)
        bar.update(len(batch))
    bar.close()

    if todo and with_phash:
        ids, hashes = ds.values(["id", "phash"])
        groups = near_duplicate_groups(hashes, cfg.near_duplicate_bits)
        ds.set_values("dup_group", dict(zip(ids, groups)), key_field="id")
        summary.near_duplicate_images = sum(g is not None for g in groups)
    elif with_phash and ds.has_field("dup_group"):
        summary.near_duplicate_images = ds.count("dup_group")
    info = dict(ds.info)
    if info.get("distillery", {}).get("curation") not in (None, cfg.to_dict()) and len(ds):
        summary.rebanded = recompute_bands(ds, cfg)  # new thresholds apply to every sample
    info["distillery"] = {**info.get("distillery", {}), "curation": cfg.to_dict()}
    ds.info = info
    ds.classes = {FIELD: classes}
    ds.save()
    summary.views = save_views(ds, cfg)
    summary.seconds = time.perf_counter() - t0
    return summary


# -- rules --------------------------------------------------------------------------------

def recompute_bands(ds, cfg: CurationConfig) -> int:
    """Set every instance's ``band`` from ``cfg``'s per-class thresholds; returns how many changed."""
    p = f"{FIELD}.detections."
    labels, scores, old = ds.values([p + "teacher_label", p + "confidence", p + "band"])
    new = [None if ls is None else [cfg.band(lab).of(sc) for lab, sc in zip(ls, ss)] for ls, ss in zip(labels, scores)]
    changed = sum(a != b for o, n in zip(old, new) if n is not None for a, b in zip(o or [], n))
    if changed:
        ds.set_values(p + "band", new)
    return changed


def apply_rules(ds, cfg: CurationConfig, overwrite_manual: bool = False) -> Counter:
    """Set decision tags from ``cfg.rules`` on every instance (see
    :func:`distillery.labeling.curation.signals.fired_rules` / ``rule_decision``) after recomputing each
    instance's score band with ``cfg``'s thresholds. Manual decisions (a decision tag that
    the rules did not set) are kept unless ``overwrite_manual``.

    Returns:
        counts of ``accept`` / ``reject`` / ``ignore`` / ``none`` set by the rules,
        ``manual_kept``, and ``fired:<signal>`` for every rule signal that held.
    """
    classes = ds.info["distillery"]["classes"]
    cfg.check_classes(classes)
    recompute_bands(ds, cfg)
    p = f"{FIELD}.detections."
    cols = ["tags", "confidence", "band", "margin", "mask_box_iou", "area", "overlap_iou", "rule_decision"]
    vals = ds.values([p + c for c in cols])
    counts: Counter = Counter()
    new_tags, new_rd = [], []
    for tags_s, sc_s, band_s, mg_s, mb_s, ar_s, ov_s, rd_s in zip(*vals):
        if tags_s is None:
            new_tags.append(None), new_rd.append(None)
            continue
        ts, rs = [], []
        for tags, sc, band, mg, mb, ar, ov, rd in zip(tags_s, sc_s, band_s, mg_s, mb_s, ar_s, ov_s, rd_s):
            tags = list(tags or [])
            current = [t for t in tags if t in DECISIONS]
            manual = bool(current) and (len(current) > 1 or current[0] != rd)
            fired = fired_rules(sc, band, mg, mb, ar, ov, cfg)
            counts.update(f"fired:{f}" for f in fired)
            if manual and not overwrite_manual:
                counts["manual_kept"] += 1
                ts.append(tags), rs.append(rd)
                continue
            d = rule_decision(fired, cfg)
            counts[d or "none"] += 1
            ts.append([t for t in tags if t not in DECISIONS] + ([d] if d else []))
            rs.append(d)
        new_tags.append(ts), new_rd.append(rs)
    ds.set_values(p + "tags", new_tags)
    ds.set_values(p + "rule_decision", new_rd)
    info = dict(ds.info)
    info["distillery"] = {**info["distillery"], "curation": cfg.to_dict()}
    ds.info = info
    ds.save()
    save_views(ds, cfg)
    return counts


def commit(ds, labelset: LabelSet) -> tuple[int, bool, pa.Table]:
    """Write the dataset's decisions to the store as a new curation version.

    Returns:
        ``(version, written, decisions)``; ``written`` is False (and ``version`` the latest)
        when the decisions equal the latest committed version.

    Raises:
        CurationError: conflicting tags (see :func:`collect_decisions`), or the dataset
            holds another label set.
    """
    bound = ds.info.get("distillery", {}).get("labelset")
    if bound != labelset.id:
        raise CurationError(f"dataset {ds.name!r} holds label set {bound}, not {labelset.id}; pass --labelset {bound}")
    table = collect_decisions(ds, labelset.classes)

    def key(t):
        return sorted(tuple("" if v is None else v for v in r.values()) for r in t.to_pylist())

    with labelset.curation_lock():  # concurrent commits: one writes, the others see it unchanged
        latest, meta = labelset.curation()
        if meta["version"] and key(latest) == key(table):
            return meta["version"], False, table
        version = labelset.commit_curation(table, {"dataset": ds.name, "parent": meta["version"] or None})
    return version, True, table


# -- saved views --------------------------------------------------------------------------

def save_views(ds, cfg: CurationConfig) -> list[str]:
    """(Re)create the review saved views on ``ds`` with ``cfg``'s thresholds; returns their names.

    ``review-queue``: undecided instances, images by their highest priority, highest first.
    ``band-confident`` / ``band-uncertain`` / ``band-below``: instances per score band (per-class
    thresholds). ``ambiguous-class``, ``mask-box-disagree``, ``tiny``, ``image-filling``,
    ``same-class-overlap``: instances past the matching threshold. ``near-duplicates``:
    images with a pHash neighbour, grouped. ``many-instances``, ``zero-instances``,
    ``errors``: images. ``conflicting-decisions``: instances with two decision tags.
    """
    from fiftyone import ViewField as F

    det = F(f"{FIELD}.detections")
    undecided = ~F("tags").contains(list(DECISIONS))
    views = {
        "review-queue": ds.filter_labels(FIELD, undecided).sort_by(
            F(f"{FIELD}.detections").map(F("priority")).max(), reverse=True),
        "band-confident": ds.filter_labels(FIELD, F("band") == "confident"),
        "band-uncertain": ds.filter_labels(FIELD, F("band") == "uncertain"),
        "band-below": ds.filter_labels(FIELD, F("band") == "below"),
        "ambiguous-class": ds.filter_labels(FIELD, F("margin") < cfg.ambiguity_margin).sort_by(
            det.map(F("margin")).min()),
        "mask-box-disagree": ds.filter_labels(FIELD, F("mask_box_iou") < cfg.mask_box_iou),
        "tiny": ds.filter_labels(FIELD, F("area") < cfg.min_area),
        "image-filling": ds.filter_labels(FIELD, F("area") > cfg.max_area),
        "same-class-overlap": ds.filter_labels(FIELD, F("overlap_iou") > cfg.overlap_iou),
        "near-duplicates": ds.match(F("dup_group") != None).sort_by("dup_group"),  # noqa: E711
        "many-instances": ds.match(F("num_instances") > cfg.many_instances).sort_by("num_instances", reverse=True),
        "zero-instances": ds.match((F("num_instances") == 0) & (F("error") == None)),  # noqa: E711
        "errors": ds.match(F("error") != None),  # noqa: E711
        "conflicting-decisions": ds.filter_labels(
            FIELD, F("tags").filter(F().is_in(list(DECISIONS))).unique().length() > 1),
    }
    for name, view in views.items():
        ds.save_view(name, view, overwrite=True)
    return list(views)
