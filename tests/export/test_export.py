"""Export: ONNX parity on real photos, INT8 Q/DQ artifacts, calibration = inference
preprocessing, engine manifests and device profiles (TensorRT itself only on a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student(coco128, coco128_gt, tmp_path_factory):
    """A student trained for one epoch from a label set (so the run has distillery.json)."""
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
                val_labelset=ls.id, epochs=1, imgsz=64, batch=8, workers=0, plots=False, seed=0, val=False)
    return d, ls, run / "weights" / "best.pt", sub


@pytest.fixture(scope="module")
def exported(student):
    from distillery.export.onnx import export_onnx

    d, _, pt, _ = student
    return export_onnx(pt, d / "student.onnx", imgsz=320)


@pytest.fixture(scope="module")
def photos(coco128):
    return [str(p) for p in sorted((coco128 / "images").glob("*.jpg"))[:4]]


def test_onnx_metadata_and_raw_parity(student, exported, photos):
    from distillery.export.onnx import PREPROCESSING, metadata, raw_parity

    _, ls, pt, _ = student
    meta = metadata(exported)
    assert meta["distillery_labelset"] == ls.id and meta["imgsz"] == "[320, 320]" and meta["task"] == "segment"
    assert json.loads(meta["distillery_preprocessing"]) == PREPROCESSING
    assert "'person'" in meta["names"] and meta["distillery_head"] == "/model.22/"
    d = raw_parity(pt, exported, photos, 320)
    # fp32 kernels differ in summation order: within 1e-4 of each output's magnitude
    assert d["output0"] <= 1e-4 * d["output0_scale"] and d["output1"] <= 1e-4 * max(d["output1_scale"], 1e-3), d


def test_same_detections_after_postprocessing(student, exported, photos):
    from torchvision.ops import box_iou
    import torch

    from distillery.engine.evaluation import predict_ultralytics

    _, _, pt, _ = student
    # a one-epoch student scores low: keep (almost) every candidate, ultralytics' NMS decides
    a = predict_ultralytics(pt, photos, imgsz=320, conf=1e-6)
    b = predict_ultralytics(exported, photos, imgsz=320, conf=1e-6)
    assert len(a) > 20 and len(b) > 20  # counts at conf 1e-6 hinge on near-ties in NMS; compare the best ones
    for f in photos:
        pa = sorted((p for p in a if p["file_name"] == f), key=lambda p: -p["score"])[:10]
        pb = [p for p in b if p["file_name"] == f]
        if not pa:
            continue
        xyxy = lambda ps: torch.tensor([[p["bbox"][0], p["bbox"][1], p["bbox"][0] + p["bbox"][2],  # noqa: E731
                                         p["bbox"][1] + p["bbox"][3]] for p in ps])
        iou = box_iou(xyxy(pa), xyxy(pb))
        same_cls = torch.tensor([[x["class_name"] == y["class_name"] for y in pb] for x in pa])
        assert ((iou > 0.99) & same_cls).any(1).all()  # each of the 10 best has its twin (a weak student: lower ranks are near-ties)


def test_calibration_preprocessing_is_inference_preprocessing(exported, photos):
    from ultralytics import YOLO
    from ultralytics.utils.patches import imread

    from distillery.export.onnx import preprocess

    model = YOLO(str(exported), task="segment")
    model.predict(photos[0], imgsz=320, verbose=False)  # sets up ultralytics' predictor
    for p in photos:
        ours = preprocess(p, 320)
        theirs = model.predictor.preprocess([imread(p)]).cpu().numpy()
        assert ours.shape == theirs.shape == (1, 3, 320, 320)
        np.testing.assert_array_equal(ours, theirs)


def test_int8_artifacts_qdq_and_run(student, exported, photos, tmp_path):
    import onnxruntime as ort

    from distillery.export.int8 import CalibrationError, calibration_images, head_nodes, qdq_counts, quantize

    _, ls, _, _ = student
    with pytest.raises(CalibrationError, match="8 usable images, fewer than the 9"):
        calibration_images(ls, n=9)
    paths = calibration_images(ls, n=8)
    assert paths == calibration_images(ls, n=8)  # deterministic
    r = quantize(exported, tmp_path / "s.int8.onnx", paths)
    cpu, trt = qdq_counts(r["cpu"]), qdq_counts(r["tensorrt"])
    assert cpu["QuantizeLinear"] > 50 and cpu["activation_zero_point_dtypes"] == ["uint8"]
    assert trt["activation_zero_point_dtypes"] == ["int8"] and trt["nonzero_zero_points"] == 0  # symmetric
    assert r["excluded_nodes"] == len(head_nodes(exported)) > 0
    import onnx

    q = onnx.load(r["cpu"])
    head = {n.name for n in q.graph.node if n.name.startswith("/model.22/")}
    assert head and all(n.op_type not in ("QLinearConv", "ConvInteger") for n in q.graph.node if n.name in head)
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    fp = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    for path in (r["cpu"], r["tensorrt"]):
        out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"images": x})
        assert [o.shape for o in out] == [o.shape for o in fp]
        assert np.isfinite(out[0]).all()
    # quantizing the head's inner convs, then all of it, gives more and more Q/DQ nodes
    r1 = quantize(exported, tmp_path / "o.int8.onnx", paths, keep_head_fp32="outputs")
    r2 = quantize(exported, tmp_path / "all.int8.onnx", paths, keep_head_fp32=False)
    n1, n2 = qdq_counts(r1["cpu"])["QuantizeLinear"], qdq_counts(r2["cpu"])["QuantizeLinear"]
    assert cpu["QuantizeLinear"] < n1 < n2
    assert 0 < len(head_nodes(exported, keep="outputs")) < len(head_nodes(exported))
    assert not any("cv2.0.0" in n for n in head_nodes(exported, keep="outputs"))
    assert any(n.startswith("/model.22/cv2.0/cv2.0.2/") for n in head_nodes(exported, keep="outputs"))


def test_engine_manifest_compatibility_and_profiles(tmp_path):
    from distillery.engine.config import ConfigError
    from distillery.export.tensorrt import DeviceProfile, EngineMismatch, check_compatible

    built = {"tensorrt_version": "11.0.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    check_compatible(built, dict(built))
    for k, v, msg in (("tensorrt_version", "10.9.0", "TensorRT 11.0.0"), ("compute_capability", "9.0", "capability 8.7"),
                      ("gpu_name", "NVIDIA H200", "GPU 'Orin'")):
        with pytest.raises(EngineMismatch, match=msg):
            check_compatible(built, {**built, k: v})
    from distillery.engine.config import shipped_configs

    profiles = {name: DeviceProfile.load(p) for name, p in shipped_configs("device-profile")["device-profile"].items()}
    assert profiles["jetson-orin-nx-dla0"].dla_core == 0 and profiles["rtx-server"].batch == 8
    p = tmp_path / "orin.yaml"
    p.write_text("batch: 2\n")
    assert DeviceProfile.load(p) == DeviceProfile(name="orin", batch=2)  # the name defaults to the file stem
    p.write_text("imgsz: 600\nbatch: 0\n")
    with pytest.raises(ConfigError) as e:
        DeviceProfile.load(p)
    assert str(e.value).splitlines() == [f"{p}: imgsz: must be a positive integer and a multiple of 32, got 600",
                                         f"{p}: batch: must be a positive integer, got 0"]


PROFILE_KEYS = "name, imgsz, batch, workspace_mib, dla_core, gpu_fallback, optimization_level"

#: (YAML text, key path, what the message must say after "<file>: <key path>: "). A profile is
#: flat, so there is no nested key to get wrong, and no enumerated value.
BAD_PROFILES = [
    ("dla: 0\n", "dla", f"unknown key; known keys: {PROFILE_KEYS}"),
    ("gpu_fallback: 1\n", "gpu_fallback", "must be true or false, got 1"),
    ("imgsz: '640'\n", "imgsz",
     "must be a positive integer and a multiple of 32, got '640' (a number in quotes is text: remove the quotes)"),
    ("imgsz: 640.0\n", "imgsz", "must be a positive integer and a multiple of 32, got 640.0"),
    ("name: ''\n", "name", "must be a non-empty string, got ''"),
    ("imgsz: 600\n", "imgsz", "must be a positive integer and a multiple of 32, got 600"),
    ("workspace_mib: 10\n", "workspace_mib", "must be an integer >= 64, got 10"),
    ("dla_core: -1\n", "dla_core", "must be a non-negative integer, or null, got -1"),
    ("optimization_level: 6\n", "optimization_level", "must be an integer in [0, 5], got 6"),
]


@pytest.mark.parametrize("text, key, problem", BAD_PROFILES, ids=[b[1] + "-" + b[2][:12] for b in BAD_PROFILES])
def test_bad_device_profiles_give_one_line_with_file_key_and_allowed_values(tmp_path, text, key, problem):
    from distillery.engine.config import ConfigError
    from distillery.export.tensorrt import DeviceProfile

    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        DeviceProfile.load(p)
    assert str(e.value) == f"{p}: {key}: {problem}"


@pytest.mark.gpu
def test_engine_builds_and_runs_on_a_gpu(student, exported, tmp_path):  # pragma: no cover - GPU machines only
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("tensorrt")
    from distillery.export.tensorrt import DeviceProfile, build_engine, load_engine, manifest_path
    from distillery.export.int8 import calibration_images, quantize

    _, ls, _, _ = student
    r = quantize(exported, tmp_path / "s.int8.onnx", calibration_images(ls, n=8))
    prof = DeviceProfile(name="test", imgsz=320, batch=1)
    m = build_engine(r["tensorrt"], prof, tmp_path / "s.engine")
    assert json.loads(manifest_path(tmp_path / "s.engine").read_text()) == m
    assert load_engine(tmp_path / "s.engine") is not None


def test_cli_export_onnx_int8_check(student, tmp_path, coco128):
    from distillery.engine.cli import main

    d, ls, pt, _ = student
    run = CliRunner().invoke
    r = run(main, ["export", "onnx", "--model", str(pt), "--imgsz", "320", "--out", str(tmp_path / "s.onnx"),
                   "--check-images", str(coco128 / "images")])
    assert r.exit_code == 0 and "parity" in r.output, r.output
    r = run(main, ["export", "int8", "--model", str(tmp_path / "s.onnx"), "--store", str(d / "store"),
                   "--calib-images", "8", "--out", str(tmp_path / "s.int8.onnx")])
    assert r.exit_code == 0 and "activations uint8" in r.output and "activations int8" in r.output, r.output
    r = run(main, ["export", "int8", "--model", str(tmp_path / "s.onnx"), "--store", str(d / "store"),
                   "--calib-images", "500", "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code != 0 and "fewer than the 500 calibration images" in r.output
    r = run(main, ["export", "check", "--onnx", str(tmp_path / "s.onnx"), "--int8", str(tmp_path / "s.int8.onnx"),
                   "--gt", str(d / "gt.json"), "--images", str(coco128 / "images"), "--out", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["images"] == 8 and set(rep["models"]) == {"fp32", "int8"} and "agreement" in rep
    assert rep["models"]["int8"]["latency_ms"] > 0 and rep["imgsz"] == 320
    r = run(main, ["export", "onnx", "--model", str(pt), "--imgsz", "300", "--out", str(tmp_path / "y.onnx")])
    assert r.exit_code != 0 and "multiple of 32" in r.output


def test_agreement_reference_scores_identical_predictions_as_perfect(student):
    """The agreement measure: predictions scored against themselves as reference give mAP 1,
    and dropping half of them lowers recall-bound mAP."""
    from distillery.engine.evaluation import evaluate, records_to_predictions
    from distillery.export.check import predictions_to_gt

    _, ls, _, sub = student
    recs = [r for r in ls.iter_records() if r.error is None]
    preds = [p for p in records_to_predictions(recs, ls.classes) if p["class_name"] == "person"]
    ref = predictions_to_gt(preds, sub, ["person"])
    paths = [r.path for r in recs]
    same = evaluate(ref, preds, ["person"], image_files=paths)
    assert same["bbox"]["mAP50"] == pytest.approx(1.0) and same["segm"]["mAP50"] == pytest.approx(1.0)
    half = evaluate(ref, preds[::2], ["person"], image_files=paths)
    assert half["bbox"]["mAP50"] < 0.8
