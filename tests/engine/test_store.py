from __future__ import annotations

import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from distillery.engine.names import check_name
from distillery.engine.record import LabelRecord, RecordError
from distillery.engine.store import LabelSet, LabelStore, StoreError, fingerprint
from tests.engine.conftest import writer_held_by_another_process


def rec(path, image_id, n=2, C=3, h=20, w=30):
    m = np.zeros((h, w, n), np.uint8, order="F")
    m[2:8, 3:9] = 1
    rles = mask_utils.encode(np.asfortranarray(m))
    return LabelRecord(
        image_id=image_id, path=path, width=w, height=h, num_classes=C,
        boxes=np.tile([3, 2, 9, 8], (n, 1)), scores=np.full((n, C), 0.25), masks=[dict(r) for r in rles],
        mask_score=np.full(n, 0.9),
    )


def test_record_validation_and_row_round_trip():
    r = rec("a.jpg", "x")
    back = LabelRecord.from_row(r.to_row(), 3)
    for f in ("boxes", "scores", "box_score", "mask_score", "iscrowd"):
        np.testing.assert_array_equal(getattr(back, f), getattr(r, f))
    assert [m["counts"] for m in back.masks] == [m["counts"] for m in r.masks]
    assert r.box_score.tolist() == [0.25, 0.25]  # max over scores by default
    with pytest.raises(RecordError, match=r"expected shape \(2, 3\)"):
        LabelRecord("x", "a.jpg", 30, 20, 3, boxes=np.zeros((2, 4)), scores=np.zeros((2, 4)), masks=[])
    with pytest.raises(RecordError, match="clipped"):
        LabelRecord("x", "a.jpg", 30, 20, 1, boxes=[[0, 0, 31, 5]], masks=r.masks[:1])
    with pytest.raises(RecordError, match="mask size"):
        LabelRecord("x", "a.jpg", 31, 20, 1, boxes=[[0, 0, 3, 5]], masks=r.masks[:1])
    with pytest.raises(RecordError, match=r"\[0, 1\]"):
        LabelRecord("x", "a.jpg", 30, 20, 1, boxes=[[0, 0, 3, 5]], scores=[[1.5]], masks=r.masks[:1])
    empty = LabelRecord("x", "a.jpg", 30, 20, 5)
    assert empty.boxes.shape == (0, 4) and empty.scores.shape == (0, 5)
    assert LabelRecord.from_row(empty.to_row(), 5).num_instances == 0


def test_store_writes_atomic_shards_dedups_and_resumes(tmp_path):
    store = LabelStore(tmp_path / "s")
    spec = {"ontology": {"classes": ["a", "b", "c"], "prompts": [["a", "a"], ["b", "b"], ["c", "c"]]}}
    ls = store.create(spec)
    assert ls.id == fingerprint(spec) and store.create(spec).id == ls.id
    assert store.create({**spec, "thresholds": {"box_floor": 0.1}}).id != ls.id
    with ls.writer(shard_size=2) as w:
        w.add(rec("a.jpg", "1").to_row())
        w.add(rec("b.jpg", "2").to_row())
        dup = w.add(rec("copy-of-a.jpg", "1").to_row())
        assert dup["error"] == "duplicate: same bytes as a.jpg"
        assert len(ls.shards()) == 1  # the third row waits in the buffer
        with pytest.raises(StoreError, match="another job"):
            ls.writer(2)
    assert len(ls.shards()) == 2 and not list(ls.shard_dir.glob(".tmp-*"))
    c = ls.counts()
    assert (c.images, c.labeled, c.instances, dict(c.errors)) == (3, 2, 4, {"duplicate": 1})
    with ls.writer(shard_size=2) as w:
        assert w.done_paths == {"a.jpg", "b.jpg", "copy-of-a.jpg"}
        assert w.add(rec("again.jpg", "2").to_row())["error"].startswith("duplicate")
    recs = {r.path: r for r in ls.iter_records()}
    np.testing.assert_array_equal(recs["a.jpg"].boxes, rec("a.jpg", "1").boxes)


def test_open_and_errors(tmp_path):
    store = LabelStore(tmp_path)
    with pytest.raises(StoreError, match="no label sets"):
        store.open()
    a = store.create({"ontology": {"classes": ["a"], "prompts": [["a", "a"]]}})
    b = store.create({"ontology": {"classes": ["b"], "prompts": [["b", "b"]]}})
    with pytest.raises(StoreError, match="choose one with --labelset"):
        store.open()
    assert store.open(b.id[:8]).id == b.id and store.open(a.id).id == a.id
    with pytest.raises(StoreError, match="not found"):
        store.open("ls-nope")



def test_retryable_errors_are_retried_and_superseded(tmp_path):
    ls = LabelStore(tmp_path).create({"ontology": {"classes": ["a", "b", "c"], "prompts": []}})
    with ls.writer(shard_size=1) as w:
        w.add(LabelRecord.failed("x.jpg", "missing: file not found", 3).to_row())
        w.add(LabelRecord.failed("y.jpg", "duplicate: same bytes as z.jpg", 3, "1").to_row())
    with ls.writer(shard_size=1) as w:
        assert w.done_paths == {"y.jpg"}  # the missing file is tried again, the duplicate is final
        w.add(rec("x.jpg", "9").to_row())
    assert len(ls.shards()) == 3
    recs = list(ls.iter_records())
    assert sorted(r.path for r in recs) == ["x.jpg", "y.jpg"]
    assert next(r for r in recs if r.path == "x.jpg").num_instances == 2
    c = ls.counts()
    assert (c.images, c.labeled, dict(c.errors)) == (2, 1, {"duplicate": 1})
    assert c.error_records == [("y.jpg", "duplicate: same bytes as z.jpg")]


def _spec(cls, kind="teacher"):
    return {"kind": kind, "ontology": {"classes": [cls], "prompts": [[cls, cls]]}}


def test_labelset_names_resolve_by_name_id_prefix_and_list_candidates(tmp_path):
    store = LabelStore(tmp_path)
    gt = store.create(_spec("a", "import"), name="coco128-gt")
    assert gt.id == fingerprint(_spec("a", "import"))  # the name is not part of the id
    assert LabelStore(tmp_path).open().name == "coco128-gt"  # stored on disk; the only set is the default
    with gt.writer(shard_size=1) as w:
        w.add(rec("a.jpg", "1", C=1).to_row())
    pseudo = store.create(_spec("b"))
    assert pseudo.name is None
    assert store.open("coco128-gt").id == gt.id and store.open(pseudo.id).id == pseudo.id
    common = len(os.path.commonprefix([gt.id, pseudo.id]))
    assert store.open(pseudo.id[:common + 1]).id == pseudo.id
    listed = [f"coco128-gt ({gt.id}, import, 1 image)", f"{pseudo.id} (teacher, 0 images, unnamed)"]
    with pytest.raises(StoreError, match=r"choose one with --labelset NAME\|ID") as e:
        store.open()
    assert all(d in str(e.value) for d in listed)
    with pytest.raises(StoreError, match="is ambiguous") as e:
        store.open("ls-")
    assert all(d in str(e.value) for d in listed)
    with pytest.raises(StoreError, match="'coco128' not found") as e:
        store.open("coco128")  # names match whole, never by prefix
    assert all(d in str(e.value) for d in listed)


def test_labelset_name_rules_on_create_rerun_and_rename(tmp_path):
    store = LabelStore(tmp_path)
    a = store.create(_spec("a"), name="run1")
    assert store.create(_spec("a"), name="run1").id == a.id  # same command again: resume
    assert store.create(_spec("a")).name == "run1"  # no --name on a rerun keeps the name
    with pytest.raises(StoreError, match="already named 'run1', not 'run2'.*labels rename"):
        store.create(_spec("a"), name="run2")
    assert store.open(a.id).name == "run1"
    with pytest.raises(StoreError, match=f"'run1' is already used by {a.id}.*label set {fingerprint(_spec('b'))}"):
        store.create(_spec("b"), name="run1")
    assert not (store.labelsets_dir / fingerprint(_spec("b"))).exists()  # refused before anything is written
    b = store.create(_spec("b"))
    assert store.create(_spec("b"), name="run2").id == b.id and store.open("run2").id == b.id  # unnamed: takes it
    with pytest.raises(StoreError, match=f"'run2' is already used by {b.id}"):
        store.rename("run1", "run2")
    assert store.rename("run1", "gt").id == a.id and store.open("gt").id == a.id
    with pytest.raises(StoreError, match="'run1' not found"):
        store.open("run1")
    for bad in ["", "l", "ls", "ls-", "ls-3f0a", "-x", "a b", "a/b", "x" * 65, "coco128é"]:
        with pytest.raises(ValueError, match="name"):
            store.create(_spec("c"), name=bad)
    assert not (store.labelsets_dir / fingerprint(_spec("c"))).exists()
    for good in ["ls-gt", "2024", "a.b_c-1", "x" * 64]:
        assert check_name(good, "ls-") == good


def test_a_shard_is_also_written_by_time_while_the_caller_waits(tmp_path):
    """flush_seconds: the timer writes the buffered rows as a shard with no further add()."""
    ls = LabelStore(tmp_path).create(_spec("a"))
    with ls.writer(shard_size=100, flush_seconds=0.2) as w:
        w.add(rec("a.jpg", "1", C=1).to_row())
        w.add(rec("b.jpg", "2", C=1).to_row())
        assert ls.shards() == []  # neither size nor time reached yet
        deadline = time.monotonic() + 10
        while not ls.shards() and time.monotonic() < deadline:
            time.sleep(0.05)
        (shard,) = ls.shards()
        assert pq.read_table(shard).column("path").to_pylist() == ["a.jpg", "b.jpg"]
        assert LabelSet(ls.root).shard_rows == {shard.name: 2}  # recorded in the manifest on disk
        w.add(rec("c.jpg", "3", C=1).to_row())
    assert [pq.read_metadata(p).num_rows for p in ls.shards()] == [2, 1]  # the rest on close
    with pytest.raises(ValueError, match="flush_seconds must be > 0"):
        ls.writer(flush_seconds=0)


def test_duplicates_are_found_on_disk_through_a_12_byte_per_image_index(tmp_path, monkeypatch):
    """The writer holds no image_id -> path dict: it finds the first path in the shard its
    ContentIndex names; collisions of the 64-bit key are told apart there."""
    import distillery.engine.content_index as ci

    ls = LabelStore(tmp_path).create(_spec("a"))
    with ls.writer(shard_size=2) as w:
        for k in range(5):
            w.add(rec(f"img{k}.jpg", f"id{k}", C=1).to_row())
    monkeypatch.setattr(ci, "content_key", lambda image_id: len(image_id))  # every id collides with every other
    with ls.writer(shard_size=2) as w:
        assert len(w._index) == 5 and w._index.shards_of("id3") == [0, 1, 2]
        assert w.add(rec("copy3.jpg", "id3", C=1).to_row())["error"] == "duplicate: same bytes as img3.jpg"
        assert w.add(rec("new.jpg", "id9", C=1).to_row())["error"] is None  # collides, but is new
        assert w.add(rec("copy9.jpg", "id9", C=1).to_row())["error"] == "duplicate: same bytes as new.jpg"
    assert ls.counts().labeled == 6 and dict(ls.counts().errors) == {"duplicate": 2}


def test_content_index_memory_per_image_against_a_dict():
    """Measured with tracemalloc over 100k sha256 ids: the index keeps 12.05 bytes per image;
    the image_id -> path dict it replaces kept 117 (paths and table, not counting the id
    strings themselves, 113 bytes each, which the dict also kept alive)."""
    import hashlib
    import tracemalloc

    from distillery.engine.content_index import ContentIndex

    n = 100_000
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = ContentIndex()
    for s in range(0, n, 256):
        index.add(ids[s:s + 256], s // 256)
    index_bytes = tracemalloc.get_traced_memory()[0] - base
    paths = {i: f"/data/pool/images/{k:08d}.jpg" for k, i in enumerate(ids)}
    dict_bytes = tracemalloc.get_traced_memory()[0] - base - index_bytes
    tracemalloc.stop()
    assert index.nbytes == 12 * n
    assert index_bytes / n < 16, index_bytes / n  # the arrays plus a merge buffer of <= max(4096, n/32) keys
    assert dict_bytes / n > 100, dict_bytes / n  # (the path strings alone: ~75 bytes each)
    assert index.shards_of(ids[300]) == [1] and index.shards_of("not-there") == []
    del paths


def test_lock_names_the_holder_pid_and_dies_with_it(tmp_path):
    """A second writer is refused in one line naming the holder's pid; a holder killed with
    SIGKILL leaves the lock file behind, but not the lock."""
    ls = LabelStore(tmp_path).create(_spec("a"))
    with writer_held_by_another_process(tmp_path) as holder:
        with pytest.raises(StoreError) as e:
            ls.writer()
        assert str(e.value) == (f"label set {ls.id} is being written by another job (pid {holder.pid}, lock "
                                f"{ls.root / '.lock'}); wait for it to finish or stop it, then rerun")
    with ls.writer() as w:  # the kernel released the flock of the killed holder
        w.add(rec("a.jpg", "1", C=1).to_row())
    assert (ls.root / ".lock").read_text().strip() == str(os.getpid())
    assert ls.counts().labeled == 1


def test_a_full_disk_met_by_the_flush_timer_stops_the_writer_with_one_clear_error(tmp_path, monkeypatch):
    """ENOSPC in the timer thread reaches the caller at its next add(); nothing partial is left
    and the writer writes no more (close() does not retry), so a rerun starts from the shards."""
    import errno

    ls = LabelStore(tmp_path / "store").create(_spec("a"))

    def full(table, where, **kw):
        open(where, "wb").write(b"PAR1")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    w = ls.writer(shard_size=100, flush_seconds=0.1)
    w.add(rec("a.jpg", "1", C=1).to_row())
    deadline = time.monotonic() + 10
    while w._timer_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(StoreError) as e:
        w.add(rec("b.jpg", "2", C=1).to_row())
    assert str(e.value) == (f"store {tmp_path / 'store'}: cannot write a shard of label set {ls.id}: no space left on "
                            "device (ENOSPC); free space on that disk (or give --store a folder on another disk), "
                            "then rerun the same command to resume (this run stored 0 images)")
    w.close()
    assert os.listdir(ls.shard_dir) == []
    with ls.writer() as again:  # the lock was released
        assert again.done_paths == set()
