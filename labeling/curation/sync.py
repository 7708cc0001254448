"""Label store -> FiftyOne: incremental sync of a label set into a persistent dataset."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from distillery.engine.store import LabelSet
from distillery.labeling.curation.config import CurationConfig
from distillery.labeling.curation.database import FIELD, open_dataset
from distillery.labeling.curation.decisions import carried_from_samples, carried_from_table
from distillery.labeling.curation.rules import recompute_bands
from distillery.labeling.curation.samples import record_to_sample
from distillery.labeling.curation.signals import phash, update_duplicate_groups
from distillery.labeling.curation.views import save_views

_HASH_THREADS = 1  # pHash worker beside the thread that builds and adds samples (one keeps pace)


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

    The work is proportional to the images written, not to the dataset: samples go in
    through one streaming ``add_samples`` (FiftyOne batches it; the schema is declared up
    front by :func:`~distillery.labeling.curation.database.declare_schema`, so FiftyOne does
    not infer it from every sample), pHashes are computed in a background thread while
    samples are built, new hashes are grouped against the existing near-duplicate groups
    (:func:`~distillery.labeling.curation.signals.update_duplicate_groups`) and only samples
    whose group changes are written, and saved views are rewritten only when their
    definition changes. What still reads the whole dataset: one projection of ``id``,
    ``filepath``, ``store_row``, ``phash`` and ``dup_group`` to find what is new, and the
    hash index (a ball tree over every hash, in C). All groups are recomputed when
    ``near_duplicate_bits`` differs from the radius the groups were made with, or when an
    earlier sync stopped between adding samples and grouping them.

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
    old = dict(zip(("id", "filepath", "store_row", "phash", "dup_group"),
                   ds.values(["id", "filepath", "store_row", "phash", "dup_group"]) if len(ds) else [[]] * 5))
    have = dict(zip(old["filepath"], old["store_row"]))
    todo = {p: key for p, key in want.items() if have.get(p) != key}
    summary = SyncSummary(dataset=name, labelset=labelset.id, unchanged=len(want) - len(todo))
    changed = [p for p in todo if p in have]
    summary.updated = len(changed)
    summary.added = len(todo) - len(changed)
    if changed:
        carried = carried_from_table(committed)
        gone = ds.select_by("filepath", changed)
        carried.update(carried_from_samples(gone))
        ds.delete_samples(gone)
    else:
        carried = carried_from_table(committed) if todo else {}

    by_shard: dict[str, list[int]] = defaultdict(list)
    for key in todo.values():
        shard, row = key.rsplit(":", 1)
        by_shard[shard].append(int(row))
    new_hashes: list[str | None] = []
    bar = tqdm(total=len(todo), desc="sync", unit="img", disable=not progress or not todo)

    def samples(pool):
        for shard, rows in sorted(by_shard.items()):
            recs = labelset.records_at(shard, rows)
            todo_hash = [r.path if with_phash and r.error is None else None for r in recs]
            hashes = pool.map(lambda p: p and phash(p), todo_hash) if with_phash else todo_hash
            for row, rec, h in zip(rows, recs, hashes):
                s = record_to_sample(rec, classes, cfg, f"{shard}:{row}", carried, with_phash=False)
                s["phash"] = h
                new_hashes.append(h)
                summary.errors += rec.error is not None
                summary.instances += rec.num_instances
                if s[FIELD] is not None:
                    summary.restored_decisions += sum(1 for d in s[FIELD].detections if d.tags or d["rule_decision"])
                summary.restored_decisions += bool(s.tags and rec.error is None)
                bar.update()
                yield s

    info = dict(ds.info)
    meta = dict(info.get("distillery", {}))
    if todo and meta.get("duplicate_bits") is not None:
        # until the groups are updated below, the dataset holds samples that were never grouped:
        # if this sync stops on the way, the next one regroups every image
        ds.info = {**info, "distillery": {**meta, "duplicate_bits": None}}
        ds.save()
    new_ids = []
    if todo:
        # threads: pHash is image decoding and resizing in Pillow, which releases the GIL
        with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
            new_ids = ds.add_samples(samples(pool), expand_schema=False, validate=False, progress=False)
    bar.close()

    summary.near_duplicate_images = _group(ds, old, set(changed), new_ids, new_hashes, meta, cfg.near_duplicate_bits)
    if meta.get("curation") not in (None, cfg.to_dict()) and len(ds):
        summary.rebanded = recompute_bands(ds, cfg)  # new thresholds apply to every sample
    meta["curation"] = cfg.to_dict()
    if meta != ds.info.get("distillery") or ds.classes != {FIELD: classes}:
        ds.info = {**info, "distillery": meta}
        ds.classes = {FIELD: classes}
        ds.save()
    summary.views = save_views(ds, cfg)
    summary.seconds = time.perf_counter() - t0
    return summary


def _group(ds, old: dict, removed: set, new_ids: list, new_hashes: list, meta: dict, max_bits: int) -> int:
    """Update ``dup_group`` for the samples added (``new_ids``, ``new_hashes``: None where not
    hashed) and removed (``removed`` file paths) by a sync, from the state read before it
    (``old``: ``id``, ``filepath``, ``phash``, ``dup_group`` lists); writes only samples whose
    group changes. All images are regrouped when ``meta["duplicate_bits"]`` (the radius the
    groups were made with; None after an interrupted sync) is not ``max_bits``, which it then
    becomes. Returns the number of grouped images."""
    keep = [i for i, p in enumerate(old["filepath"]) if p not in removed]
    ids = [old["id"][i] for i in keep] + list(new_ids)
    hashes = [old["phash"][i] for i in keep] + list(new_hashes)
    groups = [old["dup_group"][i] for i in keep] + [None] * len(new_ids)
    if meta.get("duplicate_bits") != max_bits:  # groups made with another radius (or never): all anew
        dirty = range(len(ids))
    else:
        lost = {g for i, g in enumerate(old["dup_group"]) if g is not None and old["filepath"][i] in removed}
        dirty = [i for i, g in enumerate(groups) if i >= len(keep) or g in lost]
    meta["duplicate_bits"] = max_bits
    change = update_duplicate_groups(hashes, groups, dirty, max_bits)
    if change:
        ds.set_values("dup_group", {ids[i]: g for i, g in change.items()}, key_field="id")
    for i, g in change.items():
        groups[i] = g
    return sum(g is not None for g in groups)
