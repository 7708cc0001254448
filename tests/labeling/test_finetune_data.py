"""Which images and instances teach the teachers: exhaustive review, decisions, split, counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils

from distillery.engine.record import LabelRecord
from distillery.engine.split import is_val
from distillery.engine.store import CURATION_SCHEMA, LabelStore, StoreError
from distillery.labeling.finetune.data import select_training_data
from distillery.labeling.ontology import Ontology

CLASSES = ["cat", "dog", "red block"]
H, W = 40, 60


def record(name: str, boxes, classes, crowd=None) -> LabelRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.zeros((len(boxes), len(CLASSES)), np.float32)
    scores[np.arange(len(boxes)), classes] = 0.9
    masks = []
    for x1, y1, x2, y2 in boxes.astype(int):
        m = np.zeros((H, W), np.uint8, order="F")
        m[y1:y2, x1:x2] = 1
        masks.append(mask_utils.encode(m))
    return LabelRecord(image_id=f"id-{name}", path=f"/nowhere/{name}.jpg", width=W, height=H, num_classes=len(CLASSES),
                       boxes=boxes, scores=scores, masks=masks, iscrowd=crowd)


def make_set(tmp_path, records, kind="teacher"):
    spec = {"kind": kind, "ontology": Ontology.from_classes(CLASSES).to_dict(), "teachers": {"test": kind}}
    ls = LabelStore(tmp_path / "store").create(spec)
    with ls.writer() as w:
        for r in records:
            w.add(r.to_row())
    return ls


def decide(ls, rows):
    """rows: (image_id, instance_id or None, decision, label, source)."""
    keys = ["image_id", "instance_id", "decision", "label", "source"]
    return ls.commit_curation(pa.Table.from_pylist([dict(zip(keys, r)) for r in rows], schema=CURATION_SCHEMA))


TWO = [[1, 1, 10, 10], [20, 5, 40, 30]]
THREE = [[1, 1, 10, 10], [20, 5, 40, 30], [30, 20, 55, 38]]


@pytest.fixture
def curated(tmp_path):
    recs = {
        "accepted": record("accepted", THREE, [0, 0, 2]),     # image accept; undecided, rule reject, relabel
        "decided": record("decided", THREE, [0, 1, 2]),       # every instance decided by a person
        "partly": record("partly", TWO, [0, 1]),              # one decided, one not
        "unreviewed": record("unreviewed", TWO, [0, 1]),      # no decision
        "rules": record("rules", TWO, [0, 1]),                # decided by rules only
        "rejected": record("rejected", TWO, [0, 1]),          # image reject
        "ignored": record("ignored", TWO, [0, 1]),            # image ignore
        "empty": record("empty", [], []),                     # no instances, no decision
        "negative": record("negative", [], []),               # no instances, image accept
    }
    failed = LabelRecord.failed("/nowhere/broken.jpg", "unreadable: truncated", len(CLASSES), "id-broken")
    ls = make_set(tmp_path, [*recs.values(), failed])
    iid = {k: r.instance_ids for k, r in recs.items()}
    decide(ls, [
        ("id-accepted", None, "accept", None, "manual"),
        ("id-accepted", iid["accepted"][1], "reject", None, "rules"),
        ("id-accepted", iid["accepted"][2], None, "dog", "manual"),
        ("id-decided", iid["decided"][0], "accept", None, "manual"),
        ("id-decided", iid["decided"][1], "reject", None, "manual"),
        ("id-decided", iid["decided"][2], "ignore", None, "manual"),
        ("id-partly", iid["partly"][0], "accept", None, "manual"),
        ("id-rules", iid["rules"][0], "accept", None, "rules"),
        ("id-rules", iid["rules"][1], "reject", None, "rules"),
        ("id-rejected", None, "reject", None, "manual"),
        ("id-ignored", None, "ignore", None, "manual"),
        ("id-negative", None, "accept", None, "manual"),
    ])
    return ls, recs


def test_only_exhaustively_reviewed_images_train_the_detector(curated):
    ls, recs = curated
    data = select_training_data(ls, val_fraction=0.0)
    by_id = {im.image_id: im for im in data.images}
    assert sorted(by_id) == ["id-accepted", "id-decided", "id-negative"]
    c = data.counts
    assert {k: v for k, v in c.items() if k.startswith("skipped_")} == {
        "skipped_partly_reviewed": 1, "skipped_unreviewed": 3, "skipped_image_rejected": 1,
        "skipped_image_ignored": 1, "skipped_error": 1}  # unreviewed: no decision, rules only, empty
    assert (c["used_train"], c["used_val"], c["positives"], c["relabeled"], c["rejected"], c["ignored"]) == (
        3, 0, 3, 1, 2, 1)

    acc = by_id["id-accepted"]  # undecided -> positive of the teacher's class; rule reject -> background
    np.testing.assert_array_equal(acc.boxes, np.asarray([THREE[0], THREE[2]], np.float32))
    assert acc.classes.tolist() == [0, 1]  # the relabel to dog applied
    assert acc.instance_ids == (recs["accepted"].instance_ids[0], recs["accepted"].instance_ids[2])
    assert acc.ignore_boxes.shape == (0, 4)
    dec = by_id["id-decided"]  # accept -> positive, reject -> nothing, ignore -> ignore region
    np.testing.assert_array_equal(dec.boxes, [THREE[0]])
    np.testing.assert_array_equal(dec.ignore_boxes, [THREE[2]])
    assert mask_utils.area(list(dec.masks)).tolist() == [81]  # the positive's own mask (9 x 9)
    neg = by_id["id-negative"]
    assert neg.boxes.shape == (0, 4) and neg.classes.shape == (0,)
    assert "partly_reviewed 1" in data.summary() and "3 positives (1 relabeled)" in data.summary()


def test_split_by_image_id_and_the_training_data_hash(curated, tmp_path):
    ls, _ = curated
    data = select_training_data(ls, val_fraction=0.5)
    for im in data.images:
        assert im.val == is_val(im.image_id, 0.5)
    assert data.counts["used_val"] == sum(is_val(i, 0.5) for i in ("id-accepted", "id-decided", "id-negative"))
    # the hash covers the training instances and their classes: a new decision changes it
    h = select_training_data(ls, val_fraction=0.0).instance_ids_sha256()
    assert select_training_data(ls, val_fraction=0.0).instance_ids_sha256() == h
    table, _ = ls.curation()
    decide(ls, [*[tuple(r.values()) for r in table.to_pylist()], ("id-partly", None, "accept", None, "manual")])
    after = select_training_data(ls, val_fraction=0.0)
    assert after.curation_version == 2 and after.counts["used_train"] == 4
    assert after.instance_ids_sha256() != h
    # an older version can still be chosen, and one that does not exist is an error
    assert select_training_data(ls, curation=1, val_fraction=0.0).instance_ids_sha256() == h
    with pytest.raises(StoreError, match="no curation version 7"):
        select_training_data(ls, curation=7)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_training_data(ls, val_fraction=1.0)


def test_instance_level_selection_keeps_confirmed_instances_for_sam(curated):
    ls, recs = curated
    data = select_training_data(ls, val_fraction=0.0, exhaustive=False)
    by_id = {im.image_id: im for im in data.images}
    # partly reviewed images give their confirmed instances; rule-only and undecided ones are not targets
    assert sorted(by_id) == ["id-accepted", "id-decided", "id-partly"]
    assert by_id["id-partly"].instance_ids == (recs["partly"].instance_ids[0],)
    assert data.counts["skipped_no_confirmed_instances"] == 4  # unreviewed, rules, empty, negative
    for im in data.images:
        assert [m["size"] for m in im.masks] == [[H, W]] * len(im.boxes)


def test_ground_truth_sets_are_exhaustive_and_crowds_are_ignore_regions(tmp_path):
    gt = [record("a", TWO, [0, 2], crowd=[False, True]), record("b", THREE, [1, 1, 0])]
    ls = make_set(tmp_path, gt, kind="import")
    data = select_training_data(ls, val_fraction=0.0)
    a, b = data.images
    assert a.classes.tolist() == [0] and a.ignore_boxes.tolist() == [TWO[1]]
    assert b.classes.tolist() == [1, 1, 0]
    assert (data.counts["positives"], data.counts["crowd"], data.counts["used_train"]) == (4, 1, 2)
    # decisions still apply to ground truth
    decide(ls, [("id-b", gt[1].instance_ids[0], "reject", None, "manual"), ("id-a", None, "reject", None, "manual")])
    data = select_training_data(ls, val_fraction=0.0)
    assert [im.image_id for im in data.images] == ["id-b"] and data.images[0].classes.tolist() == [1, 0]
