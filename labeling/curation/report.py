"""``curate report``: per-class instance counts, score histograms with the band thresholds
drawn, and decision totals, as PNG plots (matplotlib, Agg backend) and one JSON of the
same numbers. Reads the store only (labels and the latest committed curation version).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from distillery.engine.images import error_kind
from distillery.engine.store import DECISIONS, LabelSet
from distillery.labeling.curation.config import CurationConfig

#: Histogram bin edges on box_score: 20 bins of 0.05 over [0, 1].
BINS = np.round(np.linspace(0.0, 1.0, 21), 2)


def report_numbers(labelset: LabelSet, cfg: CurationConfig | None = None) -> dict:
    """The report's numbers (what ``report.json`` holds).

    Returns:
        ``{"labelset", "curation_version", "images", "labeled", "instances", "errors" {kind: n},
        "bins" (edges), "classes" {name: {"instances", "mean_score", "histogram" (counts per
        bin), "bands" {band: n}, "thresholds" {confident, below}, "decisions" {decision: n}}},
        "decisions" {accept, reject, ignore, undecided, relabeled, image_level}}``. Per-class
        numbers are by the teacher's top class; an instance counts as ``undecided`` when the
        latest curation version has no decision for it.
    """
    cfg = cfg or CurationConfig()
    classes = labelset.classes
    decisions, meta = labelset.curation()
    by_iid = {r["instance_id"]: r for r in decisions.to_pylist() if r["instance_id"] is not None}
    image_level = Counter(r["decision"] for r in decisions.to_pylist() if r["instance_id"] is None)
    scores: dict[str, list[float]] = defaultdict(list)
    per_class_dec: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter({d: 0 for d in (*DECISIONS, "undecided", "relabeled")})
    images = labeled = 0
    errors: Counter = Counter()
    for rec in labelset.iter_records():  # one pass: counts, scores and decisions together
        images += 1
        if rec.error is not None:
            errors[error_kind(rec.error)] += 1
            continue
        labeled += 1
        top = rec.scores.argmax(1)
        for iid, c, s in zip(rec.instance_ids, top, rec.box_score):
            name = classes[int(c)]
            scores[name].append(float(s))
            r = by_iid.get(iid)
            d = (r or {}).get("decision") or "undecided"
            per_class_dec[name][d] += 1
            totals[d] += 1
            totals["relabeled"] += bool(r and r["label"])
    out_classes = {}
    for name in classes:
        s = np.asarray(scores.get(name, []), np.float64)
        band = cfg.band(name)
        out_classes[name] = {
            "instances": int(len(s)),
            "mean_score": float(s.mean()) if len(s) else None,
            "histogram": np.histogram(s, BINS)[0].tolist(),
            "bands": dict(Counter(band.of(v) for v in s)),
            "thresholds": {"confident": band.confident, "below": band.below},
            "decisions": dict(per_class_dec.get(name, {})),
        }
    return {
        "labelset": labelset.id,
        "curation_version": meta["version"],
        "images": images,
        "labeled": labeled,
        "instances": sum(len(v) for v in scores.values()),
        "errors": dict(errors),
        "bins": BINS.tolist(),
        "classes": out_classes,
        "decisions": {**dict(totals), "image_level": dict(image_level)},
    }


def write_report(labelset: LabelSet, out: str | Path, cfg: CurationConfig | None = None) -> dict:
    """Write ``counts.png``, ``scores.png``, ``decisions.png`` and ``report.json`` into ``out``
    (created); returns the numbers. Classes without instances are listed in the JSON but
    left out of the plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"report output {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("counts.png", "scores.png", "decisions.png", "report.json"):
        if (out / name).is_dir():
            raise FileExistsError(f"{out / name} is a directory; remove it or choose another --out")
    nums = report_numbers(labelset, cfg)
    present = sorted((n for n, c in nums["classes"].items() if c["instances"]),
                     key=lambda n: -nums["classes"][n]["instances"])
    title = f"label set {nums['labelset']} - {nums['images']} images, {nums['instances']} instances"

    # per-class counts
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.25 * len(present) + 1)))
    ax.barh(present[::-1], [nums["classes"][n]["instances"] for n in present[::-1]], color="#4477aa")
    ax.set_xlabel("instances (by teacher's top class)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "counts.png", dpi=100)
    plt.close(fig)

    # score histograms, small multiples with the band thresholds drawn
    cols = 4
    rows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    centers, width = (BINS[:-1] + BINS[1:]) / 2, BINS[1] - BINS[0]
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, present):
        c = nums["classes"][name]
        ax.bar(centers, c["histogram"], width=width * 0.9, color="#66ccee")
        ax.axvline(c["thresholds"]["below"], color="#ee6677", ls="--", lw=1, label="below")
        ax.axvline(c["thresholds"]["confident"], color="#228833", ls="--", lw=1, label="confident")
        ax.set_title(f"{name} (n={c['instances']})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
    fig.suptitle("box score histograms per class; dashed: band thresholds (red: below, green: confident)", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.5 / (2.3 * rows), top=1 - 1.0 / (2.3 * rows), hspace=0.55, wspace=0.25)
    fig.savefig(out / "scores.png", dpi=100)
    plt.close(fig)

    # decision totals, overall and per class (stacked)
    kinds = [*DECISIONS, "undecided"]
    colors = {"accept": "#228833", "reject": "#ee6677", "ignore": "#ccbb44", "undecided": "#bbbbbb"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, max(3, 0.25 * len(present) + 1)),
                                 gridspec_kw={"width_ratios": [1, 2]})
    a1.bar(kinds, [nums["decisions"][k] for k in kinds], color=[colors[k] for k in kinds])
    a1.set_title(f"decisions (curation v{nums['curation_version']})", fontsize=10)
    left = np.zeros(len(present))
    for k in kinds:
        v = np.array([nums["classes"][n]["decisions"].get(k, 0) for n in present], float)
        a2.barh(present, v, left=left, color=colors[k], label=k)
        left += v
    a2.invert_yaxis()
    a2.set_xlim(0, max(1.0, float(left.max()) * 1.08) if len(left) else 1.0)
    a2.set_xlabel("instances")
    a2.legend(fontsize=8, loc="lower right")
    a2.set_title("per class", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "decisions.png", dpi=100)
    plt.close(fig)

    (out / "report.json").write_text(json.dumps(nums, indent=2))
    return nums
