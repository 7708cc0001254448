"""Shared by the export tests: one briefly trained student, its FP32 ONNX, four photos
(session-scoped: the ONNX Runtime and OpenVINO tests train and export it once)."""

from __future__ import annotations

import json

import pytest

from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco


def _bn_statistics_of_the_batch(trainer):
    """BatchNorm momentum 1: the running statistics become the (one) training batch's.
    ultralytics' momentum 0.03 leaves them at their initial values after one step, and in eval
    mode activations then vanish through depth: measured, every photo gave the same outputs
    (within 4e-4 px), so neither parity nor INT8 error could show anything."""
    import torch

    for m in trainer.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0


@pytest.fixture(scope="session")
def student(coco128, coco128_gt, tmp_path_factory):
    """A student trained for one epoch (one batch of 8 photos) from a label set, at the export
    size (so the run has distillery.json and BatchNorm statistics of real photos at 320)."""
    from distillery.student.data import Selection
    from distillery.student.train import train

    d = tmp_path_factory.mktemp("export")
    ids = sorted({a["image_id"] for a in coco128_gt["annotations"]})[:8]
    sub = {"images": [im for im in coco128_gt["images"] if im["id"] in ids],
           "annotations": [a for a in coco128_gt["annotations"] if a["image_id"] in ids],
           "categories": coco128_gt["categories"]}
    (d / "gt.json").write_text(json.dumps(sub))
    ls, _ = import_coco(LabelStore(d / "store"), str(d / "gt.json"), str(coco128 / "images"))
    run = train(d / "store", d / "run", model="yolov8n-seg.yaml", selection=Selection(val_fraction=0.0),
                val_labelset=ls.id, epochs=1, imgsz=320, batch=8, workers=0, plots=False, seed=0, val=False,
                callbacks={"on_train_start": _bn_statistics_of_the_batch})
    return d, ls, run / "weights" / "best.pt", sub


@pytest.fixture(scope="session")
def exported(student):
    from distillery.export.onnx import export_onnx

    d, _, pt, _ = student
    return export_onnx(pt, d / "student.onnx", imgsz=320)


@pytest.fixture(scope="session")
def photos(coco128):
    return [str(p) for p in sorted((coco128 / "images").glob("*.jpg"))[:4]]
