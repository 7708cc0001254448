"""Review decisions in a FiftyOne dataset: reading them, writing them to the store as a
curation version, and carrying them over when samples are rewritten.

Decisions are label tags (``accept``, ``reject``, ``ignore``) and ``relabel:<class>`` for a
class correction; sample tags ``accept`` / ``reject`` / ``ignore`` decide a whole image.
Teacher output is never changed: ``teacher_label`` keeps the teacher's class, and a rule's
decision is remembered in ``rule_decision`` so that a tag the rules did not set counts as
manual. Stored decisions follow :data:`distillery.engine.store.CURATION_SCHEMA`.
"""

from __future__ import annotations

import pyarrow as pa

from distillery.engine.store import CURATION_SCHEMA, DECISIONS, LabelSet
from distillery.labeling.curation.database import FIELD, CurationError

RELABEL = "relabel:"

#: Per-detection fields that carry decisions, read together by commit and by re-sync.
DECISION_FIELDS = tuple(f"{FIELD}.detections.{f}" for f in ("instance_uid", "tags", "label", "teacher_label", "rule_decision"))


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
    vals = samples.values(["filepath", "image_id", "error", "tags", *DECISION_FIELDS])
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


def carried_from_table(t: pa.Table) -> dict:
    """Committed decisions (a :data:`~distillery.engine.store.CURATION_SCHEMA` table) as the
    tags to restore: ``{instance_id or image_id: {"tags", "label", "rule_decision"}}``."""
    out = {}
    for r in t.to_pylist():
        key = r["instance_id"] if r["instance_id"] is not None else r["image_id"]
        tags = ([r["decision"]] if r["decision"] else []) + ([RELABEL + r["label"]] if r["label"] else [])
        out[key] = {"tags": tags, "label": r["label"], "rule_decision": r["decision"] if r["source"] == "rules" else None}
    return out


def carried_from_samples(view) -> dict:
    """Current tags, corrections and rule decisions of the samples in ``view``, keyed by
    instance id (instances) and image id (sample tags), as :func:`carried_from_table`."""
    out = {}
    for image_id, stags, iids, ltags, labels, teacher, rdec in zip(*view.values(["image_id", "tags", *DECISION_FIELDS])):
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
