from __future__ import annotations

import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from distillery.engine.names import check_name
from distillery.engine.record import LabelRecord, RecordError
from distillery.engine.store import LabelStore, StoreError, fingerprint


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
