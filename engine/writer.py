"""The one writer of a label set: rows in, atomic Parquet shards out, by size or by time.

A shard is written under a temporary name (``shards/.tmp-<name>``), fsynced, then renamed
into place (``os.replace``, atomic on POSIX), and only then recorded with its row count in
the manifest's ``shards`` map. So a crash (``kill -9``, power loss) or a full disk leaves
either a whole shard or none; a temporary file left by a crash is invisible to readers
(:meth:`distillery.engine.store.LabelSet.shards`) and removed by the next writer, or by
``distillery labels verify --repair``.

Buffered rows are written as a shard when ``shard_size`` rows wait **or** when the oldest
has waited ``flush_seconds`` (a background timer; default 60 s), so a ``kill -9`` loses at
most about ``flush_seconds`` of the rows that reached the writer (plus, in a labeling job,
the images still inside the pipeline: at most a block per stage).

Memory per image in the driver: duplicates are found through
:class:`distillery.engine.content_index.ContentIndex` (12 bytes per labeled image, the
first path read back from its shard), not a dict of paths. ``done_paths`` (the paths
already final when the writer opened, and, with ``track_paths``, those added since) is a
set of path strings: the labeling job reads it once, then frees it.

Rows whose error may pass on a retry (:data:`~distillery.engine.images.RETRYABLE_ERRORS`:
missing, unreadable, ...) are not final: a rerun tries those images again. A retry that
fails with the same error appends nothing, so reruns over a broken file do not grow the store.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from distillery.engine.content_index import ContentIndex
from distillery.engine.images import RETRYABLE_ERRORS, error_kind
from distillery.engine.record import LabelRecord, rows_to_table
from distillery.engine.store import LabelSet, StoreError


class LabelSetWriter:
    """Buffers rows and writes them as atomic Parquet shards; the label set's only writer.

    Duplicates are resolved here: an image whose bytes (``image_id``) are already labeled
    under another path gets an error row ``duplicate: same bytes as <path>``, so every input
    path is accounted for and each image is labeled once. Use as a context manager;
    leaving it flushes the last, partial shard (unless a shard write failed).

    Args:
        labelset: the label set to append to.
        shard_size: rows per shard at most (>= 1).
        flush_seconds: write the buffer as a shard once its oldest row has waited this long
            (seconds, > 0); None: by size only.
        track_paths: keep :attr:`done_paths` up to date as rows are added (callers that
            consult it while adding); False leaves it as it was at open.

    Raises:
        ValueError: ``shard_size`` < 1 or ``flush_seconds`` <= 0.
        StoreError: another process writes this label set (the message names its pid), or a
            shard is unreadable.
    """

    def __init__(self, labelset: LabelSet, shard_size: int = 256, flush_seconds: float | None = 60.0,
                 track_paths: bool = True) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if flush_seconds is not None and not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0 seconds (or None), got {flush_seconds}")
        self.ls = labelset
        self.shard_size = int(shard_size)
        self.flush_seconds = flush_seconds
        self.track_paths = track_paths
        self.written = 0
        self._rows: list[dict] = []
        self._oldest: float | None = None  # monotonic time the oldest buffered row arrived
        self._buffered_first: dict[str, str] = {}  # image_id -> path, labeled rows in the buffer
        self._failed = False
        self._failure = ""
        self._timer_error: BaseException | None = None
        self._mutex = threading.RLock()
        self._lock = labelset.lock_for_writing()
        try:
            self.ls.shard_dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.ls.shard_dir.glob(".tmp-*"):
                tmp.unlink()  # a shard in flight when a previous job died
            self._open_shards()
        except BaseException:
            self._lock.close()
            raise
        self._stop = threading.Event()
        self._timer = None
        if flush_seconds is not None:
            self._timer = threading.Thread(target=self._flush_when_due, name="label-set-flush", daemon=True)
            self._timer.start()

    def _open_shards(self) -> None:
        """Read ``path``, ``image_id``, ``error`` of every shard, one shard at a time: the final
        paths, the content index, and manifest entries for shards a crash left unrecorded."""
        self._shard_names: list[str] = []
        self._index = ContentIndex()
        recorded = self.ls.shard_rows or {}
        unrecorded: dict[str, int] = {}
        done: set[str] = set()
        retry: dict[str, str] = {}
        for ordinal, p in enumerate(self.ls.shards()):
            try:
                t = pq.read_table(p, columns=["path", "image_id", "error"])
            except (OSError, pa.ArrowInvalid) as e:
                raise StoreError(f"{p}: unreadable shard ({e}); run `distillery labels verify --store "
                                 f"{self.ls.root.parent.parent}` and restore or remove it") from e
            self._shard_names.append(p.name)
            if p.name not in recorded:
                unrecorded[p.name] = t.num_rows  # renamed into place, then the job died before recording it
            paths, ids, errors = (t.column(c).to_pylist() for c in ("path", "image_id", "error"))
            for path, err in zip(paths, errors):
                if err is None or error_kind(err) not in RETRYABLE_ERRORS:
                    done.add(path)
                    retry.pop(path, None)
                else:
                    done.discard(path)  # the last row of a path decides
                    retry[path] = err
            self._index.add((i for i, e in zip(ids, errors) if e is None), ordinal)
        #: paths whose live row is final (labels, a duplicate); retryable errors are not
        self.done_paths: set[str] = done
        #: path -> error text of live retryable error rows: a retry that fails the same way
        #: appends nothing (the live row already says so). Memory: one entry per failed image.
        self._retry_errors: dict[str, str] = retry
        if unrecorded or self.ls.shard_rows is None:
            try:
                self.ls.update_manifest(lambda m: m.setdefault("shards", {}).update(unrecorded))
            except OSError as e:
                self._fail(e, "the manifest")
                raise StoreError(self._failure) from e
        self._lookup_cache: tuple[int, dict[str, str]] | None = None

    def _first_path(self, image_id: str) -> str | None:
        """The path of ``image_id``'s first labeled row, in the buffer or on disk (None: none)."""
        if image_id in self._buffered_first:
            return self._buffered_first[image_id]
        for ordinal in self._index.shards_of(image_id):
            if self._lookup_cache is None or self._lookup_cache[0] != ordinal:
                t = pq.read_table(self.ls.shard_dir / self._shard_names[ordinal], columns=["path", "image_id", "error"])
                firsts: dict[str, str] = {}
                for path, i, e in zip(*(t.column(c).to_pylist() for c in ("path", "image_id", "error"))):
                    if e is None:
                        firsts.setdefault(i, path)
                self._lookup_cache = (ordinal, firsts)
            if image_id in self._lookup_cache[1]:
                return self._lookup_cache[1][image_id]
        return None

    def add(self, row: dict) -> dict:
        """Queue one row of :data:`ROW_SCHEMA`; returns the row as stored (maybe a duplicate error).

        Raises:
            StoreError: a shard could not be written (e.g. the disk is full); see :meth:`flush`.
        """
        with self._mutex:
            self._raise_timer_error()
            if row["error"] is not None and self._retry_errors.get(row["path"]) == row["error"]:
                return row  # the same failure as the live row: nothing new to store
            if row["error"] is None:
                first = self._first_path(row["image_id"])
                if first is None:
                    self._buffered_first[row["image_id"]] = row["path"]
                elif first != row["path"]:
                    row = LabelRecord.failed(
                        row["path"], f"duplicate: same bytes as {first}", len(self.ls.classes), row["image_id"]
                    ).to_row()
            if self.track_paths:
                self.done_paths.add(row["path"])
            self._rows.append(row)
            if self._oldest is None:
                self._oldest = time.monotonic()
            if len(self._rows) >= self.shard_size or self._due():
                self.flush()
            return row

    def _due(self) -> bool:
        return (self.flush_seconds is not None and self._oldest is not None
                and time.monotonic() - self._oldest >= self.flush_seconds)

    def _flush_when_due(self) -> None:
        """Timer thread: flush once the oldest buffered row has waited ``flush_seconds``, even
        while the caller is blocked waiting for the next batch. Wakes at most once a second."""
        step = min(1.0, self.flush_seconds / 4)
        while not self._stop.wait(step):
            with self._mutex:
                if self._failed or self._timer_error is not None or not self._due():
                    continue
                try:
                    self.flush()
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by add()/close()
                    self._timer_error = e

    def _raise_timer_error(self) -> None:
        if self._timer_error is not None:
            e, self._timer_error = self._timer_error, None
            raise e

    def flush(self) -> None:
        """Write the buffered rows as one shard (temporary file, fsync, rename), then record it
        in the manifest.

        Raises:
            StoreError: the shard or the manifest could not be written (``ENOSPC``, ``EDQUOT``,
                ``EIO``, ...). The message names the store, the label set and the fix; no
                partial shard is left visible, and the rows of earlier shards stay, so rerunning
                the same command resumes. After a failed shard write the writer writes no more.
        """
        with self._mutex:
            if self._failed:
                raise StoreError(self._failure)
            if not self._rows:
                return
            table = rows_to_table(self._rows)
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
            tmp = self.ls.shard_dir / f".tmp-{name}"
            try:
                pq.write_table(table, tmp, compression="zstd")
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, self.ls.shard_dir / name)
            except OSError as e:
                self._fail(e, "a shard")
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass  # the next writer, or `labels verify --repair`, removes it; readers never see it
                raise StoreError(self._failure) from e
            n = len(self._rows)
            self._index.add(self._buffered_first, len(self._shard_names))
            self._shard_names.append(name)
            self.written += n
            self._rows, self._buffered_first, self._oldest = [], {}, None
            try:
                self.ls.update_manifest(lambda m: m.setdefault("shards", {}).__setitem__(name, n))
            except OSError as e:
                # the shard is in place and complete; the next writer records it in the manifest
                self._fail(e, "the manifest")
                raise StoreError(self._failure) from e

    def _fail(self, e: OSError, what: str) -> None:
        """Stop writing, and word the one-line error: the store, the label set, the cause, the fix."""
        self._failed = True
        store = self.ls.root.parent.parent
        code = errno.errorcode.get(e.errno, "?") if e.errno is not None else "?"
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "no space left on device" if full else (e.strerror or str(e))
        fix = "free space on that disk (or give --store a folder on another disk)" if full else \
            "fix the store's disk or permissions"
        self._failure = (f"store {store}: cannot write {what} of label set {self.ls.id}: {reason} ({code}); {fix}, "
                         f"then rerun the same command to resume (this run stored {self.written} "
                         f"image{'' if self.written == 1 else 's'})")

    def close(self) -> None:
        """Stop the timer, flush what is buffered (unless a write failed), release the lock."""
        try:
            if self._timer is not None:
                self._stop.set()
                self._timer.join()
            with self._mutex:
                self._raise_timer_error()
                if not self._failed:
                    self.flush()
        finally:
            self._lock.close()  # closing the file releases the flock

    def __enter__(self) -> "LabelSetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
