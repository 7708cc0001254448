"""Incremental `curate sync`: the same dataset as a fresh sync of the union, near-duplicate
groups across old and new images, only new or changed samples and views written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from distillery.engine.images import content_id
from distillery.engine.record import LabelRecord
from distillery.engine.store import LabelStore
from distillery.labeling.curation.config import CurationConfig
from distillery.labeling.curation.database import FIELD, open_dataset
from distillery.labeling.curation.decisions import commit
from distillery.labeling.curation.samples import record_to_sample
from distillery.labeling.curation.signals import near_duplicate_groups, phash, update_duplicate_groups
from distillery.labeling.curation.sync import sync

CLASSES = ["cat", "dog"]


def photo_record(path, seed: int) -> LabelRecord:
    """Two instances on the photo at ``path`` (its EXIF-corrected size), boxes and scores from ``seed``."""
    from pycocotools import mask as mask_utils

    with Image.open(path) as im:
        w, h = ImageOps.exif_transpose(im).size
    rng = np.random.default_rng(seed)
    boxes, masks = [], []
    for _ in range(2):
        x0, y0 = rng.integers(0, [w // 2, h // 2])
        x1, y1 = x0 + rng.integers(8, w // 2), y0 + rng.integers(8, h // 2)
        m = np.zeros((h, w), np.uint8, order="F")
        m[y0:y1, x0:x1] = 1
        boxes.append([x0, y0, x1, y1])
        masks.append(mask_utils.encode(m))
    scores = rng.uniform(0, 1, (2, 2)).astype(np.float32)
    return LabelRecord(image_id=content_id(open(path, "rb").read()), path=str(path), width=w, height=h,
                       num_classes=2, boxes=np.array(boxes, np.float32), scores=scores, box_score=scores.max(1),
                       masks=masks, mask_score=np.full(2, 0.9, np.float32))


def near_copy(src, dst, scale: float, quality: int, crop: int = 0) -> None:
    """A near-duplicate of ``src``: cropped by ``crop`` px a side, resized by ``scale``, JPEG ``quality``."""
    with Image.open(src) as im:
        im = im.crop((crop, crop, im.width - crop, im.height - crop))
        im.resize((int(im.width * scale), int(im.height * scale))).save(dst, quality=quality)


@pytest.fixture
def union(coco128, tmp_path):
    """Paths of an old batch and a new batch of images. Old: photos p0..p3, a half-size copy
    of p0, and late.jpg (not there yet: a retryable error). New: a 3/4-size copy of p0 (joins
    p0's group), a cropped copy of p1 (makes a group with the old singleton p1), p4, and
    late.jpg, which now exists (its sample is replaced)."""
    photos = sorted((coco128 / "images").glob("*.jpg"))[:6]
    d = tmp_path / "img"
    d.mkdir()
    near_copy(photos[0], d / "p0-half.jpg", 0.5, 60)
    near_copy(photos[0], d / "p0-3q.jpg", 0.75, 80)
    near_copy(photos[1], d / "p1-crop.jpg", 1.0, 90, crop=2)
    old = [str(p) for p in photos[:4]] + [str(d / "p0-half.jpg")]
    new = [str(d / "p0-3q.jpg"), str(d / "p1-crop.jpg"), str(photos[4])]
    return old, new, photos[5], d / "late.jpg"


def fill(ls, paths, late=None, late_src=None):
    with ls.writer() as w:
        for p in paths:
            w.add(photo_record(p, seed=len(p)).to_row())
        if late is not None and late_src is None:
            w.add(LabelRecord.failed(str(late), "missing: file not found", 2).to_row())
        elif late is not None:
            late.write_bytes(late_src.read_bytes())
            w.add(photo_record(late, seed=7).to_row())


def state(ds) -> dict:
    """Everything a sync writes, per file path, without FiftyOne's ids and timestamps:
    sample fields, and every detection's fields (masks as bytes)."""
    out = {}
    for s in ds.iter_samples():
        dets = []
        for d in (s[FIELD].detections if s[FIELD] is not None else []):
            dets.append({k: (d[k].tobytes(), d[k].shape) if isinstance(d[k], np.ndarray) else d[k]
                         for k in d.field_names if k != "id"})
        out[s.filepath] = {"image_id": s["image_id"], "store_row": s["store_row"], "error": s["error"],
                           "tags": sorted(s.tags), "num_instances": s["num_instances"], "phash": s["phash"],
                           "size": None if s.metadata is None else (s.metadata.width, s.metadata.height),
                           "detections": dets}
    return out


def groups_of(ds) -> set:
    """Near-duplicate groups as a partition: a set of frozensets of file names."""
    by: dict = {}
    for p, g in zip(*ds.values(["filepath", "dup_group"])):
        if g is not None:
            by.setdefault(g, set()).add(p.rsplit("/", 1)[-1])
    return {frozenset(v) for v in by.values()}


def views_of(ds) -> dict:
    """Each saved view's file paths and instance ids (filtered views keep some instances only)."""
    out = {}
    for name in ds.list_saved_views():
        v = ds.load_saved_view(name)
        out[name] = (sorted(v.values("filepath")), sorted(v.values(f"{FIELD}.detections.instance_uid", unwind=True)))
    return out


def test_incremental_sync_equals_a_fresh_sync_of_the_union(fo, dataset_name, union, tmp_path, monkeypatch):
    old, new, late_src, late = union
    ls = LabelStore(tmp_path / "store").create({"ontology": {"classes": CLASSES}, "test": "incremental"})
    fill(ls, old, late)
    s = sync(ls, dataset_name, progress=False)
    assert (s.added, s.errors, s.near_duplicate_images) == (6, 1, 2)
    ds = open_dataset(dataset_name)
    names = {p: p.rsplit("/", 1)[-1] for p in old}
    p0, p1 = names[old[0]], names[old[1]]
    assert groups_of(ds) == {frozenset({p0, "p0-half.jpg"})}
    # a committed decision, so that both datasets restore it
    sample = ds.match(fo.ViewField("filepath") == old[2]).first()
    sample[FIELD].detections[0].tags = ["reject"]
    sample.save()
    assert commit(ds, ls)[1]
    before = dict(zip(*ds.values(["filepath", "last_modified_at"])))

    fill(ls, new, late, late_src)
    saves = []
    real_save_view = fo.Dataset.save_view
    monkeypatch.setattr(fo.Dataset, "save_view", lambda self, name, *a, **k: saves.append(name)
                        or real_save_view(self, name, *a, **k))
    s = sync(ls, dataset_name, progress=False)
    assert (s.added, s.updated, s.unchanged, s.errors) == (3, 1, 5, 0)
    assert s.near_duplicate_images == 5
    assert saves == []  # views are stages, not sample ids: adding samples leaves them as they are
    after = dict(zip(*ds.values(["filepath", "last_modified_at"])))
    touched = {names[p] for p in old if after[p] != before[p]}
    assert touched == {p1}  # the old singleton that a new near-duplicate joined; nothing else old
    assert groups_of(ds) == {frozenset({p0, "p0-half.jpg", "p0-3q.jpg"}), frozenset({p1, "p1-crop.jpg"})}

    union_ls = LabelStore(tmp_path / "union").create({"ontology": {"classes": CLASSES}, "test": "incremental"})
    fill(union_ls, old + new, late, late_src)
    union_ls.commit_curation(ls.curation()[0])
    fresh = f"{dataset_name}-fresh"
    try:
        u = sync(union_ls, fresh, progress=False)
        assert u.near_duplicate_images == s.near_duplicate_images
        fds = open_dataset(fresh)
        a, b = state(ds), state(fds)
        for p in a:  # store rows differ (other shards); the rest is equal
            a[p].pop("store_row"), b[p].pop("store_row")
        assert a == b and len(a) == 9
        assert groups_of(fds) == groups_of(ds)
        assert views_of(fds) == views_of(ds)
        grouped = {p0, "p0-half.jpg", "p0-3q.jpg", p1, "p1-crop.jpg"}
        assert views_of(ds)["near-duplicates"][0] == sorted(p for p in a if p.rsplit("/", 1)[-1] in grouped)
        assert sum(len(d["tags"]) for d in a[old[2]]["detections"]) == 1  # the committed reject, in both
    finally:
        fo.delete_dataset(fresh)


def test_other_thresholds_rewrite_only_the_views_they_define(fo, dataset_name, union, tmp_path, monkeypatch):
    old, *_ = union
    ls = LabelStore(tmp_path / "store").create({"ontology": {"classes": CLASSES}})
    fill(ls, old)
    saves = []
    real_save_view = fo.Dataset.save_view
    monkeypatch.setattr(fo.Dataset, "save_view", lambda self, name, *a, **k: saves.append(name)
                        or real_save_view(self, name, *a, **k))
    sync(ls, dataset_name, progress=False)
    assert len(saves) == 14
    saves.clear()
    sync(ls, dataset_name, CurationConfig.from_dict({"ambiguity_margin": 0.3}), progress=False)
    assert saves == ["ambiguous-class"]
    # a view changed in the App is put back
    ds = open_dataset(dataset_name)
    ds.save_view("tiny", ds.limit(1), overwrite=True)
    saves.clear()
    sync(ls, dataset_name, CurationConfig.from_dict({"ambiguity_margin": 0.3}), progress=False)
    assert saves == ["tiny"]
    tiny = ds.filter_labels(FIELD, fo.ViewField("area") < CurationConfig().min_area)
    assert ds.load_saved_view("tiny") == tiny


def test_a_new_radius_regroups_every_image(fo, dataset_name, union, tmp_path):
    old, new, *_ = union
    ls = LabelStore(tmp_path / "store").create({"ontology": {"classes": CLASSES}})
    fill(ls, old + new)
    hashes = {p: phash(p) for p in old + new}
    bits = lambda a, b: bin(int(hashes[a], 16) ^ int(hashes[b], 16)).count("1")  # noqa: E731
    assert bits(old[1], new[1]) == 2 and bits(old[0], old[4]) == bits(old[0], new[0]) == 0  # the photos' own
    assert sync(ls, dataset_name, progress=False).near_duplicate_images == 5
    s = sync(ls, dataset_name, CurationConfig.from_dict({"near_duplicate_bits": 1}), progress=False)
    assert s.near_duplicate_images == 3 and s.added == 0  # p1 and its crop are 2 bits apart
    ds = open_dataset(dataset_name)
    assert len(groups_of(ds)) == 1
    assert sync(ls, dataset_name, progress=False).near_duplicate_images == 5
    assert len(groups_of(ds)) == 2


def test_a_sync_stopped_before_grouping_leaves_the_next_one_to_regroup(fo, dataset_name, union, tmp_path,
                                                                        monkeypatch):
    import distillery.labeling.curation.sync as sync_module

    old, new, *_ = union
    ls = LabelStore(tmp_path / "store").create({"ontology": {"classes": CLASSES}})
    fill(ls, old)
    sync(ls, dataset_name, progress=False)
    fill(ls, new)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sync_module, "update_duplicate_groups", stop)
    with pytest.raises(KeyboardInterrupt):  # samples added, groups not yet updated
        sync(ls, dataset_name, progress=False)
    monkeypatch.undo()
    ds = open_dataset(dataset_name)
    p0, p1 = (p.rsplit("/", 1)[-1] for p in old[:2])
    assert len(ds) == 8 and groups_of(ds) == {frozenset({p0, "p0-half.jpg"})}
    s = sync(ls, dataset_name, progress=False)  # nothing new to add, yet the groups are completed
    assert (s.added, s.near_duplicate_images) == (0, 5)
    assert groups_of(ds) == {frozenset({p0, "p0-half.jpg", "p0-3q.jpg"}), frozenset({p1, "p1-crop.jpg"})}


def test_declared_schema_is_the_one_fiftyone_infers(fo, dataset_name, union, tmp_path):
    old, *_ = union
    ls = LabelStore(tmp_path / "store").create({"ontology": {"classes": CLASSES}})
    fill(ls, old)
    sync(ls, dataset_name, progress=False)
    declared = {k: str(v) for k, v in open_dataset(dataset_name).get_field_schema(flat=True).items()}
    plain = fo.Dataset()
    try:
        samples = [record_to_sample(r, CLASSES, CurationConfig(), "x:0") for r in ls.iter_records()]
        samples[0][FIELD].detections[0]["rule_decision"] = "accept"  # None everywhere would not be inferred
        samples[0]["error"] = "x"
        samples[0]["dup_group"] = 0
        plain.add_samples(samples, dynamic=True, progress=False)
        inferred = {k: str(v) for k, v in plain.get_field_schema(flat=True).items()}
    finally:
        plain.delete()
    assert declared == inferred
    assert declared[f"{FIELD}.detections.soft_scores"] == "fiftyone.core.fields.ListField(fiftyone.core.fields.FloatField)"


def partition(groups) -> list:
    by: dict = {}
    for i, g in enumerate(groups):
        if g is not None:
            by.setdefault(g, []).append(i)
    return sorted(by.values())


def test_update_duplicate_groups_merges_splits_and_numbers():
    a, a2, b, b2 = "0000000000000000", "0000000000000001", "000000000000000f", "000000000000001f"
    groups = near_duplicate_groups([a, a2, b, b2], max_bits=2)
    assert groups == [0, 0, 1, 1]  # a-b: 4 bits apart
    # a new hash 2 bits from a and from b bridges the groups: b's join a's number, nothing else changes
    assert update_duplicate_groups([a, a2, b, b2, "0000000000000003"], groups + [None], [4], 2) == {2: 0, 3: 0, 4: 0}
    # a new pair far from both: the next unused number
    far = "ffffffffffffff00"
    assert update_duplicate_groups([a, a2, b, b2, far, "ffffffffffffff01"], groups + [None, None], [4, 5], 2) \
        == {4: 2, 5: 2}
    # a new image near no one: unchanged, nothing written
    assert update_duplicate_groups([a, a2, b, b2, far], groups + [None], [4], 2) == {}
    # the middle of a chain goes: its two ends, dirty, are singletons again
    chain = [a, "0000000000000003", b]
    assert near_duplicate_groups(chain, 2) == [0, 0, 0]
    assert update_duplicate_groups([a, b], [0, 0], [0, 1], 2) == {0: None, 1: None}
    # an image with no hash never joins; a dirty one without a hash loses its group
    assert update_duplicate_groups([a, None], [None, 3], [1], 2) == {1: None}


def test_update_duplicate_groups_equals_regrouping_everything():
    """Random clusters of hashes; old groups from near_duplicate_groups; some old images go
    (their groups' survivors are dirty), new ones arrive: the partition after the update
    equals near_duplicate_groups of the result."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 50))
        centres = rng.integers(0, 2**63, int(rng.integers(1, 8)), dtype=np.int64)
        hashes = []
        for _ in range(n):
            c = int(centres[rng.integers(len(centres))])
            for f in rng.choice(64, int(rng.integers(0, 5)), replace=False):
                c ^= 1 << int(f)
            hashes.append(None if rng.random() < 0.1 else f"{c & (2**64 - 1):016x}")
        bits, k = int(rng.integers(0, 8)), int(rng.integers(0, n + 1))
        groups = near_duplicate_groups(hashes[:k], bits) + [None] * (n - k)
        gone = set(rng.choice(k, int(rng.integers(0, k // 3 + 1)), replace=False).tolist()) if k else set()
        lost = {groups[i] for i in gone} - {None}
        keep = [i for i in range(n) if i not in gone]
        h, g = [hashes[i] for i in keep], [groups[i] for i in keep]
        dirty = [j for j, i in enumerate(keep) if i >= k or g[j] in lost]
        for i, new in update_duplicate_groups(h, g, dirty, bits).items():
            assert g[i] != new, trial
            g[i] = new
        assert partition(g) == partition(near_duplicate_groups(h, bits)), trial
