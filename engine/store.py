"""The label store: a directory of label sets, each keyed by a fingerprint of what produced it.

Layout::

    STORE/labelsets/<labelset_id>/manifest.json      # schema version, ontology, teachers, shards: {file: rows}
    STORE/labelsets/<labelset_id>/shards/*.parquet   # rows of engine.record.ROW_SCHEMA
    STORE/labelsets/<labelset_id>/.lock              # held (flock) by the one job writing; holds its pid
    STORE/labelsets/<labelset_id>/curation/v0001.parquet  # curation decisions, version 1, ...

Shards are written whole under a temporary name (``.tmp-*``), fsynced, then renamed
(``os.replace`` is atomic on POSIX), so a crash -- ``kill -9`` or a full disk included --
loses at most the shard in flight and never leaves a partial one visible
(:mod:`distillery.engine.writer`). Shard names start with a nanosecond timestamp, so name
order is write order; the manifest's ``shards`` map records each shard's row count once it
is in place (``distillery labels verify`` checks both agree). Every input path ends as one
live row; a rerun skips the paths already stored, so it resumes where it stopped, and tries
again the paths whose row is a retryable error
(:data:`distillery.engine.images.RETRYABLE_ERRORS`: the file may have been fixed). The new
row supersedes the old one: readers see the last row of each path.
Label sets are never overwritten: a different ontology, teacher or setting has a
different id.

A label set may carry a name (``coco128-gt``; rules in :mod:`distillery.engine.names`),
stored as ``name`` in its manifest: metadata, not part of the id. Within a store a name
belongs to one label set. :meth:`LabelStore.open` takes a name, an id or a unique id
prefix; with none, the store's only label set.

Curation decisions are a separate, versioned layer beside the shards (never an edit of
teacher output): each commit writes a whole new ``curation/vNNNN.parquet`` of
:data:`CURATION_SCHEMA`, keyed by ``image_id`` and ``instance_id``
(:attr:`distillery.engine.record.LabelRecord.instance_ids`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections import Counter
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from distillery.engine.images import error_kind
from distillery.engine.names import check_name, holder, matches
from distillery.engine.record import ROW_SCHEMA, SCHEMA_VERSION, LabelRecord


#: One row per decision. ``instance_id`` null: the decision is about the whole image.
#: ``decision``: ``accept`` | ``reject`` | ``ignore`` (an uncertain region the student neither
#: learns nor is punished for) | null (only a class correction). ``label``: corrected class
#: name, null when unchanged. ``source``: ``manual`` (set by a person) or ``rules``.
CURATION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("instance_id", pa.string(), nullable=True),
        pa.field("decision", pa.string(), nullable=True),
        pa.field("label", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
    ]
)
DECISIONS = ("accept", "reject", "ignore")


class StoreError(RuntimeError):
    """The store or a label set is missing, ambiguous, locked or inconsistent."""


#: Every label set id starts with this (:func:`fingerprint`); names may not read as ids.
ID_PREFIX = "ls-"


def fingerprint(spec: dict) -> str:
    """Label set id: ``ls-`` + first 16 hex of sha256 over the canonical JSON of ``spec``
    (sorted keys, no whitespace), i.e. over everything that changes the labels."""
    blob = json.dumps({"schema_version": SCHEMA_VERSION, **spec}, sort_keys=True, separators=(",", ":"))
    return ID_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its folder, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_or_refuse(path: Path, what: str):
    """An open file holding an exclusive, non-blocking ``flock`` on ``path``, with this
    process's pid written in it; close the file to release the lock (the kernel also releases
    it when the process dies, ``kill -9`` included, so a lock file left behind never blocks).

    Raises:
        StoreError: another process holds it; the message names ``what`` and the holder's pid.
            Also when ``path`` is a folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        f = open(path, "a+")  # not "w": that would erase the holder's pid before we know we lost
    except IsADirectoryError as e:
        raise StoreError(f"{path} is a folder, but it is {what}'s lock file: move the folder away, then "
                         "rerun") from e
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise StoreError(f"{what} is being written by another job (pid {pid}, lock {path}); wait for it to finish "
                         f"or stop it, then rerun") from e
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("distillery")
    except Exception:  # noqa: BLE001 - running from a source tree without install
        return "unknown"


@dataclass
class LabelSetCounts:
    images: int = 0
    labeled: int = 0
    instances: int = 0
    errors: Counter = field(default_factory=Counter)
    #: ``(path, reason)`` of every live error record
    error_records: list = field(default_factory=list)


def manifest_shape_problem(manifest: dict) -> str | None:
    """What is wrong with the types of a label-set manifest's ``ontology`` and ``shards``
    (None: nothing): ``ontology`` must be an object whose ``classes`` is a list of strings;
    ``shards``, when present and not null, an object mapping shard file names to row counts
    (integers >= 0). Values within those types (empty or repeated classes, counts that
    disagree with the files) are :mod:`distillery.engine.verify`'s to report."""
    onto = manifest.get("ontology")
    if not isinstance(onto, dict) or not isinstance(onto.get("classes"), list) \
            or not all(isinstance(c, str) for c in onto["classes"]):
        return f"'ontology' must be an object with a 'classes' list of class names, got {onto!r:.80}"
    shards = manifest.get("shards")
    if shards is not None and not (isinstance(shards, dict) and all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in shards.items())):
        return f"'shards' must map shard file names to row counts (integers >= 0), got {shards!r:.80}"
    return None


class LabelSet:
    """One label set directory. Obtain it from :class:`LabelStore`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        path = self.root / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise StoreError(f"{self.root}: no manifest.json; not a label set") from e
        except OSError as e:  # a folder named manifest.json, no read permission...
            raise StoreError(f"{path} cannot be read ({e.strerror}); restore the file from a backup, or move the "
                             f"folder {self.root} out of the store to use its other label sets") from e
        except (UnicodeDecodeError, ValueError) as e:
            raise StoreError(f"{path} is damaged ({e}); restore it from a backup, or move the folder "
                             f"{self.root} out of the store to use its other label sets") from e
        if not isinstance(self.manifest, dict) or "labelset_id" not in self.manifest:
            raise StoreError(f"{path} is not a label-set manifest (a JSON object with labelset_id, classes, ...); "
                             f"restore it from a backup, or move {self.root} out of the store")
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.root}: schema version {self.manifest.get('schema_version')} != {SCHEMA_VERSION} of this "
                "distillery; relabel or use the matching distillery version"
            )
        problem = manifest_shape_problem(self.manifest)
        if problem:
            raise StoreError(f"{path} is damaged: {problem}; restore it from a backup, or move {self.root} out of "
                             "the store")

    @property
    def id(self) -> str:
        return self.manifest["labelset_id"]

    @property
    def name(self) -> str | None:
        """The label set's name (None: unnamed)."""
        return self.manifest.get("name")

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["ontology"]["classes"])

    def describe(self) -> str:
        """``NAME (ID, KIND, N images)``, or ``ID (KIND, N images, unnamed)``: one entry of the
        lists in :class:`StoreError` messages (reads the ``path`` column of every shard)."""
        n = self.read_columns(["path"]).num_rows
        what = f"{self.manifest.get('kind') or 'unknown kind'}, {n} image{'' if n == 1 else 's'}"
        return f"{self.name} ({self.id}, {what})" if self.name else f"{self.id} ({what}, unnamed)"

    def update_manifest(self, change) -> None:
        """Apply ``change(manifest: dict)`` to the manifest on disk and write it back whole
        (temporary file, then rename), under a lock, so that a rename and a writer recording a
        shard never lose each other's update. ``self.manifest`` becomes the new manifest.

        Raises:
            OSError: the manifest cannot be written (e.g. ``ENOSPC``); the old one stays.
        """
        with _flock(self.root / ".manifest.lock"):
            path = self.root / "manifest.json"
            manifest = json.loads(path.read_text(encoding="utf-8"))
            change(manifest)
            tmp = self.root / ".manifest.json.tmp"
            try:
                tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            self.manifest = manifest

    @property
    def shard_rows(self) -> dict[str, int] | None:
        """Row count of each shard file as the manifest records it (None: a label set written
        before the manifest recorded shards; its next writer records them)."""
        rows = self.manifest.get("shards")
        return None if rows is None else dict(rows)

    def lock_for_writing(self):
        """The label set's writer lock (:func:`lock_or_refuse`): one job writes at a time."""
        return lock_or_refuse(self.root / ".lock", f"label set {self.id}")

    def shards(self) -> list[Path]:
        """Shard files in write order. Temporary files (``.tmp-*``, a shard in flight or left by
        a crash) are not shards: ``Path.glob("*")`` matches dot-files, so they are filtered."""
        if not self.shard_dir.is_dir():
            return []
        return sorted(p for p in self.shard_dir.glob("*.parquet") if not p.name.startswith("."))

    def _live(self) -> list[tuple[Path, list[int] | None]]:
        """Per shard, the indices of its live rows (None: all): a row is superseded by a later
        row of the same path (a retried error)."""
        shards = self.shards()
        last: dict[str, tuple[int, int]] = {}
        sizes = []
        for si, p in enumerate(shards):
            paths = pq.read_table(p, columns=["path"]).column(0).to_pylist()
            sizes.append(len(paths))
            for ri, path in enumerate(paths):
                last[path] = (si, ri)
        keep: list[list[int]] = [[] for _ in shards]
        for si, ri in last.values():
            keep[si].append(ri)
        return [(p, None if len(k) == n else sorted(k)) for p, k, n in zip(shards, keep, sizes)]

    def _read(self, path: Path, rows: list[int] | None, columns: list[str] | None = None) -> pa.Table:
        t = pq.read_table(path, columns=columns)
        return t if rows is None else t.take(pa.array(rows, type=pa.int64()))

    def read_columns(self, columns: list[str], provenance: bool = False) -> pa.Table:
        """The named columns of every live row, concatenated (empty table if none).

        With ``provenance``, two more columns name where each row lives: ``shard`` (file
        name) and ``row`` (index in it); a row that changes (a retried error) moves."""
        tables = []
        for p, rows in self._live():
            t = self._read(p, rows, columns)
            if provenance:
                idx = rows if rows is not None else list(range(t.num_rows))
                t = t.append_column("shard", pa.array([p.name] * t.num_rows, pa.string()))
                t = t.append_column("row", pa.array(idx, pa.int64()))
            tables.append(t)
        if not tables:
            fields = [ROW_SCHEMA.field(c) for c in columns]
            if provenance:
                fields += [pa.field("shard", pa.string()), pa.field("row", pa.int64())]
            return pa.Table.from_pylist([], schema=pa.schema(fields))
        return pa.concat_tables(tables)

    def records_at(self, shard: str, rows: list[int]) -> list[LabelRecord]:
        """The records at ``rows`` of shard file ``shard`` (names from ``read_columns(provenance=True)``)."""
        C = len(self.classes)
        t = self._read(self.shard_dir / shard, list(rows))
        return [LabelRecord.from_row(r, C) for r in t.to_pylist()]

    # -- curation layer -------------------------------------------------------------------

    @property
    def curation_dir(self) -> Path:
        return self.root / "curation"

    def curation_versions(self) -> list[int]:
        """Committed curation versions, oldest first (empty: never curated)."""
        if not self.curation_dir.is_dir():
            return []
        import re

        names = (re.fullmatch(r"v(\d+)\.parquet", p.name) for p in self.curation_dir.iterdir())
        return sorted(int(m.group(1)) for m in names if m)

    def curation_lock(self):
        """Context manager: an exclusive lock (flock) on this label set's curation layer, so
        that read-compare-write sequences (``curate commit``) do not interleave."""
        return _flock(self.curation_dir / ".lock")

    def curation(self, version: int | None = None) -> tuple[pa.Table, dict]:
        """Decisions of one curation version (default: the latest) as a table of
        :data:`CURATION_SCHEMA`, and its metadata (version, created, dataset, counts).
        No version yet: an empty table and ``{"version": 0}``.

        Raises:
            StoreError: ``version`` does not exist.
        """
        versions = self.curation_versions()
        if version is None:
            if not versions:
                return CURATION_SCHEMA.empty_table(), {"version": 0}
            version = versions[-1]
        if version not in versions:
            raise StoreError(f"label set {self.id} has no curation version {version} (has: {versions or 'none'})")
        path = self.curation_dir / f"v{version:04d}.parquet"
        try:
            t = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise StoreError(f"{path}: unreadable curation version ({e}); restore it from a backup, or remove it to "
                             "fall back to the previous version") from e
        meta = json.loads((t.schema.metadata or {}).get(b"distillery", b"{}"))
        return t.replace_schema_metadata(None), meta

    def commit_curation(self, decisions: pa.Table, meta: dict | None = None) -> int:
        """Write ``decisions`` (:data:`CURATION_SCHEMA`) as the next curation version and return
        its number. The file appears whole (temporary name, then an exclusive hard link), so
        two concurrent commits never share a number.

        Raises:
            StoreError: a column, decision value or key is invalid, or a key repeats.
        """
        try:
            decisions = decisions.select(CURATION_SCHEMA.names).cast(CURATION_SCHEMA)
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise StoreError(f"curation decisions do not match the curation schema: {e}") from e
        bad = set(decisions.column("decision").drop_null().to_pylist()) - set(DECISIONS)
        if bad:
            raise StoreError(f"unknown curation decision(s) {sorted(bad)}; use one of {DECISIONS}")
        keys = list(zip(decisions.column("image_id").to_pylist(), decisions.column("instance_id").to_pylist()))
        if len(set(keys)) != len(keys):
            dup = next(k for k, n in Counter(keys).items() if n > 1)
            raise StoreError(f"curation decisions repeat the key image_id={dup[0]}, instance_id={dup[1]}")
        self.curation_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.curation_dir / f".tmp-{uuid.uuid4().hex}.parquet"
        while True:
            version = (self.curation_versions() or [0])[-1] + 1
            info = {
                "version": version,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "decisions": dict(Counter(decisions.column("decision").to_pylist())),
                **(meta or {}),
            }
            info["decisions"] = {str(k): v for k, v in info["decisions"].items()}
            table = decisions.replace_schema_metadata({"distillery": json.dumps(info)})
            pq.write_table(table, tmp)
            try:
                os.link(tmp, self.curation_dir / f"v{version:04d}.parquet")
                return version
            except FileExistsError:
                continue  # another commit took this number
            finally:
                tmp.unlink(missing_ok=True)

    def iter_records(self) -> Iterator[LabelRecord]:
        """Every live record, shard by shard (memory: one shard at a time)."""
        C = len(self.classes)
        for p, rows in self._live():
            for row in self._read(p, rows).to_pylist():
                yield LabelRecord.from_row(row, C)

    def counts(self) -> LabelSetCounts:
        """Images, labeled images, instances, errors by kind and error records, in one read."""
        t = self.read_columns(["path", "error", "box_score"])
        c = LabelSetCounts(images=t.num_rows)
        for path, err, scores in zip(*(t.column(k).to_pylist() for k in ("path", "error", "box_score"))):
            if err is None:
                c.labeled += 1
                c.instances += len(scores)
            else:
                c.errors[error_kind(err)] += 1
                c.error_records.append((path, err))
        return c

    def writer(self, shard_size: int = 256, flush_seconds: float | None = 60.0, track_paths: bool = True):
        """Exclusive writer (:class:`distillery.engine.writer.LabelSetWriter`): a second
        concurrent job on this label set raises :class:`StoreError` naming the holder's pid."""
        from distillery.engine.writer import LabelSetWriter

        return LabelSetWriter(self, shard_size, flush_seconds=flush_seconds, track_paths=track_paths)


class LabelStore:
    """A directory of label sets.

    Args:
        root: the store directory (created on first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    @property
    def labelsets_dir(self) -> Path:
        return self.root / "labelsets"

    def labelsets(self) -> list[LabelSet]:
        """All label sets, oldest first."""
        if not self.labelsets_dir.is_dir():
            return []
        sets = [LabelSet(d) for d in self.labelsets_dir.iterdir() if (d / "manifest.json").is_file()]
        return sorted(sets, key=lambda s: (s.manifest.get("created", ""), s.id))

    def _naming_lock(self):
        """Context manager: an exclusive lock on the store's names (check free, then take)."""
        return _flock(self.labelsets_dir / ".names.lock")

    def _check_free(self, name: str, labelset_id: str) -> None:
        other = holder(self.labelsets(), name, lambda s: s.name)
        if other is not None and other.id != labelset_id:
            raise StoreError(
                f"label set name {name!r} is already used by {other.id} in {self.root}; label set {labelset_id} "
                f"cannot take it: choose another name, or first rename {other.id} (distillery labels rename)"
            )

    def create(self, spec: dict, extra: dict | None = None, name: str | None = None) -> LabelSet:
        """The label set for ``spec`` (ontology, teachers, preprocessing, thresholds...), created
        if new; reopened (to resume) if its fingerprint already exists. ``extra`` is recorded
        in a new manifest but does not change the id; nor does ``name``.

        Names on a rerun: the same name, or none, resumes (the name stays); a name given to an
        existing unnamed label set is taken; a *different* name for an existing named label
        set is refused (scripts may use the old one): rename it with :meth:`rename`.

        Raises:
            ValueError: ``name`` breaks the rules of :func:`distillery.engine.names.check_name`,
                or ``spec`` has no valid ``ontology`` (:func:`manifest_shape_problem`).
            StoreError: ``name`` belongs to another label set of this store (both ids named),
                or this label set already has another name.
        """
        if name is not None:
            check_name(name, ID_PREFIX)
        problem = manifest_shape_problem(spec)
        if problem:
            raise ValueError(f"label-set spec: {problem}")
        ls_id = fingerprint(spec)
        root = self.labelsets_dir / ls_id
        with self._naming_lock():
            if name is not None:
                self._check_free(name, ls_id)
            if (root / "manifest.json").is_file():
                ls = LabelSet(root)
                if name is not None and ls.name is None:
                    ls.update_manifest(lambda m: m.update(name=name))
                elif name is not None and ls.name != name:
                    raise StoreError(
                        f"label set {ls_id} (same inputs, teachers and settings) is already named {ls.name!r}, not "
                        f"{name!r}; rerun with --name {ls.name} (or without --name) to resume, or rename it: "
                        f"distillery labels rename --store {self.root} {ls.name} {name}"
                    )
                return ls
            root.mkdir(parents=True, exist_ok=True)
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "labelset_id": ls_id,
                # microseconds: label sets are listed oldest first, and two made in one second must not tie
                "created": datetime.now().astimezone().isoformat(timespec="microseconds"),
                "distillery_version": _package_version(),
                **spec,
                **(extra or {}),
                **({"name": name} if name is not None else {}),
            }
            tmp = root / ".manifest.json.tmp"
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(tmp, root / "manifest.json")
            return LabelSet(root)

    def rename(self, name_or_id: str, new_name: str) -> LabelSet:
        """Give the label set ``name_or_id`` (see :meth:`open`) the name ``new_name``; its id and
        labels do not change. Commands that named it by its old name must use the new one.

        Raises:
            ValueError: ``new_name`` breaks the naming rules.
            StoreError: no such label set, or ``new_name`` belongs to another one.
        """
        check_name(new_name, ID_PREFIX)
        with self._naming_lock():
            ls = self.open(name_or_id)
            self._check_free(new_name, ls.id)
            ls.update_manifest(lambda m: m.update(name=new_name))
            return ls

    def open(self, name_or_id: str | None = None) -> LabelSet:
        """A label set by name, by id, or by a unique id prefix; the only one when ``None``.

        This is the one place where ``--labelset`` values are resolved (every command).

        Raises:
            StoreError: no store or no label sets; several and none named (the message lists
                them with names, kinds and image counts); no match, or an ambiguous one
                (the candidates, with names and ids).
        """
        sets = self.labelsets()
        if not sets:
            raise StoreError(f"store {self.root} has no label sets; run `distillery label` or `labels import` first")
        if name_or_id is None:
            if len(sets) > 1:
                listing = "; ".join(s.describe() for s in sets)
                raise StoreError(f"store {self.root} has {len(sets)} label sets, choose one with --labelset NAME|ID: "
                                 f"{listing}")
            return sets[0]
        match = matches(name_or_id, sets, lambda s: s.id, lambda s: s.name)
        if len(match) == 1:
            return match[0]
        if match:
            listing = "; ".join(s.describe() for s in match)
            raise StoreError(f"label set {name_or_id!r} is ambiguous in {self.root}, it matches {len(match)}: "
                             f"{listing}; give a name or a longer id prefix")
        listing = "; ".join(s.describe() for s in sets)
        raise StoreError(f"label set {name_or_id!r} not found in {self.root} (by name, id or id prefix); it has: "
                         f"{listing}")
