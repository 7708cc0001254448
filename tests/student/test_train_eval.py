"""Training runs end to end from the store (tiny and short), resume, plain-ultralytics
checkpoints, and COCOeval-based evaluation of label sets and students."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco
from distillery.student.data import Selection
from distillery.engine.evaluation import evaluate, records_to_predictions, write_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gt_store(coco128, coco128_gt, tmp_path_factory):
    """coco128 GT, 8 photos with a person, imported as a label set."""
    d = tmp_path_factory.mktemp("gt")
    person = next(c for c in coco128_gt["categories"] if c["name"] == "person")
    ids = sorted({a["image_id"] for a in coco128_gt["annotations"] if a["category_id"] == person["id"]})[:8]
    sub = {"images": [im for im in coco128_gt["images"] if im["id"] in ids],
           "annotations": [a for a in coco128_gt["annotations"] if a["image_id"] in ids],
           "categories": coco128_gt["categories"]}
    (d / "gt.json").write_text(json.dumps(sub))
    ls, _ = import_coco(LabelStore(d / "store"), str(d / "gt.json"), str(coco128 / "images"))
    return d, ls, sub


TINY = dict(epochs=2, imgsz=64, batch=4, workers=0, plots=False, seed=0, mosaic=0.0, val=True)


def test_train_resume_and_plain_checkpoint(gt_store, tmp_path):
    from ultralytics import YOLO

    from distillery.student.train import train

    d, ls, _ = gt_store
    out = tmp_path / "run"

    class Interrupted(Exception):
        pass

    def crash_after_first_save(trainer):  # as if the machine died after epoch 1's checkpoint
        raise Interrupted

    with pytest.raises(Interrupted):
        train(d / "store", out, model="yolov8n-seg.yaml", selection=Selection(classes=("person", "dog"), val_fraction=0.0),
              val_labelset=ls.id, callbacks={"on_model_save": crash_after_first_save}, **TINY)
    info = json.loads((out / "distillery.json").read_text())
    assert info["labelset"] == ls.id and info["names"] == ["person", "dog"] and info["curation_version"] == 0
    assert info["counts"]["train_images"] == 8 and info["counts"]["kept"] > 0
    assert (out / "args.yaml").is_file() and (out / "weights" / "last.pt").is_file()
    assert len((out / "results.csv").read_text().strip().splitlines()) == 2  # header + epoch 1
    with pytest.raises(FileExistsError, match="--resume"):
        train(d / "store", out, **TINY)
    train(d / "store", out, resume=True)
    assert len((out / "results.csv").read_text().strip().splitlines()) == 3  # epoch 2 appended
    with pytest.raises(ValueError, match=f"run {out} finished its 2 epochs; nothing to resume.*--model {out}/weights/last.pt"):
        train(d / "store", out, resume=True)
    model = YOLO(str(out / "weights" / "best.pt"))  # plain ultralytics loads it
    assert model.names == {0: "person", 1: "dog"}
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(d / "store", tmp_path / "none", resume=True)


def test_label_set_evaluates_to_one_and_reports_class_mapping(gt_store, tmp_path):
    d, ls, sub = gt_store
    recs = [r for r in ls.iter_records()]
    preds = records_to_predictions(recs, ls.classes)
    rep = evaluate(sub, preds, ls.classes + ["unicorn"], image_files=[r.path for r in recs])
    assert rep["bbox"]["mAP50-95"] == pytest.approx(1.0) and rep["segm"]["mAP50-95"] == pytest.approx(1.0)
    assert rep["model_classes_missing_in_gt"] == ["unicorn"] and rep["images"] == 8
    assert rep["bbox"]["per_class"]["person"]["AP50"] == pytest.approx(1.0)

    # a model that knows only "person": other GT classes are listed, not scored
    only = [p for p in preds if p["class_name"] == "person"]
    rep = evaluate(sub, only, ["person"], image_files=[r.path for r in recs])
    assert rep["categories_evaluated"] == ["person"] and "dog" not in rep["categories_evaluated"]
    assert rep["gt_classes_unknown_to_model"] and rep["bbox"]["mAP50"] == pytest.approx(1.0)

    # worse predictions score lower: shift every person box by half its width
    shifted = copy.deepcopy(only)
    for p in shifted:
        p["bbox"][0] += p["bbox"][2] / 2
        p.pop("segmentation")
    rep2 = evaluate(sub, shifted, ["person"], image_files=[r.path for r in recs], iou_types=("bbox",))
    assert rep2["bbox"]["mAP50"] < 0.5

    write_report(rep, tmp_path / "rep", "test")
    for f in ("report.json", "per_class_ap.csv", "per_class_ap.md", "pr_curves.png", "per_class_ap.png"):
        assert (tmp_path / "rep" / f).is_file()
    assert "| person | 1.000 | 1.000 | 1.000 | 1.000 |" in (tmp_path / "rep" / "per_class_ap.md").read_text()
    with Image.open(tmp_path / "rep" / "pr_curves.png") as im:
        assert np.asarray(im.convert("L")).std() > 5


def test_cli_train_and_eval(gt_store, tmp_path, coco128):
    from distillery.engine.cli import main

    d, ls, _ = gt_store
    run = CliRunner().invoke
    out = tmp_path / "cli-run"
    r = run(main, ["train", "--store", str(d / "store"), "--out", str(out), "--epochs", "1", "--imgsz", "64",
                   "--batch", "4", "--classes", "person", "--val-fraction", "0", "--val-labelset", ls.id,
                   "--set", "workers=0", "--set", "plots=false"])
    assert r.exit_code == 0, r.output
    r = run(main, ["eval", "--model", str(out / "weights" / "best.pt"), "--images", str(coco128 / "images"),
                   "--gt", str(d / "gt.json"), "--out", str(tmp_path / "ev"), "--imgsz", "64"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["images"] == 8 and rep["categories_evaluated"] == ["person"]
    assert 0.0 <= rep["bbox"]["mAP50"] <= 1.0 and "dog" in rep["gt_classes_unknown_to_model"]
    r = run(main, ["eval", "--store", str(d / "store"), "--gt", str(d / "gt.json"), "--out", str(tmp_path / "ev2")])
    assert r.exit_code == 0 and '"bbox": {"mAP50-95": 1.0' in r.output, r.output
    # bad input: both or neither of --model/--store, a class outside the ontology, a non-COCO GT
    r = run(main, ["eval", "--gt", str(d / "gt.json"), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "exactly one of --model" in r.output
    r = run(main, ["train", "--store", str(d / "store"), "--out", str(tmp_path / "y"), "--classes", "unicorn"])
    assert r.exit_code != 0 and "unicorn" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    r = run(main, ["eval", "--store", str(d / "store"), "--gt", str(bad), "--out", str(tmp_path / "z")])
    assert r.exit_code != 0 and "not a COCO instances file" in r.output
