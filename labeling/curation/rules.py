"""A curation config applied to a whole dataset: score bands and rule-based decisions."""

from __future__ import annotations

from collections import Counter

from distillery.engine.store import DECISIONS
from distillery.labeling.curation.config import CurationConfig
from distillery.labeling.curation.database import FIELD
from distillery.labeling.curation.signals import fired_rules, rule_decision
from distillery.labeling.curation.views import save_views


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

    Raises:
        ConfigError: ``cfg`` names a class the dataset's label set lacks.
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
