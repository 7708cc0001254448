"""``distillery labels verify``: check a label store end to end, and remove orphaned temp files.

For each label set (all, or the one named), under its writer lock (a label set that a job is
writing is reported, not read half-written):

- the manifest: readable, its ``labelset_id`` is its folder's name, classes are unique
  strings, its name follows the naming rules and is unique in the store;
- every shard: a readable Parquet file (``PAR1`` magic bytes at both ends) whose schema is
  :data:`ROW_SCHEMA`, with the row count the manifest's ``shards`` map records; a shard on
  disk that the map lacks, or one the map lists that is gone;
- no image labelled twice: a labelled row of a path that another shard labels too (a copied
  shard), or two labelled rows with the same image id (same bytes) under different paths;
- every row: a valid :class:`LabelRecord` (shapes, boxes inside the frame, scores in
  [0, 1], mask sizes = the image's ``[height, width]``), and every mask a decodable COCO RLE
  (:func:`rle_problem`);
- every curation version: readable, schema :data:`CURATION_SCHEMA`, known decisions,
  unique keys, image ids that exist in the label set;
- orphaned temporary files (``shards/.tmp-*``, ``curation/.tmp-*``, ``.manifest.json.tmp``),
  left by a write that was interrupted. ``repair=True`` removes them and nothing else (a
  folder of such a name is reported, never removed).

Each problem is one line: ``PATH: what is wrong; what to do``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distillery.engine.names import check_name
from distillery.engine.record import ROW_SCHEMA, LabelRecord, RecordError
from distillery.engine.store import CURATION_SCHEMA, DECISIONS, ID_PREFIX, LabelSet, LabelStore, StoreError, _flock


@dataclass
class VerifyReport:
    """What :func:`verify_store` found: ``problems`` (one line each), ``removed`` (orphans
    deleted by ``repair``), and counts of what was checked."""

    problems: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: what could not be checked, without being a problem (e.g. row counts of a label set
    #: written before the manifest recorded them)
    notes: list[str] = field(default_factory=list)
    labelsets: int = 0
    shards: int = 0
    rows: int = 0
    masks: int = 0
    curation_versions: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def rle_counts(counts: bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string, as int64 (not yet checked for sign or sum).

    pycocotools exposes no parser, and its ``decode`` of an RLE whose runs sum to less than
    ``height * width`` returns uninitialised memory for the rest, so the runs are read here.
    The format is ``rleFrString`` of the COCO API's ``maskApi.c``: each number is 5-bit groups,
    least significant first, in characters ``'0' + group`` with bit 0x20 meaning "more
    follows" and bit 0x10 of the last group the sign; numbers after the second are deltas
    against the number two places back.

    Raises:
        ValueError: a character outside ``'0'..'o'``, a number cut off, or longer than 7 groups.
    """
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        raise ValueError("characters outside '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("the last number is cut off")
    ends = np.flatnonzero(~more)
    starts = np.r_[0, ends[:-1] + 1]
    width = ends - starts + 1
    if width.max() > 7:
        raise ValueError("a number longer than 7 groups (runs are 32-bit)")
    k = np.arange(c.size) - np.repeat(starts, width)
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    x = np.where((c[ends] & 0x10) != 0, x - (np.int64(1) << (5 * width)), x)  # sign extension
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    return runs


def rle_problem(rle: dict, height: int, width: int) -> str | None:
    """Why ``rle`` is not a decodable COCO RLE of a ``height`` x ``width`` mask, or None.

    Checks ``size == [height, width]``, that the runs (:func:`rle_counts`) are non-negative
    and sum to ``height * width``, and that pycocotools decodes it to a 0/1 mask whose area
    equals the sum of the foreground (odd) runs.
    """
    from pycocotools import mask as mask_utils

    if list(rle.get("size", [])) != [height, width]:
        return f"mask size {rle.get('size')} != the image's [height, width] [{height}, {width}]"
    counts = rle.get("counts")
    if isinstance(counts, str):
        counts = counts.encode("ascii", "replace")
    if not isinstance(counts, bytes):
        return f"mask counts is {type(counts).__name__}, not a compressed RLE string"
    try:
        runs = rle_counts(counts)
    except ValueError as e:
        return f"mask counts do not parse: {e}"
    if (runs < 0).any():
        return "mask has a negative run length"
    if int(runs.sum()) != height * width:
        return f"mask runs cover {int(runs.sum())} pixels, not height*width = {height * width}"
    try:
        m = mask_utils.decode({"size": [height, width], "counts": counts})
    except ValueError as e:
        return f"pycocotools cannot decode the mask: {e}"
    if m.max(initial=0) > 1 or int(m.sum()) != int(runs[1::2].sum()):
        return "pycocotools decodes the mask to another area than its runs"
    return None


#: First (and last) 4 bytes of every Parquet file (Apache Parquet format specification, "File
#: Format").
PARQUET_MAGIC = b"PAR1"


def _orphans(ls: LabelSet) -> list[Path]:
    found = sorted(ls.shard_dir.glob(".tmp-*")) if ls.shard_dir.is_dir() else []
    found += sorted(ls.curation_dir.glob(".tmp-*")) if ls.curation_dir.is_dir() else []
    tmp = ls.root / ".manifest.json.tmp"
    return found + ([tmp] if tmp.exists() else [])


def _check_shards(ls: LabelSet, rep: VerifyReport) -> set[str] | None:
    """Shards, rows and masks of one label set; returns the image ids of its rows (None: a
    shard was unreadable, so the ids are incomplete)."""
    recorded = ls.shard_rows
    C = len(ls.classes)
    ids: set[str] = set()
    labelled: dict[str, tuple[str, str]] = {}  # image_id -> (path, shard) of its labelled row
    repeats: Counter = Counter()  # (shard, earlier shard) -> labelled rows of one repeated in the other
    same_bytes: list[tuple[str, str, str]] = []
    complete = True
    on_disk = ls.shards()
    if recorded is None and on_disk:
        rep.notes.append(f"{ls.root / 'manifest.json'}: no shard row counts recorded (a label set written before "
                         "the manifest recorded them): row counts not checked; the next `distillery label` run on "
                         "this label set records them")
    for p in on_disk:
        rep.shards += 1
        try:
            with open(p, "rb") as f:
                head = f.read(4)
            if head != PARQUET_MAGIC:  # pyarrow reads the footer only, so a damaged header passes it
                rep.problems.append(f"{p}: does not start with Parquet's magic bytes {PARQUET_MAGIC!r} (got {head!r}): "
                                    "the file's header is damaged; restore the shard from a backup, or move it out "
                                    "of the store and rerun `distillery label` to relabel its images")
            t = pq.read_table(p)
        except (OSError, pa.ArrowInvalid) as e:
            rep.problems.append(f"{p}: unreadable Parquet ({e}); restore the shard from a backup, or move it out "
                                "of the store and rerun `distillery label` to relabel its images")
            complete = False
            continue
        if not t.schema.equals(ROW_SCHEMA, check_metadata=False):
            rep.problems.append(f"{p}: schema is not the label row schema (columns {t.schema.names}); it was not "
                                "written by this distillery: move it out of the store")
            complete = False
            continue
        if recorded is not None and p.name not in recorded:
            rep.problems.append(f"{p}: not in the manifest's shard list (a job stopped between writing and recording "
                                "it); the next `distillery label` run on this label set records it")
        elif recorded is not None and recorded[p.name] != t.num_rows:
            rep.problems.append(f"{p}: {t.num_rows} rows, the manifest records {recorded[p.name]}; the shard or "
                                "manifest.json was altered: restore them from a backup")
        for i, row in enumerate(t.to_pylist()):
            rep.rows += 1
            ids.add(row["image_id"])
            if row["error"] is None:
                seen = labelled.setdefault(row["image_id"], (row["path"], p.name))
                if seen != (row["path"], p.name):
                    if seen[0] == row["path"]:
                        repeats[(p.name, seen[1])] += 1
                    else:
                        same_bytes.append((p.name, row["path"], seen[0]))
            try:
                rec = LabelRecord.from_row(row, C)
            except (RecordError, ValueError, TypeError) as e:
                rep.problems.append(f"{p}: row {i} ({row['path']}): invalid record: {e}")
                continue
            for j, m in enumerate(rec.masks):
                rep.masks += 1
                why = rle_problem(m, rec.height, rec.width)
                if why:
                    rep.problems.append(f"{p}: row {i} ({rec.path}) instance {j}: {why}; relabel the image (move the "
                                        "shard out of the store and rerun `distillery label`)")
    for (name, earlier), n in sorted(repeats.items()):
        rep.problems.append(f"{ls.shard_dir / name}: {n} labelled row(s) repeat those of {earlier} (a copied shard?); "
                            "move the copy out of the store (`distillery label` never labels an image twice)")
    for name, path, first in same_bytes[:10]:
        rep.problems.append(f"{ls.shard_dir / name}: {path} is labelled but has the same bytes as {first}, labelled "
                            "too (the writer stores such a file as a duplicate error); restore the shard from a backup")
    if len(same_bytes) > 10:
        rep.problems.append(f"{ls.shard_dir}: ... {len(same_bytes) - 10} more images labelled twice under other paths")
    for name in sorted(set(recorded or {}) - {p.name for p in on_disk}):
        rep.problems.append(f"{ls.shard_dir / name}: listed in the manifest ({recorded[name]} rows) but missing; "
                            "restore it from a backup, or rerun `distillery label` to relabel its images")
    return ids if complete else None


def _check_curation(ls: LabelSet, ids: set[str] | None, rep: VerifyReport) -> None:
    for v in ls.curation_versions():
        rep.curation_versions += 1
        path = ls.curation_dir / f"v{v:04d}.parquet"
        try:
            t, _ = ls.curation(v)
        except StoreError as e:
            rep.problems.append(str(e))
            continue
        if not t.schema.equals(CURATION_SCHEMA, check_metadata=False):
            rep.problems.append(f"{path}: schema is not the curation schema (columns {t.schema.names}); restore it "
                                "from a backup or remove it to fall back to the previous version")
            continue
        bad = set(t.column("decision").drop_null().to_pylist()) - set(DECISIONS)
        if bad:
            rep.problems.append(f"{path}: unknown decision(s) {sorted(bad)} (allowed: {', '.join(DECISIONS)})")
        keys = Counter(zip(t.column("image_id").to_pylist(), t.column("instance_id").to_pylist()))
        dup = [k for k, n in keys.items() if n > 1]
        if dup:
            rep.problems.append(f"{path}: {len(dup)} repeated decision key(s), e.g. image_id={dup[0][0]} "
                                f"instance_id={dup[0][1]}")
        unknown = set() if ids is None else {i for i, _ in keys} - ids  # None: shards unreadable, reported
        if unknown:
            rep.problems.append(f"{path}: decisions about {len(unknown)} image id(s) the label set does not hold, "
                                f"e.g. {sorted(unknown)[0]}")


def _check_manifest(ls: LabelSet, names: Counter, rep: VerifyReport) -> None:
    path = ls.root / "manifest.json"
    if ls.id != ls.root.name:
        rep.problems.append(f"{path}: labelset_id {ls.id} != its folder name {ls.root.name}; the folder was renamed "
                            "or the manifest copied: restore the folder name")
    classes = ls.classes  # a list of strings: LabelSet refuses other shapes (store.manifest_shape_problem)
    if not classes or len(set(classes)) != len(classes):
        rep.problems.append(f"{path}: ontology.classes must be a non-empty list of unique names, got {classes!r}")
    if ls.name is not None:
        try:
            check_name(ls.name, ID_PREFIX)
        except ValueError as e:
            rep.problems.append(f"{path}: {e}; rename it with `distillery labels rename`")
        if names[ls.name] > 1:
            rep.problems.append(f"{path}: name {ls.name!r} is used by {names[ls.name]} label sets of this store; "
                                "rename all but one with `distillery labels rename`")


def verify_store(store: str | Path, labelset: str | None = None, repair: bool = False) -> VerifyReport:
    """Check the label sets of ``store`` (or only ``labelset``: a name, id or id prefix).

    Args:
        repair: remove orphaned temporary files (they are then listed in ``removed``, not in
            ``problems``). Nothing else is ever changed.

    Raises:
        StoreError: the store has no label sets, or ``labelset`` does not resolve.
    """
    st = LabelStore(store)
    rep = VerifyReport()
    if not st.labelsets_dir.is_dir():
        raise StoreError(f"store {st.root} has no label sets; run `distillery label` or `labels import` first")
    readable, broken = [], []
    for root in sorted(d for d in st.labelsets_dir.iterdir() if d.is_dir()):
        try:
            readable.append(LabelSet(root))
        except StoreError as e:  # a damaged or missing manifest: one line, and the other sets are still checked
            broken.append(str(e))
    names = Counter(s.name for s in readable if s.name is not None)
    if labelset is None:
        sets = readable
        rep.problems += broken
    else:
        sets = [st.open(labelset)]
    for ls in sets:
        rep.labelsets += 1
        try:
            lock = ls.lock_for_writing()
        except StoreError as e:
            rep.problems.append(f"{e} (verify reads a label set only when no job writes it)")
            continue
        try:
            _check_manifest(ls, names, rep)
            ids = _check_shards(ls, rep)
            _check_curation(ls, ids, rep)
            for p in _orphans(ls):
                if p.is_dir() and not p.is_symlink():  # no write makes one: not removed, whatever its name
                    rep.problems.append(f"{p}: a folder with a temporary file's name (no distillery write makes one); "
                                        "look inside, then move or delete it by hand")
                    continue
                if not repair:
                    rep.problems.append(f"{p}: orphaned temporary file ({p.stat().st_size} bytes) left by an "
                                        "interrupted write; `distillery labels verify --repair` removes it")
                    continue
                # the writer lock is held; the curation and manifest locks cover their own writes
                guard = ls.curation_dir / ".lock" if p.parent == ls.curation_dir else ls.root / ".manifest.lock"
                with _flock(guard):
                    p.unlink(missing_ok=True)
                rep.removed.append(str(p))
        finally:
            lock.close()
    return rep
