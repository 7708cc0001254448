"""Curation: store -> FiftyOne -> store round trips, rules, decisions that survive re-syncs
and relabels, near duplicates, the report."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from distillery.engine.config import ConfigError
from distillery.engine.images import content_id
from distillery.engine.record import LabelRecord
from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco
from distillery.labeling.curation.config import DEFAULT_RULES, Band, CurationConfig
from distillery.labeling.curation.database import FIELD, CurationError, open_dataset
from distillery.labeling.curation.decisions import commit
from distillery.labeling.curation.rules import apply_rules
from distillery.labeling.curation.samples import mask_region, relative_box, sample_to_record
from distillery.labeling.curation.sync import sync
from distillery.labeling.curation.signals import near_duplicate_groups, phash

CLASSES = ["cat", "dog"]
W = H = 100


def rect_rle(x0, y0, x1, y1, h=H, w=W):
    m = np.zeros((h, w), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    return mask_utils.encode(m)


def write_image(path, seed):
    rng = np.random.default_rng(seed)
    # smooth random blobs, so perceptual hashes of different seeds differ a lot
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((W, H), Image.BILINEAR).save(path)
    return content_id(open(path, "rb").read())


def rec(path, image_id, insts):
    """insts: list of (box xyxy, scores, mask box or None (= the box))."""
    boxes = np.array([i[0] for i in insts], np.float32).reshape(-1, 4)
    scores = np.array([i[1] for i in insts], np.float32).reshape(-1, 2)
    masks = [rect_rle(*(i[2] or i[0])) for i in insts]
    return LabelRecord(image_id=image_id, path=str(path), width=W, height=H, num_classes=2, boxes=boxes,
                       scores=scores, box_score=scores.max(1) if len(insts) else [], masks=masks,
                       mask_score=np.full(len(insts), 0.9, np.float32))


#: (box, scores, mask box): the expected rule outcome for RULES below is in the comment
RULED = [
    ((10, 10, 30, 30), (0.9, 0.1), None),    # cat confident -> accept
    ((40, 10, 60, 30), (0.5, 0.1), None),    # cat uncertain -> ignore
    ((70, 10, 90, 30), (0.2, 0.0), None),    # cat below -> reject
    ((10, 40, 30, 60), (0.1, 0.7), None),    # dog: uncertain under dog's band (0.8) -> ignore
    ((40, 40, 60, 60), (0.0, 0.35), None),   # dog below dog's 0.4 -> reject
    ((95, 95, 100, 100), (0.9, 0.0), None),  # cat confident but tiny (25 px = 0.0025) -> reject
    ((0, 0, 95, 95), (0.9, 0.0), None),      # cat confident but image-filling (0.9025) -> ignore
    ((70, 40, 90, 60), (0.9, 0.8), None),    # ambiguous (margin 0.1 < 0.2) -> ignore
    ((50, 60, 90, 100), (0.9, 0.0), (50, 60, 70, 80)),  # mask bbox IoU 0.25 with box -> ignore
]
RULES = {
    "score_bands": {"default": {"confident": 0.6, "below": 0.3}, "dog": {"confident": 0.8, "below": 0.4}},
    "ambiguity_margin": 0.2,
    "mask_box_iou": 0.5,
    "min_area": 0.01,
    "max_area": 0.8,
}


@pytest.fixture
def store(tmp_path):
    """A label store with one label set: an image with RULED instances, an empty image, a
    missing file (retryable error) and a plain image with one instance."""
    st = LabelStore(tmp_path / "store")
    ls = st.create({"ontology": {"classes": CLASSES}, "test": "curation"})
    img = tmp_path / "images"
    img.mkdir()
    ids = [write_image(img / f"{i}.png", i) for i in range(3)]
    with ls.writer() as w:
        w.add(rec(img / "0.png", ids[0], RULED).to_row())
        w.add(rec(img / "1.png", ids[1], []).to_row())
        w.add(LabelRecord.failed(str(img / "late.png"), "missing: file not found", 2).to_row())
        w.add(rec(img / "2.png", ids[2], [((20, 20, 80, 80), (0.2, 0.95), None)]).to_row())
    return st, ls, img


def test_rules_give_expected_decisions_and_keep_manual(fo, dataset_name, store, tmp_path):
    _, ls, _ = store
    s = sync(ls, dataset_name, with_phash=False, progress=False)
    assert (s.added, s.errors, s.instances) == (4, 1, 10)
    ds = open_dataset(dataset_name)
    cfg = CurationConfig.from_dict(RULES)
    counts = apply_rules(ds, cfg)
    # RULED: accept 1, ignore 5, reject 3; image 2's dog 0.95 >= 0.8 -> accept
    assert {k: counts[k] for k in ("accept", "ignore", "reject")} == {"accept": 2, "ignore": 5, "reject": 3}
    by_box = {}
    for d in ds.match(fo.ViewField("filepath").ends_with("0.png")).first()[FIELD].detections:
        by_box[tuple(round(v * 100) for v in d.bounding_box[:2])] = d
    assert by_box[(10, 10)].tags == ["accept"] and by_box[(40, 40)].tags == ["reject"]
    assert by_box[(10, 40)].band == "uncertain"  # dog's own band, not the default one

    # a person overrides one rule decision in the App; rules applied again keep it
    sample = ds.match(fo.ViewField("filepath").ends_with("0.png")).first()
    sample[FIELD].detections[0].tags = ["reject"]
    sample.save()
    counts = apply_rules(ds, cfg)
    assert counts["manual_kept"] == 1 and counts["accept"] == 1
    version, written, table = commit(ds, ls)
    assert written and version == 1
    rows = {r["instance_id"]: r for r in table.to_pylist()}
    iid0 = sample[FIELD].detections[0]["instance_uid"]
    assert rows[iid0]["decision"] == "reject" and rows[iid0]["source"] == "manual"
    assert sum(r["source"] == "rules" for r in rows.values()) == 9
    stored, meta = ls.curation()
    assert stored.num_rows == 10 and meta["decisions"] == {"accept": 1, "ignore": 5, "reject": 4}

    # overwrite_manual replaces the person's decision again
    assert apply_rules(ds, cfg, overwrite_manual=True)["accept"] == 2


def decisions_of(sample):
    """instance id -> (sorted tags, effective class: the relabel: tag if any, else label)."""
    out = {}
    for d in sample[FIELD].detections:
        rel = [t[len("relabel:"):] for t in d.tags if t.startswith("relabel:")]
        out[d["instance_uid"]] = (sorted(d.tags), rel[0] if rel else d.label)
    return out


def test_decisions_survive_resync_relabel_and_dataset_loss(fo, dataset_name, store):
    st, ls, img = store
    sync(ls, dataset_name, with_phash=False, progress=False)
    ds = open_dataset(dataset_name)
    apply_rules(ds, CurationConfig.from_dict(RULES))
    s0 = ds.match(fo.ViewField("filepath").ends_with("0.png")).first()
    s0[FIELD].detections[1].tags = ["accept", "relabel:dog"]  # person corrects a class
    s0.tags = ["ignore"]  # and marks the whole image
    s0.save()
    v1, written, _ = commit(ds, ls)
    assert written and v1 == 1
    before = decisions_of(s0)

    # relabel adds images and retries the missing one, which now exists
    new_id = write_image(img / "3.png", 3)
    late_id = write_image(img / "late.png", 4)
    with ls.writer() as w:
        assert str(img / "late.png") not in w.done_paths  # retryable error
        w.add(rec(img / "3.png", new_id, [((5, 5, 50, 50), (0.7, 0.1), None)]).to_row())
        w.add(rec(img / "late.png", late_id, [((5, 5, 50, 50), (0.1, 0.7), None)]).to_row())
    s = sync(ls, dataset_name, with_phash=False, progress=False)
    assert (s.added, s.updated, s.unchanged) == (1, 1, 3)
    assert len(ds) == 5 and len(set(ds.values("filepath"))) == 5
    s0.reload()
    assert decisions_of(s0) == before
    assert s0.tags == ["ignore"]
    assert ds.match(fo.ViewField("error") != None).count() == 0  # noqa: E711
    assert commit(ds, ls)[1] is False  # nothing changed

    # the dataset is lost; a fresh sync restores every committed decision exactly
    fo.delete_dataset(dataset_name)
    s = sync(ls, dataset_name, with_phash=False, progress=False)
    assert s.added == 5 and s.restored_decisions == 11  # 10 instances + 1 image
    ds = open_dataset(dataset_name)
    s0 = ds.match(fo.ViewField("filepath").ends_with("0.png")).first()
    assert decisions_of(s0) == before
    version, written, table = commit(ds, ls)
    assert (version, written) == (1, False)
    fixed = [r for r in table.to_pylist() if r["label"]]
    assert len(fixed) == 1 and fixed[0]["label"] == "dog" and fixed[0]["decision"] == "accept"

    # a restored correction is undone by removing its tag, like one made in the App
    d = next(d for d in s0[FIELD].detections if any(t.startswith("relabel:") for t in d.tags))
    assert d.label == d["teacher_label"] == "cat"
    d.tags = [t for t in d.tags if not t.startswith("relabel:")]
    s0.save()
    version, written, table = commit(ds, ls)
    assert written and version == 2 and not any(r["label"] for r in table.to_pylist())


def test_error_images_decisions_concurrent_commits_and_stray_files(fo, dataset_name, store):
    import threading

    _, ls, img = store
    with ls.writer() as w:  # a second failed image
        w.add(LabelRecord.failed(str(img / "bad2.png"), "unreadable: permission denied", 2).to_row())
    sync(ls, dataset_name, with_phash=False, progress=False)
    ds = open_dataset(dataset_name)
    errs = ds.match(fo.ViewField("error") != None)  # noqa: E711
    assert len(errs) == 2
    errs.tag_samples("reject")  # the obvious thing to do in the errors view: no labels, nothing to commit
    apply_rules(ds, CurationConfig.from_dict(RULES))
    results = []
    threads = [threading.Thread(target=lambda: results.append(commit(ds, ls)[:2])) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == [(1, False), (1, False), (1, True)]  # one version, not three
    assert ls.curation_versions() == [1] and ls.curation()[0].num_rows == 10
    (ls.curation_dir / "v12a.parquet").write_bytes(b"stray")
    (ls.curation_dir / "notes.txt").write_text("x")
    assert ls.curation_versions() == [1]
    (ls.curation_dir / "v0002.parquet").write_bytes(b"")
    from distillery.engine.store import StoreError

    with pytest.raises(StoreError, match="v0002.parquet: unreadable curation version"):
        ls.curation()


def test_commit_refuses_conflicts_and_unknown_classes(fo, dataset_name, store):
    _, ls, _ = store
    sync(ls, dataset_name, with_phash=False, progress=False)
    ds = open_dataset(dataset_name)
    s0 = ds.match(fo.ViewField("filepath").ends_with("0.png")).first()
    s0[FIELD].detections[0].tags = ["accept", "reject"]
    s0.save()
    assert len(ds.load_saved_view("conflicting-decisions").values(f"{FIELD}.detections.id", unwind=True)) == 1
    with pytest.raises(CurationError, match="conflicting decision tags"):
        commit(ds, ls)
    s0[FIELD].detections[0].tags = ["relabel:unicorn"]
    s0.save()
    with pytest.raises(CurationError, match="'unicorn' is not in the ontology"):
        commit(ds, ls)
    assert ls.curation_versions() == []
    other = LabelStore(ls.root.parent.parent).create({"ontology": {"classes": ["x"]}})
    with pytest.raises(CurationError, match="holds label set"):
        sync(other, dataset_name, progress=False)


def test_roundtrip_coco128_gt(fo, dataset_name, coco128, tmp_path):
    """Store -> FiftyOne -> store on real photos with GT-derived labels: scores bit for bit,
    boxes to float rounding, masks bit for bit inside FiftyOne's paste region (pasted back
    with FiftyOne's own Detection.to_segmentation), and the share outside it recorded."""
    ls, _ = import_coco(LabelStore(tmp_path / "s"), str(coco128 / "annotations.json"), str(coco128 / "images"))
    s = sync(ls, dataset_name, with_phash=False, progress=False)
    assert (s.added, s.instances) == (128, 939)
    again = sync(ls, dataset_name, with_phash=False, progress=False)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 128)
    ds = open_dataset(dataset_name)
    assert len(ds) == 128 and ds.count(f"{FIELD}.detections") == 939
    recs = {os.path.abspath(r.path): r for r in ls.iter_records()}
    exact = full_iou_one = n = 0
    for sample in ds:
        r = recs[sample.filepath]
        back = sample_to_record(sample, ls.classes)
        assert back.image_id == r.image_id and (back.width, back.height) == (r.width, r.height)
        np.testing.assert_array_equal(back.scores, r.scores)
        np.testing.assert_array_equal(back.box_score, r.box_score)
        np.testing.assert_array_equal(back.mask_score, r.mask_score)
        np.testing.assert_array_equal(back.iscrowd, r.iscrowd)
        np.testing.assert_allclose(back.boxes, r.boxes, atol=1e-3)
        assert back.instance_ids == r.instance_ids
        assert [d["instance_uid"] for d in sample[FIELD].detections] == r.instance_ids
        if not r.num_instances:
            continue
        a, b = mask_utils.decode(r.masks), mask_utils.decode(back.masks)
        for k, d in enumerate(sample[FIELD].detections):
            x0, y0, x1, y1 = mask_region(relative_box(r.boxes[k], r.width, r.height), r.width, r.height)
            inside = np.zeros_like(a[:, :, k])
            inside[y0:y1, x0:x1] = a[y0:y1, x0:x1, k]
            exact += np.array_equal(inside, b[:, :, k])
            full = a[:, :, k].sum()
            assert d["mask_outside"] == pytest.approx(1 - inside.sum() / full if full else 0.0, abs=1e-9)
            full_iou_one += np.array_equal(a[:, :, k], b[:, :, k])
            n += 1
    assert exact == n == 939
    # COCO polygons rasterise up to a pixel past their float bbox; that sliver is what FiftyOne
    # cannot show (mask_outside), nothing else differs
    assert full_iou_one < n
    print(f"\nround trip: {exact}/{n} masks exact inside the box, {full_iou_one}/{n} exact over the full frame")


def test_near_duplicate_groups_on_real_photos(coco128, tmp_path):
    photos = sorted((coco128 / "images").glob("*.jpg"))[:6]
    im = Image.open(photos[0])
    im.resize((im.width // 2, im.height // 2)).save(tmp_path / "small.jpg", quality=60)
    shutil.copy(photos[1], tmp_path / "copy.jpg")
    paths = [str(p) for p in photos] + [str(tmp_path / "small.jpg"), str(tmp_path / "copy.jpg"), str(tmp_path / "nope.jpg")]
    hashes = [phash(p) for p in paths]
    assert hashes[-1] is None and all(len(h) == 16 for h in hashes[:-1])
    groups = near_duplicate_groups(hashes, max_bits=6)
    assert groups[0] == groups[6] is not None and groups[1] == groups[7] is not None and groups[0] != groups[1]
    assert groups[2:6] == [None] * 4 and groups[8] is None
    # the radius is inclusive, in bits; grouping is transitive
    chain = ["0" * 16, "000000000000003f", "0000000000000fff", "ffffffffffffffff"]  # 0, 6, 12, 64 bits
    assert near_duplicate_groups(chain, max_bits=6) == [0, 0, 0, None]
    assert near_duplicate_groups(chain, max_bits=5) == [None] * 4


def _db_path(fo) -> str:
    """The folder the test's private mongod keeps its files in, as the server reports it."""
    return fo.core.odm.database.get_db_client().admin.command("getCmdLineOpts")["parsed"]["storage"]["dbPath"]


def test_a_database_other_than_the_requested_one_is_refused(fo, monkeypatch, tmp_path):
    from distillery.labeling.curation.database import check_database, load_fiftyone

    uri = fo.config.database_uri
    with pytest.raises(CurationError, match="another FiftyOne process"):
        check_database(str(tmp_path / "elsewhere"), None)
    check_database(_db_path(fo), None)  # the one it is connected to: fine
    with pytest.raises(CurationError, match="not the requested --database-uri mongodb://127.0.0.1:1"):
        check_database(None, "mongodb://127.0.0.1:1")  # FiftyOne was configured with another URI
    check_database(str(tmp_path / "elsewhere"), uri)  # a URI decides; the folder is not checked
    # load_fiftyone checks each setting it meets, not only the first one
    monkeypatch.delenv("FIFTYONE_DATABASE_URI")
    monkeypatch.setenv("FIFTYONE_DATABASE_DIR", _db_path(fo))
    assert load_fiftyone() is fo
    monkeypatch.setenv("FIFTYONE_DATABASE_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(CurationError, match="another FiftyOne process"):
        load_fiftyone()
    monkeypatch.setenv("FIFTYONE_DATABASE_URI", "mongodb://127.0.0.1:1")
    with pytest.raises(CurationError, match="not the requested --database-uri"):
        load_fiftyone()
    monkeypatch.setenv("FIFTYONE_DATABASE_URI", uri)
    assert load_fiftyone() is fo


def test_database_options_before_or_after_the_subcommand(fo, dataset_name, store, monkeypatch, tmp_path):
    from distillery.engine.cli import main

    st, _, _ = store
    uri, elsewhere = fo.config.database_uri, str(tmp_path / "elsewhere")
    sync_args = ["--store", str(st.root), "--dataset", dataset_name, "--quiet"]
    run = CliRunner().invoke
    monkeypatch.delenv("FIFTYONE_DATABASE_URI")  # the commands set both; monkeypatch restores them
    monkeypatch.delenv("FIFTYONE_DATABASE_DIR", raising=False)
    for args in (["curate", "--database-dir", elsewhere, "sync", *sync_args],
                 ["curate", "sync", "--database-dir", elsewhere, *sync_args]):
        r = run(main, args)
        assert r.exit_code == 1 and "not in the requested database dir " + elsewhere in r.output, (args, r.output)
        assert "Traceback" not in r.output
    # after the subcommand wins over before it
    r = run(main, ["curate", "--database-dir", elsewhere, "sync", "--database-dir", _db_path(fo), *sync_args])
    assert r.exit_code == 0 and "4 added, 0 updated" in r.output, r.output
    assert os.environ["FIFTYONE_DATABASE_DIR"] == _db_path(fo)
    bad = "mongodb://127.0.0.1:1"
    for args in (["curate", "--database-uri", bad, "commit", "--dataset", dataset_name, "--store", str(st.root)],
                 ["curate", "commit", "--database-uri", bad, "--dataset", dataset_name, "--store", str(st.root)],
                 ["curate", "--database-uri", uri, "app", "--database-uri", bad, "--dataset", dataset_name]):
        r = run(main, args)
        assert r.exit_code == 1 and f"not the requested --database-uri {bad}" in r.output, (args, r.output)
    r = run(main, ["curate", "--database-uri", bad, "commit", "--database-uri", uri, "--dataset", dataset_name,
                   "--store", str(st.root)])
    assert r.exit_code == 0 and "curation version 1 written (0 decisions)" in r.output, r.output
    assert os.environ["FIFTYONE_DATABASE_URI"] == uri


CURATION_KEYS = ("score_bands, ambiguity_margin, mask_box_iou, min_area, max_area, overlap_iou, many_instances, "
                 "near_duplicate_bits, rules")
SIGNALS = "below, uncertain, confident, tiny, image_filling, ambiguous, mask_box_disagree, overlap"

#: (YAML text, key path, what the message must say after "<file>: <key path>").
BAD_CURATION = [
    ("thresholds: 1\n", "thresholds", f": unknown key; known keys: {CURATION_KEYS}"),
    ("score_bands: {cat: {confident: 0.6, lower: 0.1}}\n", "score_bands.cat.lower",
     ": unknown key; known keys in score_bands.cat: confident, below"),
    ("rules: {blurry: reject}\n", "rules.blurry", f": unknown key; known keys in rules: {SIGNALS}"),
    ("many_instances: lots\n", "many_instances", ": must be an integer in [0, 1000000000], got 'lots'"),
    ("ambiguity_margin: yes\n", "ambiguity_margin", ": must be a number in [0.0, 1.0], got True"),
    ("min_area: 1e-3\n", "min_area",
     ": must be a number in [0.0, 1.0], got '1e-3' (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)"),
    ("score_bands: [cat, dog]\n", "score_bands",
     ": must be a mapping from a string to a mapping with keys confident, below, got ['cat', 'dog']"),
    ("min_area: 2\n", "min_area", ": must be a number in [0.0, 1.0], got 2"),
    ("near_duplicate_bits: 65\n", "near_duplicate_bits", ": must be an integer in [0, 64], got 65"),
    ("score_bands: {default: {confident: 1.5}}\n", "score_bands.default.confident",
     ": must be a number in [0.0, 1.0], got 1.5"),
    ("score_bands: {cat: {confident: 0.2, below: 0.5}}\n", "score_bands.cat",
     ": below (0.5) must not exceed confident (0.2)"),
    ("min_area: 0.5\nmax_area: 0.4\n", "min_area", " (0.5) must not exceed max_area (0.4)"),
    ("rules: {below: drop}\n", "rules.below", ": must be one of accept, reject, ignore, or null, got 'drop'"),
]


@pytest.mark.parametrize("text, key, problem", BAD_CURATION, ids=[b[1] + "-" + b[2][2:14] for b in BAD_CURATION])
def test_bad_curation_files_give_one_line_with_file_key_and_allowed_values(tmp_path, text, key, problem):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        CurationConfig.load(p)
    assert str(e.value) == f"{p}: {key}{problem}"


def test_config_errors_name_the_problem(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("min_area: 2\nrules: {below: drop, blurry: reject}\nthresholds: 1\n")
    with pytest.raises(ConfigError) as e:
        CurationConfig.load(p)
    lines = str(e.value).splitlines()  # every bad key on its own line, each naming the file
    assert [line.split(": ")[1] for line in lines] == ["min_area", "rules.below", "rules.blurry", "thresholds"]
    assert all(line.startswith(f"{p}: ") for line in lines)
    cfg = CurationConfig.from_dict({"score_bands": {"unicorn": {"confident": 0.5}}})
    with pytest.raises(ConfigError, match="unicorn"):
        cfg.check_classes(CLASSES)
    from distillery.engine.config import resolve_config

    shipped = resolve_config("rules", "default")
    assert CurationConfig.load(shipped) == CurationConfig()  # the shipped file states the defaults


def test_class_bands_take_missing_thresholds_from_the_default_band():
    # "default" written after the class: the class still takes the file's default below
    cfg = CurationConfig.from_dict({"score_bands": {"cat": {"confident": 0.6}, "default": {"below": 0.1}},
                                    "rules": {"overlap": "ignore"}})
    assert cfg.band("cat") == Band(confident=0.6, below=0.1)
    assert cfg.band("dog") == cfg.band("default") == Band(confident=0.5, below=0.1)
    assert [cfg.band("cat").of(s) for s in (0.6, 0.3, 0.05)] == ["confident", "uncertain", "below"]
    assert cfg.rules == {**DEFAULT_RULES, "overlap": "ignore"}
    assert CurationConfig.from_dict(cfg.to_dict()) == cfg
    assert CurationConfig.from_dict(None) == CurationConfig()


def test_cli_sync_rules_commit_report(fo, dataset_name, store, tmp_path):
    from distillery.engine.cli import main

    st, ls, _ = store
    rules = tmp_path / "curation.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    run = CliRunner().invoke
    r = run(main, ["curate", "sync", "--store", str(st.root), "--dataset", dataset_name, "--quiet"])
    assert r.exit_code == 0, r.output
    assert "4 added, 0 updated, 0 unchanged images (written: 10 instances, 1 error images" in r.output
    assert "review-queue" in r.output
    r = run(main, ["curate", "rules", "--dataset", dataset_name, "--rules", str(rules)])
    assert r.exit_code == 0 and "accept 2, reject 3, ignore 5" in r.output, r.output
    assert "ambiguous 1" in r.output and "tiny 1" in r.output  # which signals held
    # a sync with other thresholds re-bands every instance, not only new ones
    rules2 = tmp_path / "strict.yaml"
    rules2.write_text(yaml.safe_dump({"score_bands": {"default": {"confident": 0.95, "below": 0.3}}}))
    r = run(main, ["curate", "sync", "--store", str(st.root), "--dataset", dataset_name, "--quiet", "--rules", str(rules2)])
    assert r.exit_code == 0 and "0 added" in r.output and "instances changed band" in r.output, r.output
    assert "confident" not in fo.load_dataset(dataset_name).count_values(f"{FIELD}.detections.band")
    other = tmp_path / "other-store"  # the same label-set id can live in another store
    shutil.copytree(st.root, other)
    r = run(main, ["curate", "commit", "--dataset", dataset_name, "--store", str(other)])
    assert r.exit_code == 1 and f"was synced from the store {st.root.resolve()}, not {other}" in r.output, r.output
    assert not list(other.glob("labelsets/*/curation/*.parquet"))
    r = run(main, ["curate", "commit", "--dataset", dataset_name, "--store", str(st.root)])
    assert r.exit_code == 0 and "curation version 1 written (10 decisions)" in r.output, r.output
    out = tmp_path / "report"
    r = run(main, ["curate", "report", "--store", str(st.root), "--out", str(out), "--rules", str(rules)])
    assert r.exit_code == 0, r.output
    nums = json.loads((out / "report.json").read_text())
    assert {k: nums["decisions"][k] for k in ("accept", "reject", "ignore", "undecided")} == \
        {"accept": 2, "reject": 3, "ignore": 5, "undecided": 0}
    assert nums["classes"]["cat"]["instances"] == 7 and nums["classes"]["dog"]["instances"] == 3
    assert sum(nums["classes"]["cat"]["histogram"]) == 7 and nums["classes"]["cat"]["histogram"][17] == 5  # float32 0.9 < 0.9
    assert nums["classes"]["dog"]["thresholds"] == {"confident": 0.8, "below": 0.4}
    assert nums["classes"]["dog"]["bands"] == {"uncertain": 1, "below": 1, "confident": 1}
    assert nums["errors"] == {"missing": 1} and nums["curation_version"] == 1
    for png in ("counts.png", "scores.png", "decisions.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width >= 600
            assert np.asarray(im.convert("L")).std() > 5  # something was drawn
    # bad input: unknown dataset, rules naming a class the label set lacks
    r = run(main, ["curate", "rules", "--dataset", "no-such-dataset-xyz", "--rules", str(rules)])
    assert r.exit_code != 0 and "no FiftyOne dataset 'no-such-dataset-xyz'" in r.output
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run(main, ["curate", "app", "--dataset", dataset_name, "--port", str(busy.getsockname()[1])])
    assert r.exit_code != 0 and "choose another --port" in r.output, r.output
    rules.write_text("min_area: 1e-3\n")
    r = run(main, ["curate", "rules", "--dataset", dataset_name, "--rules", str(rules)])
    assert r.exit_code != 0 and "write 0.001" in r.output
    rules.write_text(yaml.safe_dump({"score_bands": {"horse": {"confident": 0.5}}}))
    r = run(main, ["curate", "rules", "--dataset", dataset_name, "--rules", str(rules)])
    assert r.exit_code != 0 and "horse" in r.output and "Traceback" not in r.output
