"""`distillery teachers eval`: teachers compared on human labels (COCOeval AP, mask mIoU,
per-class deltas), on a 4-photo coco128 GT with the tiny random teachers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from distillery.engine.cli import main
from distillery.engine.record import LabelRecord
from distillery.engine.split import is_val
from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco
from distillery.labeling.teacher_eval import Teacher, gt_records, mask_miou, read_finetune, run_teacher_eval

NAMES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg", "000000000034.jpg"]


def subset(coco128_gt: dict) -> dict:
    """4 photos and only the categories they use (a small ontology keeps the teachers fast)."""
    images = [im for im in coco128_gt["images"] if im["file_name"] in NAMES]
    ids = {im["id"] for im in images}
    anns = [a for a in coco128_gt["annotations"] if a["image_id"] in ids]
    used = {a["category_id"] for a in anns}
    return {"images": images, "annotations": anns, "categories": [c for c in coco128_gt["categories"] if c["id"] in used]}


@pytest.fixture(scope="module")
def gt4(coco128, coco128_gt, tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher-eval")
    sub = subset(coco128_gt)
    (d / "gt.json").write_text(json.dumps(sub))
    ls, _ = import_coco(LabelStore(d / "store"), str(d / "gt.json"), str(coco128 / "images"), name="gt4")
    return d, ls, sub


@pytest.fixture(scope="module")
def seed1_teachers(tmp_path_factory):
    from distillery.labeling.tiny import write_tiny_teachers

    return write_tiny_teachers(tmp_path_factory.mktemp("x") / "tiny-seed1", seed=1)


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _rec(image_id: str, masks: list[np.ndarray], classes: list[int], C: int = 2, box_score=None, crowd=None):
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    scores = np.eye(C, dtype=np.float32)[classes].reshape(-1, C)
    return LabelRecord(image_id=image_id, path=f"/x/{image_id}.jpg", width=20, height=20, num_classes=C,
                       boxes=np.asarray(boxes, np.float32).reshape(-1, 4), scores=scores, box_score=box_score,
                       masks=[_rle(m) for m in masks], iscrowd=crowd)


def _box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((20, 20), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_miou_is_the_average_best_overlap_over_same_class_predictions():
    # image a: GT class 0 (100 px), class 1 (100 px), a crowd region of class 0
    ga = _rec("a", [_box(0, 10, 0, 10), _box(10, 20, 10, 20), _box(0, 5, 10, 20)], [0, 1, 0], crowd=[0, 0, 1])
    # half of g0 (IoU 0.5); g0 exactly but labelled class 1 (must not count for g0; IoU 0 with g1);
    # 80 of g1's 100 px (IoU 0.8), box score 0.3
    pa_ = _rec("a", [_box(0, 10, 0, 5), _box(0, 10, 0, 10), _box(10, 20, 12, 20)], [0, 1, 1],
               box_score=[0.9, 0.9, 0.3])
    gb = _rec("b", [_box(5, 15, 5, 15)], [0])  # image b: no prediction at all
    out = mask_miou([ga, gb], {"a": pa_}, ["cat", "dog"])
    assert out["instances"] == 3  # the crowd region is not an instance
    assert out["mIoU"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert out["per_class"] == {"cat": {"mIoU": pytest.approx(0.25), "gt_instances": 2},
                                "dog": {"mIoU": pytest.approx(0.8), "gt_instances": 1}}
    strict = mask_miou([ga, gb], {"a": pa_}, ["cat", "dog"], min_score=0.5)  # drops the 0.8 match
    assert strict["per_class"]["dog"]["mIoU"] == pytest.approx(0.0)


def test_gt_records_apply_curation(coco128, gt4, tmp_path):
    d, _, sub = gt4
    ls, _ = import_coco(LabelStore(tmp_path / "store"), str(d / "gt.json"), str(coco128 / "images"))
    recs = {r.path.rsplit("/", 1)[1]: r for r in ls.iter_records()}
    a, b = recs["000000000009.jpg"], recs["000000000025.jpg"]
    ids = a.instance_ids
    classes = ls.classes
    new_class = next(c for c in classes if c != classes[int(a.scores[1].argmax())])
    ls.commit_curation(pa.Table.from_pylist([
        {"image_id": a.image_id, "instance_id": ids[0], "decision": "reject", "label": None, "source": "manual"},
        {"image_id": a.image_id, "instance_id": ids[1], "decision": None, "label": new_class, "source": "manual"},
        {"image_id": b.image_id, "instance_id": None, "decision": "reject", "label": None, "source": "manual"},
    ]))
    got, version = gt_records(ls)
    assert version == 1 and sorted(r.path.rsplit("/", 1)[1] for r in got) == sorted(set(NAMES) - {"000000000025.jpg"})
    ga = next(r for r in got if r.image_id == a.image_id)
    assert ga.num_instances == a.num_instances - 1
    assert np.array_equal(ga.boxes, a.boxes[1:]) and classes[int(ga.scores[0].argmax())] == new_class
    ls.commit_curation(pa.Table.from_pylist([
        {"image_id": a.image_id, "instance_id": ids[2], "decision": "ignore", "label": None, "source": "manual"}]))
    got, version = gt_records(ls)
    ga = next(r for r in got if r.image_id == a.image_id)
    assert version == 2 and len(got) == 4 and ga.num_instances == a.num_instances
    assert ga.iscrowd.tolist() == [i == 2 for i in range(a.num_instances)]
    plain, version = gt_records(ls, curation=0)
    assert version == 0 and sum(r.num_instances for r in plain) == len(sub["annotations"])


def test_oracle_scores_one_and_the_tiny_teacher_far_below(gt4, tiny_teachers, tmp_path):
    d, gt, sub = gt4
    store = LabelStore(d / "store")
    teachers = [Teacher("oracle", tmp_path / "unused.yaml"), Teacher("tiny", tiny_teachers)]
    ev = run_teacher_eval(store, gt, teachers, predictions={"oracle": gt})
    r = ev.report
    oracle, tiny = r["teachers"]
    print({k: round(v, 4) for k, v in tiny.items() if isinstance(v, float)})
    assert r["images"] == 4 and r["split"]["val_fraction"] is None and r["gt"]["curation_version"] == 0
    for key in ("box mAP50-95", "box mAP50", "mask mAP50-95", "mask mAP50", "mask mIoU"):
        assert oracle[key] == pytest.approx(1.0), key
    assert tiny["box mAP50-95"] < 0.05 and tiny["mask mAP50-95"] < 0.05 and tiny["mask mIoU"] < 0.3
    cats = {c["id"]: c["name"] for c in sub["categories"]}
    n_gt = {}
    for a in sub["annotations"]:
        if not a["iscrowd"]:
            n_gt[cats[a["category_id"]]] = n_gt.get(cats[a["category_id"]], 0) + 1
    assert {row["class"]: row["gt_instances"] for row in ev.rows} == n_gt
    for row in ev.rows:
        assert row["values"]["oracle"] == {"box AP50-95": pytest.approx(1.0), "mask AP50-95": pytest.approx(1.0),
                                           "mask mIoU": pytest.approx(1.0)}
        assert row["delta"]["tiny"]["box AP50-95"] == pytest.approx(row["values"]["tiny"]["box AP50-95"] - 1.0)
        assert "box AP50-95" in row["worse"]["tiny"]  # below the oracle in every class
    assert tiny["labelset_name"].startswith("eval-tiny-") and tiny["labelled_now"] == 4
    again = run_teacher_eval(store, gt, teachers, predictions={"oracle": gt}, limit=2)
    assert again.report["teachers"][1]["labelled_now"] == 0 and again.report["images"] == 2  # cached labels


def test_a_class_lost_is_the_only_class_flagged_worse(gt4, tmp_path):
    """A teacher that is the GT minus every instance of one class: that class drops to 0 on
    every metric and is the only one flagged; the others stay at 1.0 (delta 0)."""
    d, gt, _ = gt4
    store = LabelStore(tmp_path / "store")
    lost = "bowl"
    j = gt.classes.index(lost)
    ls = store.create({"kind": "teacher", "ontology": gt.manifest["ontology"], "teachers": {"test": "minus-bowl"}})
    with ls.writer(16) as w:
        for r in gt.iter_records():
            keep = [k for k in range(r.num_instances) if int(r.scores[k].argmax()) != j]
            w.add(LabelRecord(image_id=r.image_id, path=r.path, width=r.width, height=r.height,
                              num_classes=len(gt.classes), boxes=r.boxes[keep], scores=r.scores[keep],
                              masks=[r.masks[k] for k in keep]).to_row())
    ev = run_teacher_eval(LabelStore(d / "store"), gt, [Teacher("gt", tmp_path / "a.yaml"), Teacher("lost", tmp_path / "b.yaml")],
                          predictions={"gt": gt, "lost": ls})
    rows = {row["class"]: row for row in ev.rows}
    assert lost in rows and len(rows) > 1
    assert rows[lost]["worse"] == {"lost": ["box AP50-95", "mask AP50-95", "mask mIoU"]}
    assert rows[lost]["delta"]["lost"] == {"box AP50-95": pytest.approx(-1.0), "mask AP50-95": pytest.approx(-1.0),
                                           "mask mIoU": pytest.approx(-1.0)}
    for name, row in rows.items():
        if name != lost:
            assert row["worse"] == {} and row["values"]["lost"]["box AP50-95"] == pytest.approx(1.0), name


def test_fine_tuned_teacher_is_evaluated_on_its_held_out_images(gt4, tmp_path):
    d, gt, _ = gt4
    store = LabelStore(d / "store")
    image_ids = [r.image_id for r in gt.iter_records()]
    f = next(f for f in (0.5, 0.25, 0.75, 0.4, 0.6) if 0 < sum(is_val(i, f) for i in image_ids) < 4)
    n_val = sum(is_val(i, f) for i in image_ids)
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "teachers.yaml").write_text("{}\n")
    (tmp_path / "ft" / "finetune.json").write_text(json.dumps({"labelset": {"id": "gt4"},
                                                                "hyperparameters": {"val_fraction": f}}))
    ft, ft_path = read_finetune(tmp_path / "ft" / "teachers.yaml")
    teachers = [Teacher("base", tmp_path / "a.yaml"), Teacher("ft", tmp_path / "ft" / "teachers.yaml", ft, ft_path)]
    preds = {"base": gt, "ft": gt}
    ev = run_teacher_eval(store, gt, teachers, predictions=preds)  # default: the held-out split
    assert ev.report["images"] == n_val and ev.report["split"]["val_fraction"] == f and ev.warnings == []
    ev = run_teacher_eval(store, gt, teachers, predictions=preds, val_only=False)
    assert ev.report["images"] == 4
    assert len(ev.warnings) == 1 and f"ft was fine-tuned on {4 - n_val} of the 4 evaluation images" in ev.warnings[0]


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_cli_prints_both_teachers_and_the_delta_and_writes_the_report(gt4, tiny_teachers, seed1_teachers, tmp_path):
    d, _, sub = gt4
    a, b = tiny_teachers.parent.name, seed1_teachers.parent.name
    argv = ["teachers", "eval", "--teachers", str(tiny_teachers), "--teachers", str(seed1_teachers),
            "--labelset", "gt4", "--store", str(d / "store"), "--out", str(tmp_path / "out"), "--quiet"]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, res.output
    print(res.output)
    lines = res.output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("teacher ") and "box mAP50-95" in line)
    assert lines[head + 1].split()[:2] == ["A", a] and lines[head + 2].split()[:2] == ["B", b]
    assert lines[head + 3].split()[0] == "B-A" and all(v[0] in "+-" for v in lines[head + 3].split()[1:])
    per = next(line for line in lines if line.startswith("class "))
    assert per.split() == ["class", "GT", "box", "AP", "A", "box", "AP", "B", "B-A", "mask", "AP", "A", "mask", "AP",
                           "B", "B-A", "mIoU", "A", "mIoU", "B", "B-A", "worse"]
    assert f"worse than {a} in " in res.output
    out = tmp_path / "out"
    with Image.open(out / "per_class_ap.png") as im:
        assert im.format == "PNG" and im.width > 1000
    r = json.loads((out / "report.json").read_text())
    assert [t["label"] for t in r["teachers"]] == [a, b] and r["images"] == 4 and r["baseline"] == a
    assert {row["class"] for row in r["per_class"]} == {c["name"] for c in sub["categories"]}
    for t in r["teachers"]:
        sub_report = json.loads((out / t["label"] / "report.json").read_text())
        assert sub_report["bbox"]["mAP50-95"] == t["box mAP50-95"]
    md = (out / "comparison.md").read_text().splitlines()
    assert sum(line.startswith("| B-A | ") for line in md) == 1  # the summary's delta row
    worse = [row["class"] for row in r["per_class"]
             if any(row["values"][b][m] < row["values"][a][m] for m in row["values"][a])]
    assert sorted(line.split("|")[1].strip(" *") for line in md if line.startswith("| **")) == sorted(worse)
    assert f"worse than {a} in {len(worse)} of {len(r['per_class'])} classes" in res.output
    res = CliRunner().invoke(main, argv)  # cached: nothing is labelled again
    assert res.exit_code == 0 and res.output.count("0 images labelled now") == 2, res.output


def test_cli_refuses_bad_input_in_one_line(gt4, tiny_teachers, tmp_path):
    d, gt, _ = gt4
    store = tmp_path / "store"
    shutil.copytree(d / "store", store)
    base = ["teachers", "eval", "--teachers", str(tiny_teachers), "--store", str(store), "--out", str(tmp_path / "o")]
    LabelStore(store).create({"kind": "teacher", "ontology": gt.manifest["ontology"], "teachers": {"t": 1}},
                             name="pseudo")
    line = _one_error_line(CliRunner().invoke(main, base + ["--labelset", "pseudo"]))
    assert "kind 'teacher', not human labels" in line and "labels import" in line
    line = _one_error_line(CliRunner().invoke(main, base + ["--labelset", "gt4", "--all-images", "--val-fraction", "0.2"]))
    assert "--val-fraction" in line and "--all-images" in line
    line = _one_error_line(CliRunner().invoke(main, base + ["--labelset", "nope"]))
    assert "'nope' not found" in line
    ft = tmp_path / "ft"
    ft.mkdir()
    shutil.copy(tiny_teachers, ft / "teachers.yaml")
    (ft / "finetune.json").write_text(json.dumps({"labelset": {"id": "gt4"}}))
    line = _one_error_line(CliRunner().invoke(main, base + ["--teachers", str(ft / "teachers.yaml"), "--labelset", "gt4"]))
    assert str(ft / "finetune.json") in line and "'hyperparameters.val_fraction'" in line
    (ft / "finetune.json").write_text(json.dumps({"labelset": "gt4", "val_fraction": 0.1}))  # not what finetune writes
    line = _one_error_line(CliRunner().invoke(main, base + ["--teachers", str(ft / "teachers.yaml"), "--labelset", "gt4"]))
    assert "'labelset.id'" in line and "teachers finetune" in line
    line = _one_error_line(CliRunner().invoke(main, base[:2] + ["--teachers", str(tmp_path / "missing.yaml"),
                                                                *base[4:], "--labelset", "gt4"]))
    assert "missing.yaml" in line
    (tmp_path / "file").write_text("x\n")
    line = _one_error_line(CliRunner().invoke(main, base[:6] + ["--out", str(tmp_path / "file"), "--labelset", "gt4"]))
    assert "--out" in line and "not a folder" in line
    line = _one_error_line(CliRunner().invoke(main, base[:4] + ["--store", str(tmp_path / "file"), *base[6:],
                                                                "--labelset", "gt4"]))
    assert "--store" in line and str(tmp_path / "file") in line
    bad = tmp_path / "bad.yaml"  # the second teacher's typo is found before the first labels anything
    bad.write_text(open(tiny_teachers).read().replace("batch_size: 4", "batch_size: 0", 1))
    before = sorted(s.id for s in LabelStore(store).labelsets())
    line = _one_error_line(CliRunner().invoke(main, base + ["--teachers", str(bad), "--labelset", "gt4"]))
    assert f"{bad}: detector.batch_size: must be a positive integer, got 0" in line
    assert sorted(s.id for s in LabelStore(store).labelsets()) == before
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("a,b", [(("owlv2", "sam2"), ("mm-grounding-dino", "sam-hq")), (("sam3",), ("grounding-dino", "sam"))])
def test_cli_compares_teachers_of_other_kinds_on_the_imported_gt(gt4, a, b, tmp_path):
    """Any two teacher kinds compare on the same human labels: each is labelled into its own
    label set (the kinds are in the fingerprint) and scored on 2 of the GT images."""
    presets = []
    for kinds in (a, b):
        d = tmp_path / "+".join(kinds)
        res = CliRunner().invoke(main, ["teachers", "tiny", str(d), *[x for k in kinds for x in ("--kind", k)]])
        assert res.exit_code == 0, res.output
        presets.append(d / "teachers.yaml")
    d, _, sub = gt4
    res = CliRunner().invoke(main, ["teachers", "eval", "--teachers", str(presets[0]), "--teachers", str(presets[1]),
                                    "--labelset", "gt4", "--store", str(d / "store"), "--out", str(tmp_path / "out"),
                                    "--limit", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [t["label"] for t in r["teachers"]] == ["+".join(a), "+".join(b)] and r["images"] == 2
    sets = [t["labelset"] for t in r["teachers"]]
    assert len(set(sets)) == 2
    for t, kinds in zip(r["teachers"], (a, b)):
        ls = LabelStore(d / "store").open(t["labelset"])
        assert ls.counts().labeled >= r["images"]  # the teacher's cache: an earlier eval may have labelled more
        spec = json.dumps(ls.manifest)
        assert all(f'"{k}"' in spec for k in kinds), (kinds, spec[:400])
