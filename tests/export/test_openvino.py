"""OpenVINO export: the folder loads in ultralytics' YOLO(), FP32 matches the FP32 ONNX (ONNX
Runtime), INT8 (NNCF) holds quantized operations and stays close to FP32, the head modes keep
what they say in floating point, and bad input is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from distillery.engine.cli import main

pytestmark = pytest.mark.slow
ov = pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'distillery[openvino]'")
pytest.importorskip("nncf", reason="the openvino extra is not installed: pip install 'distillery[openvino]'")


@pytest.fixture
def openvino_f32(monkeypatch):
    """OpenVINO computes in f32 in this test (every ``ov.Core()``, ultralytics' backend's included,
    as that backend itself pins it on Windows and ARM64): the test is parity of the IR with the
    ONNX graph. On CPUs with AVX-512 BF16 / AMX OpenVINO's default is bf16
    (:func:`distillery.export.openvino.cpu_inference_precision`); there the FP32 folder through
    YOLO() agreed with ONNX Runtime at box/mask mAP50 0.80/0.71 on this tiny student, which
    ``export check`` reports with the precision it ran at."""

    class F32Core(ov.Core):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.set_property("CPU", {"INFERENCE_PRECISION_HINT": ov.Type.f32})

    monkeypatch.setattr(ov, "Core", F32Core)


@pytest.fixture(scope="module")
def ov_models(student, exported, tmp_path_factory):
    """The FP32 folder and the INT8 folders of each --head mode (outputs: the default),
    calibrated on the label set's 8 images (the calibration of the ONNX Runtime INT8 tests)."""
    from distillery.export.int8 import calibration_images
    from distillery.export.openvino import export_openvino

    _, ls, _, _ = student
    d = tmp_path_factory.mktemp("openvino")
    paths = calibration_images(ls, n=8)
    return {"fp32": export_openvino(exported, d / "student_openvino_model"),
            "int8": export_openvino(exported, d / "student_int8_openvino_model", precision="int8", images=paths),
            "int8-head-fp32": export_openvino(exported, d / "headfp32_int8_openvino_model", precision="int8",
                                              images=paths, head="fp32"),
            "int8-head-int8": export_openvino(exported, d / "headint8_int8_openvino_model", precision="int8",
                                              images=paths, head="int8")}


def _raw(path_or_folder, xs):
    """Raw outputs (output0 boxes+scores+coefficients, output1 prototypes) over the photos."""
    if str(path_or_folder).endswith(".onnx"):
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path_or_folder), providers=["CPUExecutionProvider"])
        outs = [sess.run(None, {"images": x}) for x in xs]
    else:
        from distillery.export.openvino import openvino_folder

        core = ov.Core()
        c = core.compile_model(core.read_model(str(openvino_folder(path_or_folder))), "CPU",
                               {"INFERENCE_PRECISION_HINT": "f32"})  # FP32 even on CPUs whose default is bf16
        outs = [list(c(x).values()) for x in xs]
    return [np.concatenate(t) for t in zip(*outs)]


def test_folder_layout_and_metadata_are_ultralytics(exported, ov_models):
    """<name>_openvino_model/<name>.xml + .bin + metadata.yaml, metadata typed as ultralytics'
    exporter writes it (and as the FP32 ONNX says), weights stored FP32 (not FP16)."""
    import yaml

    from distillery.export.onnx import metadata

    folder = Path(ov_models["fp32"]["path"])
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.yaml", "student.bin", "student.xml"]
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    onnx_meta = metadata(exported)
    assert meta["task"] == "segment" and meta["imgsz"] == [320, 320] and meta["batch"] == 1 and meta["stride"] == 32
    assert meta["names"] == eval(onnx_meta["names"]) and meta["names"][0] == "person"  # noqa: S307 - our own file
    assert meta["args"]["dynamic"] is False and meta["distillery_labelset"] == onnx_meta["distillery_labelset"]
    assert meta["distillery_precision"] == "fp32" and meta["distillery_source_onnx"].startswith("student.onnx sha256:")
    ir = ov_models["fp32"]["ir"]
    assert ir["FakeQuantize"] == 0 and ir["low_precision_constants"] == 0 and ir["float_constants"] > 60
    # FP32 weights: the .bin is as large as the ONNX's initializers (FP16 would halve it)
    assert (folder / "student.bin").stat().st_size > 0.95 * Path(exported).stat().st_size


def test_fp32_loads_in_yolo_and_matches_onnx(exported, ov_models, photos, openvino_f32):
    """Raw outputs within 1e-4 of each output's magnitude of ONNX Runtime's on 4 photos, and after
    ultralytics' post-processing (YOLO() on the folder) the 10 best detections of each photo have
    a twin (same class, box IoU > 0.999, score within 1e-3) among the ONNX model's."""
    import torch
    from torchvision.ops import box_iou
    from ultralytics import YOLO

    from distillery.engine.evaluation import predict_ultralytics
    from distillery.export.onnx import preprocess

    xs = [preprocess(p, 320) for p in photos]
    for a, b in zip(_raw(exported, xs), _raw(ov_models["fp32"]["path"], xs)):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), np.abs(a - b).max()
    model = YOLO(ov_models["fp32"]["path"], task="segment")
    assert model.predict(photos[0], imgsz=320, verbose=False)[0].names[0] == "person"
    assert type(model.predictor.model.backend).__name__ == "OpenVINOBackend"
    a = predict_ultralytics(exported, photos, imgsz=320, conf=1e-6)
    b = predict_ultralytics(ov_models["fp32"]["path"], photos, imgsz=320, conf=1e-6)
    assert len(a) > 20 and len(b) > 20
    xyxy = lambda ps: torch.tensor([[p["bbox"][0], p["bbox"][1], p["bbox"][0] + p["bbox"][2],  # noqa: E731
                                     p["bbox"][1] + p["bbox"][3]] for p in ps])
    for f in photos:
        pa = sorted((p for p in a if p["file_name"] == f), key=lambda p: -p["score"])[:10]
        pb = [p for p in b if p["file_name"] == f]
        iou = box_iou(xyxy(pa), xyxy(pb))
        twin = (iou > 0.999) & torch.tensor([[x["class_name"] == y["class_name"] and abs(x["score"] - y["score"]) < 1e-3
                                              for y in pb] for x in pa])
        assert twin.any(1).all()


def test_int8_ir_holds_quantized_operations(ov_models):
    """NNCF's INT8 IR has FakeQuantize layers on activations and INT8 weight constants; the FP32
    IR, counted the same way, has none (so the count can fail). --head fp32 leaves the head's
    operations unquantized: no FakeQuantize under /model.22/, where --head int8 has many, and
    --head outputs some."""
    import re
    import xml.etree.ElementTree as ET

    for key in ("int8", "int8-head-fp32", "int8-head-int8"):
        ir = ov_models[key]["ir"]
        assert ir["FakeQuantize"] > 50 and ir["low_precision_constants"] > 40, (key, ir)
    assert ov_models["fp32"]["ir"]["FakeQuantize"] == ov_models["fp32"]["ir"]["low_precision_constants"] == 0

    def fq_in_head(r):
        root = ET.parse(r["xml"]).getroot()
        return [layer.get("name") for layer in root.iter("layer")
                if layer.get("type") == "FakeQuantize" and layer.get("name").startswith("/model.22/")]

    assert fq_in_head(ov_models["int8-head-fp32"]) == [] and ov_models["int8-head-fp32"]["ignored_ops"] > 100
    assert len(fq_in_head(ov_models["int8-head-int8"])) > 20 and ov_models["int8-head-int8"]["ignored_ops"] == 0
    # --head outputs (default): the inner convs of the branches are quantized, the output convs
    # (cv2/cv3/cv4.<level>.2), the DFL and box decoding are not
    outputs = fq_in_head(ov_models["int8"])
    assert 0 < ov_models["int8"]["ignored_ops"] < ov_models["int8-head-fp32"]["ignored_ops"]
    assert any("/cv3.0/cv3.0.1/" in n for n in outputs), outputs
    assert not [n for n in outputs if re.search(r"/cv[234]\.\d\.2/|/dfl/|/proto/cv3/", n)], outputs
    counts = [ov_models[k]["ir"]["FakeQuantize"] for k in ("int8-head-fp32", "int8", "int8-head-int8")]
    assert counts == sorted(counts) and len(set(counts)) == 3, counts


def test_int8_outputs_stay_close_to_fp32_on_photos(student, exported, ov_models, coco128):
    """INT8 against OpenVINO FP32 on 8 coco128 photos outside the calibration set, per output
    (boxes in px, class scores as logits, mask coefficients, prototypes): RMS of INT8 - FP32 over
    the RMS of FP32's variation across the photos, the measure of the ONNX Runtime INT8 test.
    Bound: noise below the signal (1.0), as for the ONNX Runtime artifacts (measured there:
    0.40-0.74). Measured here: --head outputs (default) 0.33-0.41, --head fp32 0.31-0.40,
    --head int8 0.34-0.88 (boxes: the DFL and box decoding quantized), which is why the default
    keeps the head's outputs in FP32: its boxes must stay within 0.6 of the signal."""
    from distillery.export.int8 import calibration_images
    from distillery.export.onnx import preprocess

    _, ls, _, _ = student
    calib = set(calibration_images(ls, n=8))
    photos = [str(p) for p in sorted((coco128 / "images").glob("*.jpg")) if str(p) not in calib][::16][:8]
    xs = [preprocess(p, 320) for p in photos]

    def named(outs):
        o0, o1 = outs
        p = np.clip(o0[:, 4:84].astype(np.float64), 1e-12, 1 - 1e-12)
        return {"boxes": o0[:, :4], "logits": np.log(p / (1 - p)), "coefficients": o0[:, 84:], "prototypes": o1}

    fp = named(_raw(ov_models["fp32"]["path"], xs))
    signal = {k: np.sqrt(((v - v.mean(0)) ** 2).mean()) for k, v in fp.items()}
    assert signal["boxes"] > 0.5 and min(signal.values()) > 0.01, signal
    for key in ("int8", "int8-head-fp32", "int8-head-int8"):
        q = named(_raw(ov_models[key]["path"], xs))
        r = {k: float(np.sqrt(((q[k] - fp[k]) ** 2).mean()) / signal[k]) for k in fp}
        print(f"\nOpenVINO {key}: INT8 error / signal " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
        assert max(r.values()) < 1.0, (key, r)
        if key != "int8-head-int8":
            assert r["boxes"] < 0.6, (key, r)


def test_cli_export_openvino_and_check_side_by_side(student, exported, tmp_path, coco128, openvino_f32):
    """`export openvino` FP32 and INT8 (from a label set), then `export check` with ORT FP32/INT8
    and OpenVINO FP32/INT8 in one report: OpenVINO FP32 scores as ORT FP32 does (same graph)."""
    from distillery.export.int8 import quantize, calibration_images

    d, ls, _, _ = student
    run = CliRunner().invoke
    r = run(main, ["export", "openvino", "--model", str(exported), "--out", str(tmp_path / "s_openvino_model")])
    assert r.exit_code == 0 and "0 FakeQuantize" in r.output, r.output
    assert "computes floating-point layers in" not in r.output, r.output  # f32 pinned (openvino_f32)
    r = run(main, ["export", "openvino", "--model", str(exported), "--precision", "int8", "--store", str(d / "store"),
                   "--calib-images", "8", "--out", str(tmp_path / "s_int8_openvino_model")])
    assert r.exit_code == 0 and "calibrated on 8 images (NNCF, mixed); head outputs" in r.output, r.output
    q = quantize(exported, tmp_path / "s.int8.onnx", calibration_images(ls, n=8))["cpu"]
    r = run(main, ["export", "check", "--onnx", str(exported), "--int8", q, "--openvino", str(tmp_path / "s_openvino_model"),
                   "--openvino-int8", str(tmp_path / "s_int8_openvino_model"), "--gt", str(d / "gt.json"),
                   "--images", str(coco128 / "images"), "--out", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    print("\n" + r.output)
    rep = json.loads((tmp_path / "c.json").read_text())
    assert list(rep["models"]) == ["fp32", "int8", "openvino-fp32", "openvino-int8"] and rep["imgsz"] == 320
    assert set(rep["vs_fp32"]) == {"int8", "openvino-fp32", "openvino-int8"}
    same = rep["vs_fp32"]["openvino-fp32"]
    assert abs(same["mask_map_drop_points"]) < 0.05 and abs(same["box_map_drop_points"]) < 0.05, same
    assert same["agreement"]["bbox_map50"] > 0.99 and same["agreement"]["segm_map50"] > 0.99, same
    assert all(v["speedup"] > 0 for v in rep["vs_fp32"].values())
    for row in ("ORT FP32", "ORT INT8", "OV FP32", "OV INT8"):
        assert row in r.output
    assert rep["openvino_inference_precision"] == "f32" and "OpenVINO computed" not in r.output  # pinned here


def test_check_states_the_precision_openvino_computed_in(exported, tmp_path, monkeypatch):
    """OpenVINO's CPU plugin computes in bf16 by default where the CPU has AVX-512 BF16 / AMX
    (this development machine): the report records the precision of ``ov.Core()`` as the check
    ran, and the table says so under the OV rows, so "OV FP32" is not read as FP32 arithmetic."""
    from distillery.export.check import format_report
    from distillery.export.openvino import cpu_inference_precision

    from ultralytics.nn.backends import openvino as backend

    pinned = backend.WINDOWS or (backend.LINUX and backend.ARM64)  # where ultralytics compiles with f32
    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    assert cpu_inference_precision() == ("f32" if pinned else default)
    with monkeypatch.context() as mp:  # the backend's own rule: on Windows it pins f32, whatever the CPU
        mp.setattr(backend, "WINDOWS", True)
        assert cpu_inference_precision() == "f32"
    m = {"bbox": {"mAP50-95": 0.1}, "segm": {"mAP50-95": 0.1, "mAP50": 0.2}, "latency_ms": 5.0}
    rep = {"images": 2, "imgsz": 320, "models": {"fp32": m, "openvino-fp32": m}}
    for precision, said in (("bf16", True), ("f32", False), (None, False)):
        text = format_report({**rep, **({"openvino_inference_precision": precision} if precision else {})})
        assert ("OpenVINO computed floating-point layers in bf16 on this CPU" in text) == said, text
        assert "FP32 arithmetic" in text if said else "FP32 arithmetic" not in text
    r = CliRunner().invoke(main, ["export", "openvino", "--model", str(exported), "--out", str(tmp_path / "s_openvino_model")])
    assert r.exit_code == 0, r.output
    default = cpu_inference_precision()
    assert (f"OpenVINO on this CPU computes floating-point layers in {default} by default" in r.output) == (default != "f32")


def _one_error_line(r, *needles):
    assert r.exit_code not in (0, None) and isinstance(r.exception, SystemExit), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_bad_input_is_refused_in_one_line(student, exported, ov_models, tmp_path, coco128):
    """Wrong file kinds for --model and for check's folders, a wrong --out name, an existing
    --out without --overwrite (kept as it was), --overwrite of a folder with other files,
    calibration options with FP32, an INT8 ONNX as input, the FP32 folder given as INT8."""
    from distillery.export.int8 import calibration_images, quantize

    d, ls, pt, _ = student
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    out = tmp_path / "x_openvino_model"
    _one_error_line(run("export", "openvino", "--model", pt, "--out", out), str(pt), "not an ONNX model")
    _one_error_line(run("export", "openvino", "--model", tmp_path, "--out", out), "is a folder, not an ONNX model")
    _one_error_line(run("export", "openvino", "--model", exported, "--out", tmp_path / "x.xml"),
                    "must end in _openvino_model", "x_openvino_model")
    _one_error_line(run("export", "openvino", "--model", exported, "--calib-images", 8, "--out", out),
                    "--calib-images: for --precision int8 only")
    _one_error_line(run("export", "openvino", "--model", exported, "--precision", "int8", "--out", out),
                    "exactly one calibration source")
    q = quantize(exported, tmp_path / "q.int8.onnx", calibration_images(ls, n=8))["cpu"]
    _one_error_line(run("export", "openvino", "--model", q, "--out", out), "is already quantized")
    assert not out.exists()

    existing = Path(ov_models["fp32"]["path"])
    before = {p.name: p.stat().st_mtime_ns for p in existing.iterdir()}
    _one_error_line(run("export", "openvino", "--model", exported, "--out", existing), "exists; pass --overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in existing.iterdir()} == before
    copy = tmp_path / "copy_openvino_model"
    shutil.copytree(existing, copy)
    (copy / "notes.txt").write_text("mine")
    _one_error_line(run("export", "openvino", "--model", exported, "--overwrite", "--out", copy),
                    "holds other files than an OpenVINO model (notes.txt)")
    assert (copy / "notes.txt").read_text() == "mine"
    (copy / "notes.txt").unlink()
    (copy / "copy.xml").write_text("stale")  # a second .xml: replaced as a whole by --overwrite
    r = run("export", "openvino", "--model", exported, "--overwrite", "--out", copy)
    assert r.exit_code == 0 and sorted(p.name for p in copy.iterdir()) == ["copy.bin", "copy.xml", "metadata.yaml"], r.output
    assert (copy / "copy.xml").read_text().startswith("<?xml")

    _one_error_line(run("export", "check", "--openvino", exported, "--gt", d / "gt.json", "--images", coco128 / "images"),
                    "--openvino", "is an ONNX model, not an OpenVINO model folder")
    _one_error_line(run("export", "check", "--openvino-int8", existing, "--gt", d / "gt.json", "--images", coco128 / "images"),
                    "is the OpenVINO fp32 model; give the int8 one")
    renamed = tmp_path / "renamed"
    shutil.copytree(existing, renamed)
    _one_error_line(run("export", "check", "--openvino", renamed, "--gt", d / "gt.json", "--images", coco128 / "images"),
                    "does not end in _openvino_model")
    cut = tmp_path / "cut_openvino_model"  # a damaged IR: OpenVINO's own error was a traceback from ultralytics
    shutil.copytree(existing, cut)
    xml = next(cut.glob("*.xml"))
    xml.write_bytes(xml.read_bytes()[:1000])
    _one_error_line(run("export", "check", "--openvino", cut, "--gt", d / "gt.json", "--images", coco128 / "images"),
                    f"{xml.name} cannot be read as XML (", "the IR is damaged")
    xml.write_text("<html><body/></html>")
    _one_error_line(run("export", "check", "--openvino", cut, "--gt", d / "gt.json", "--images", coco128 / "images"),
                    "is XML but not an OpenVINO IR (root <html>, not <net>)")
    shutil.copy(next(existing.glob("*.xml")), xml)
    (cut / "metadata.yaml").write_text("task: segment\nnames: [a, b\n")  # the YAML parser's message spans lines
    r = run("export", "check", "--openvino", cut, "--gt", d / "gt.json", "--images", coco128 / "images")
    _one_error_line(r, "metadata.yaml cannot be read (")
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_missing_extra_names_the_install_command(exported, tmp_path, monkeypatch):
    """Without openvino installed (simulated: the import fails), one line naming
    pip install 'distillery[openvino]', and nothing written."""
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    r = CliRunner().invoke(main, ["export", "openvino", "--model", str(exported), "--out",
                                  str(tmp_path / "s_openvino_model")])
    _one_error_line(r, "pip install 'distillery[openvino]'")
    assert not any(tmp_path.iterdir())


def test_check_without_the_extra_says_what_to_install(exported, ov_models, tmp_path, monkeypatch, coco128):
    """`export check --openvino` and `eval --model FOLDER` without openvino installed: one line
    naming the extra (check printed a traceback), before any model is scored."""
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    r = CliRunner().invoke(main, ["export", "check", "--onnx", str(exported), "--openvino", str(ov_models["fp32"]["path"]),
                                  "--gt", str(coco128 / "annotations.json"), "--images", str(coco128 / "images"),
                                  "--limit", "2"])
    _one_error_line(r, "OpenVINO export needs the openvino package (not installed): pip install 'distillery[openvino]'")
    assert "whl[openvino]" in r.output
    r = CliRunner().invoke(main, ["eval", "--model", str(ov_models["fp32"]["path"]), "--gt",
                                  str(coco128 / "annotations.json"), "--images", str(coco128 / "images"),
                                  "--out", str(tmp_path / "report")])
    _one_error_line(r, "is an OpenVINO model folder and the openvino package is not installed",
                    "pip install 'distillery[openvino]'")


def test_eval_takes_the_openvino_folder_and_scores_it_like_the_onnx(student, exported, ov_models, coco128, tmp_path,
                                                                     openvino_f32):
    """`distillery eval --model NAME_openvino_model/` runs through ultralytics' OpenVINO backend:
    the report equals the FP32 ONNX's, and the predictions match box for box."""
    from distillery.engine.evaluation import predict_ultralytics

    d, _, _, sub = student
    reports = {}
    for kind, model in (("onnx", exported), ("openvino", ov_models["fp32"]["path"])):
        out = CliRunner().invoke(main, ["eval", "--model", str(model), "--images", str(coco128 / "images"),
                                        "--gt", str(d / "gt.json"), "--imgsz", "320", "--out", str(tmp_path / kind)])
        assert out.exit_code == 0, out.output
        reports[kind] = json.loads((tmp_path / kind / "report.json").read_text())
    assert reports["openvino"]["images"] == reports["onnx"]["images"] == len(sub["images"])
    for t in ("bbox", "segm"):
        for k in ("mAP50-95", "mAP50"):
            assert reports["openvino"][t][k] == pytest.approx(reports["onnx"][t][k], abs=2e-3), (t, k)
    paths = [str(coco128 / "images" / im["file_name"]) for im in sub["images"]]
    a, b = (predict_ultralytics(m, paths, imgsz=320, conf=1e-4) for m in (exported, ov_models["fp32"]["path"]))
    assert len(a) > 0 and abs(len(a) - len(b)) <= 0.05 * len(a)  # scores near conf or max_det may fall either side
    for p in sorted(a, key=lambda p: -p["score"])[:20]:  # the confident ones: the same box in both
        same = [q for q in b if q["file_name"] == p["file_name"] and q["class_name"] == p["class_name"]]
        assert min(np.abs(np.subtract(p["bbox"], q["bbox"])).max() for q in same) < 0.5, p
    out = CliRunner().invoke(main, ["eval", "--model", str(tmp_path), "--images", str(coco128 / "images"),
                                    "--gt", str(d / "gt.json"), "--out", str(tmp_path / "x")])
    assert out.exit_code == 1 and "does not end in _openvino_model" in out.output, out.output
