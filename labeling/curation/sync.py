"""Label store -> FiftyOne: incremental sync of a label set into a persistent dataset."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from distillery.engine.store import LabelSet
from distillery.labeling.curation.config import CurationConfig
from distillery.labeling.curation.database import FIELD, open_dataset
from distillery.labeling.curation.decisions import carried_from_samples, carried_from_table
from distillery.labeling.curation.rules import recompute_bands
from distillery.labeling.curation.samples import record_to_sample
from distillery.labeling.curation.signals import near_duplicate_groups
from distillery.labeling.curation.views import save_views

_BATCH = 500  # samples per fo.Dataset.add_samples call


@dataclass
class SyncSummary:
    """What one :func:`sync` did: image counts (``added``, ``updated``: replaced because the
    stored row changed, ``unchanged``), what the written samples hold (``errors``: error
    images, ``instances``, ``restored_decisions``), ``near_duplicate_images`` in the whole
    dataset, ``rebanded`` instances (new thresholds), wall ``seconds`` and the saved ``views``."""

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


def sync(labelset: LabelSet, name: str, cfg: CurationConfig | None = None, with_phash: bool = True,
         progress: bool = True) -> SyncSummary:
    """Bring FiftyOne dataset ``name`` up to date with ``labelset``: add samples for new images,
    replace samples whose stored row changed (a retried error), leave the rest untouched.

    Decisions are restored on every sample written: those already in the dataset (uncommitted
    edits of a replaced sample) first, then the latest committed curation version, matched by
    instance id and image id; decisions for instances that no longer exist are dropped.

    Raises:
        CurationError: the dataset holds another label set, or the database is not the one
            asked for (:func:`distillery.labeling.curation.database.check_database`).
        ConfigError: ``cfg`` names a class the label set lacks.
    """
    from tqdm import tqdm

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
    carried = carried_from_table(committed)
    if changed:
        old = ds.select_by("filepath", changed)
        carried.update(carried_from_samples(old))
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
