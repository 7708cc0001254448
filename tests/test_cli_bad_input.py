"""Every command, given a file of the wrong kind (a PyTorch file, an ONNX model, a text file, a
folder, a missing path) for each option that takes a file, stops before doing any work with
one error line naming the file and a non-zero exit status; and the wrong-or-silent outcomes
found by trying the CLI as a new user are refused with the numbers that explain them.

No FiftyOne database is started: the curate commands are given bad files only, which are
refused while the command line is parsed."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from distillery.engine.cli import main
from distillery.engine.images import content_id
from distillery.engine.record import LabelRecord
from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco

ALL = ("pt", "onnx", "text", "folder", "missing")
NAMES = ["000000000009.jpg", "000000000025.jpg"]


def _onnx(path: Path, meta: dict | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 32, 32])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["images"], ["out"])], "g", [x], [y]))
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """One file of each wrong kind."""
    import torch

    d = tmp_path_factory.mktemp("bad")
    torch.save({"epoch": 3, "weights": torch.zeros(2)}, d / "weights.pt")
    (d / "notes.txt").write_text("just some notes\n")
    (d / "empty").mkdir()
    (d / "other").mkdir()
    (d / "other" / "notes.txt").write_text("x\n")
    return {"pt": d / "weights.pt", "onnx": _onnx(d / "plain.onnx"), "text": d / "notes.txt",
            "folder": d / "empty", "missing": d / "missing" / "nothing.bin", "full_folder": d / "other"}


@pytest.fixture(scope="module")
def good(tmp_path_factory, coco128, coco128_gt):
    """Valid inputs for every option that is not under test."""
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    d = tmp_path_factory.mktemp("good")
    ids = {im["id"] for im in coco128_gt["images"] if im["file_name"] in NAMES}
    sub = {"images": [im for im in coco128_gt["images"] if im["id"] in ids],
           "annotations": [a for a in coco128_gt["annotations"] if a["image_id"] in ids],
           "categories": coco128_gt["categories"]}
    (d / "gt.json").write_text(json.dumps(sub))
    import_coco(LabelStore(d / "store"), str(d / "gt.json"), str(coco128 / "images"))
    torch.save({"model": SegmentationModel("yolov8n-seg.yaml", nc=2, verbose=False), "epoch": -1,
                "train_args": {"epochs": 3}}, d / "student.pt")
    student_onnx = _onnx(d / "student.onnx", {"task": "segment", "names": "{0: 'person', 1: 'dog'}",
                                              "imgsz": "[32, 32]"})
    return SimpleNamespace(store=str(d / "store"), coco=str(d / "gt.json"), images=str(coco128 / "images"),
                           ckpt=str(d / "student.pt"), onnx=str(student_onnx), new=str(d / "new"), dir=d, sub=sub)


# (command, option under test, wrong kinds, argv with the bad path b and good inputs g)
CASES = [
    ("label", "SOURCES", ALL, lambda b, g: ["label", b, "--classes", "a", "--store", g.new]),
    ("label", "--ontology", ALL, lambda b, g: ["label", g.images, "--ontology", b, "--store", g.new]),
    ("label", "--teachers", ALL, lambda b, g: ["label", g.images, "--classes", "a", "--teachers", b, "--store", g.new]),
    ("label", "--store", ("pt", "onnx", "text", "full_folder"),
     lambda b, g: ["label", g.images, "--classes", "a", "--store", b]),
    ("labels info", "--store", ALL, lambda b, g: ["labels", "info", "--store", b]),
    ("labels export", "--store", ALL, lambda b, g: ["labels", "export", "--store", b, "--format", "coco", "--out",
                                                     str(Path(g.new) / "x.json")]),
    ("labels export coco", "--out", ("folder",), lambda b, g: ["labels", "export", "--store", g.store, "--format",
                                                               "coco", "--out", b]),
    ("labels export yolo", "--out", ("text",), lambda b, g: ["labels", "export", "--store", g.store, "--format",
                                                             "yolo-seg", "--out", b]),
    ("labels import", "--coco", ALL, lambda b, g: ["labels", "import", "--coco", b, "--images", g.images, "--store", g.new]),
    ("labels import", "--images", ALL, lambda b, g: ["labels", "import", "--coco", g.coco, "--images", b, "--store", g.new]),
    ("labels import", "--store", ("pt", "onnx", "text", "full_folder"),
     lambda b, g: ["labels", "import", "--coco", g.coco, "--images", g.images, "--store", b]),
    ("teachers tiny", "OUT_DIR", ("pt", "onnx", "text"), lambda b, g: ["teachers", "tiny", b]),
    ("teachers finetune", "--teachers", ALL, lambda b, g: ["teachers", "finetune", "--teachers", b, "--store", g.store,
                                                           "--out", g.new]),
    ("teachers finetune", "--store", ALL, lambda b, g: ["teachers", "finetune", "--teachers", "default", "--store", b,
                                                        "--out", g.new]),
    ("teachers finetune", "--out", ("text",), lambda b, g: ["teachers", "finetune", "--teachers", "default", "--store",
                                                            g.store, "--out", b]),
    ("curate", "--database-dir", ("pt", "text"), lambda b, g: ["curate", "--database-dir", b, "commit", "--dataset",
                                                              "x", "--store", b]),
    ("curate sync", "--store", ALL, lambda b, g: ["curate", "sync", "--store", b, "--dataset", "x"]),
    ("curate sync", "--rules", ALL, lambda b, g: ["curate", "sync", "--store", g.store, "--dataset", "x", "--rules", b]),
    ("curate rules", "--rules", ALL, lambda b, g: ["curate", "rules", "--dataset", "x", "--rules", b]),
    ("curate commit", "--store", ALL, lambda b, g: ["curate", "commit", "--dataset", "x", "--store", b]),
    ("curate report", "--store", ALL, lambda b, g: ["curate", "report", "--store", b, "--out", g.new]),
    ("curate report", "--rules", ALL, lambda b, g: ["curate", "report", "--store", g.store, "--rules", b, "--out", g.new]),
    ("curate report", "--out", ("text",), lambda b, g: ["curate", "report", "--store", g.store, "--out", b]),
    ("train", "--store", ALL, lambda b, g: ["train", "--store", b, "--out", g.new, *TINY_TRAIN]),
    ("train", "--model", ALL, lambda b, g: ["train", "--store", g.store, "--model", b, "--out", g.new, *TINY_TRAIN]),
    ("train", "--out", ("text",), lambda b, g: ["train", "--store", g.store, "--out", b, *TINY_TRAIN]),
    ("eval", "--model", ALL, lambda b, g: ["eval", "--model", b, "--images", g.images, "--gt", g.coco, "--out", g.new]),
    ("eval", "--images", ALL, lambda b, g: ["eval", "--model", g.ckpt, "--images", b, "--gt", g.coco, "--out", g.new]),
    ("eval", "--store", ALL, lambda b, g: ["eval", "--store", b, "--gt", g.coco, "--out", g.new]),
    ("eval", "--gt", ALL, lambda b, g: ["eval", "--store", g.store, "--gt", b, "--out", g.new]),
    ("eval", "--out", ("text",), lambda b, g: ["eval", "--store", g.store, "--gt", g.coco, "--out", b]),
    ("export onnx", "--model", ALL, lambda b, g: ["export", "onnx", "--model", b, "--out", str(Path(g.new) / "s.onnx")]),
    ("export onnx", "--out", ("folder",), lambda b, g: ["export", "onnx", "--model", g.ckpt, "--out", b]),
    ("export onnx", "--check-images", ALL, lambda b, g: ["export", "onnx", "--model", g.ckpt, "--out",
                                                         str(Path(g.new) / "s.onnx"), "--check-images", b]),
    ("export int8", "--model", ALL, lambda b, g: ["export", "int8", "--model", b, "--images", g.images, "--out",
                                                  str(Path(g.new) / "q.onnx")]),
    ("export int8", "--store", ALL, lambda b, g: ["export", "int8", "--model", g.onnx, "--store", b, "--out",
                                                  str(Path(g.new) / "q.onnx")]),
    ("export int8", "--images", ALL, lambda b, g: ["export", "int8", "--model", g.onnx, "--images", b, "--out",
                                                   str(Path(g.new) / "q.onnx")]),
    ("export int8", "--out", ("folder",), lambda b, g: ["export", "int8", "--model", g.onnx, "--images", g.images,
                                                        "--out", b]),
    ("export engine", "--model", ("pt", "text", "folder", "missing"),
     lambda b, g: ["export", "engine", "--model", b, "--device-profile", "rtx-server", "--out", str(Path(g.new) / "e")]),
    ("export engine", "--device-profile", ALL, lambda b, g: ["export", "engine", "--model", g.onnx, "--device-profile",
                                                             b, "--out", str(Path(g.new) / "e")]),
    ("export engine", "--out", ("folder",), lambda b, g: ["export", "engine", "--model", g.onnx, "--device-profile",
                                                          "rtx-server", "--out", b]),
    ("export check", "--model", ALL, lambda b, g: ["export", "check", "--model", b, "--gt", g.coco, "--images", g.images]),
    ("export check", "--onnx", ALL, lambda b, g: ["export", "check", "--onnx", b, "--gt", g.coco, "--images", g.images]),
    ("export check", "--int8", ALL, lambda b, g: ["export", "check", "--int8", b, "--gt", g.coco, "--images", g.images]),
    ("export check", "--gt", ALL, lambda b, g: ["export", "check", "--model", g.ckpt, "--gt", b, "--images", g.images]),
    ("export check", "--images", ALL, lambda b, g: ["export", "check", "--model", g.ckpt, "--gt", g.coco, "--images", b]),
    ("export check", "--out", ("folder",), lambda b, g: ["export", "check", "--model", g.ckpt, "--gt", g.coco,
                                                         "--images", g.images, "--out", b]),
    ("configs show", "NAME", ALL, lambda b, g: ["configs", "show", b]),
]
#: Should a wrong file slip through, training stays tiny.
TINY_TRAIN = ["--epochs", "1", "--imgsz", "32", "--batch", "2", "--set", "workers=0"]

PARAMS = [pytest.param(argv, opt, kind, id=f"{cmd}-{opt}-{kind}") for cmd, opt, kinds, argv in CASES for kind in kinds]


@pytest.fixture(autouse=True, scope="module")
def _no_database():
    """Should a curate command reach FiftyOne, it finds no database quickly instead of starting one."""
    if "fiftyone" in sys.modules:
        yield
        return
    mp = pytest.MonkeyPatch()
    mp.setenv("FIFTYONE_DATABASE_URI", "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300")
    yield
    mp.undo()


def _one_error_line(result, path) -> str:
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert str(path) in errors[0] or os.path.basename(str(path)) in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("argv, option, kind", PARAMS)
def test_wrong_kind_of_file_is_refused_in_one_line(argv, option, kind, bad, good):
    path = str(bad[kind])
    r = CliRunner().invoke(main, argv(path, good))
    line = _one_error_line(r, path)
    assert not Path(good.new).exists(), f"{option} {kind}: the command did work before refusing: {line}"


def test_an_output_under_a_file_is_refused_naming_the_file(bad, good):
    """--out FILE/sub/...: mkdir would fail with a bare "[Errno 17] File exists"; each command
    names the file in the way instead, before any work."""
    under = Path(bad["text"]) / "sub"
    for argv in (["export", "onnx", "--model", good.ckpt, "--out", str(under / "s.onnx")],
                 ["export", "openvino", "--model", good.onnx, "--out", str(under / "s_openvino_model")],
                 ["train", "--store", good.store, "--out", str(under / "run"), *TINY_TRAIN],
                 ["eval", "--store", good.store, "--gt", good.coco, "--out", str(under / "report")],
                 ["labels", "export", "--store", good.store, "--format", "coco", "--out", str(under / "l.json")],
                 ["labels", "export", "--store", good.store, "--format", "yolo-seg", "--out", str(under / "yolo")],
                 ["labels", "import", "--coco", good.coco, "--images", good.images, "--store", str(under)]):
        line = _one_error_line(CliRunner().invoke(main, argv), bad["text"])
        assert f"{bad['text']} is a text file, not a folder, so nothing can be written under it" in line, line


def test_messages_say_what_the_file_is_and_what_to_give(bad, good):
    r = CliRunner()
    line = _one_error_line(r.invoke(main, ["export", "int8", "--model", str(bad["pt"]), "--images", good.images,
                                           "--out", "q.onnx"]), bad["pt"])
    assert "PyTorch file without an ultralytics model, not an ONNX model" in line and "export onnx" in line
    line = _one_error_line(r.invoke(main, ["export", "onnx", "--model", good.onnx, "--out", "x.onnx"]), good.onnx)
    assert "is an ONNX model, not an ultralytics segment checkpoint" in line
    line = _one_error_line(r.invoke(main, ["train", "--store", good.store, "--model", "READ_ME.md", "--out", "r"]),
                           "READ_ME.md")
    assert "READ_ME.md does not exist" in line and "yolov8n-seg.yaml" in line
    readme = Path(__file__).resolve().parents[1] / "README.md"
    line = _one_error_line(r.invoke(main, ["train", "--store", good.store, "--model", str(readme), "--out", "r"]), readme)
    assert "is a text file, not an ultralytics model YAML or segment checkpoint" in line
    line = _one_error_line(r.invoke(main, ["train", "--store", good.store, "--model", "yolov8n.yaml", "--out", "r"]),
                           "yolov8n.yaml")
    assert "is an ultralytics detect model YAML, not a segment one" in line
    cpu = _onnx(good.dir / "q.onnx", {"task": "segment", "names": "{0: 'person'}",
                                       "distillery_int8_target": "onnxruntime-cpu"})
    line = _one_error_line(r.invoke(main, ["export", "engine", "--model", str(cpu), "--device-profile", "rtx-server",
                                           "--out", "e.engine"]), cpu)
    assert "is the onnxruntime-cpu INT8 artifact; give the *.trt.onnx" in line
    trt = _onnx(good.dir / "q.trt.onnx", {"task": "segment", "names": "{0: 'person'}", "distillery_int8_target": "tensorrt"})
    line = _one_error_line(r.invoke(main, ["export", "check", "--int8", str(trt), "--gt", good.coco, "--images",
                                           good.images]), trt)
    assert "is the tensorrt INT8 artifact; give the CPU INT8 .onnx" in line
    r_info = r.invoke(main, ["labels", "info", "--store", str(bad["missing"])])
    assert r_info.exit_code == 1 and "does not exist" in _one_error_line(r_info, bad["missing"])


def test_filekinds_read_checkpoints_without_loading_them(good, bad, tmp_path):
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from distillery.engine.filekinds import FileKindError, checkpoint_progress, describe, ultralytics_checkpoint

    torch.save({"model": DetectionModel("yolov8n.yaml", nc=2, verbose=False)}, tmp_path / "det.pt")
    assert describe(good.ckpt) == "an ultralytics segment checkpoint"
    assert describe(tmp_path / "det.pt") == "an ultralytics detect checkpoint"
    assert describe(bad["pt"]) == "a PyTorch file without an ultralytics model"
    assert describe(bad["onnx"]) == "an ONNX model"
    assert describe(good.coco) == "a JSON file"
    from PIL import Image

    for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"):  # an image renamed .onnx: named by its bytes
        Image.new("RGB", (4, 4)).save(tmp_path / f"img-{fmt}.onnx", format=fmt)
        assert describe(tmp_path / f"img-{fmt}.onnx") == "an image", fmt
    data = Path(bad["onnx"]).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    assert describe(tmp_path / "cut.onnx") == "a damaged or cut-off ONNX file"
    assert checkpoint_progress(good.ckpt) == (-1, 3)
    with pytest.raises(FileKindError, match="det.pt is an ultralytics detect checkpoint, not an ultralytics segment"):
        ultralytics_checkpoint(tmp_path / "det.pt")


def test_only_database_failures_are_called_database_failures():
    import click
    from pymongo.errors import ServerSelectionTimeoutError

    from distillery.engine.cli_errors import fail_cleanly

    ns = {"__name__": "fiftyone.core.odm.database"}
    exec("def connect():\n    raise ConnectionError('Could not connect to `mongod`')\n", ns)

    def command(raiser):
        @click.command()
        @fail_cleanly
        def cmd():
            raiser()

        return CliRunner().invoke(cmd, [])

    def ray_refused():
        raise ConnectionRefusedError("[Errno 111] Connection refused: 10.0.0.1:6379")

    def mongo_timeout():
        raise ServerSelectionTimeoutError("127.0.0.1:27017: connection refused")

    r = command(ray_refused)
    assert r.exit_code == 1 and "connection failed: [Errno 111]" in r.output and "database" not in r.output
    r = command(ns["connect"])
    assert r.exit_code == 1 and "Could not connect to `mongod`: the database is not reachable" in r.output
    r = command(mongo_timeout)
    assert r.exit_code == 1 and "the database is not reachable" in r.output


def test_labels_import_refuses_a_folder_without_the_coco_images(good, coco128, tmp_path):
    images = tmp_path / "elsewhere"
    images.mkdir()
    shutil.copy(coco128 / "images" / "000000000030.jpg", images)  # an image, but none the COCO file names
    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["labels", "import", "--coco", good.coco, "--images", str(images), "--store", str(store)])
    line = _one_error_line(r, images)
    assert f"none of the 2 images of {good.coco} is in {images}" in line
    assert str(images / good.sub["images"][0]["file_name"]) in line
    assert not (store / "labelsets").exists()  # no label set created


def _low_score_store(root: Path):
    """One 64x48 photo-like image with three instances: box scores 0.2 (an ignore region at
    the default thresholds), 0.05 (background) and 0.9, the last rejected by a curation decision."""
    from distillery.engine.store import CURATION_SCHEMA

    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "a.png")
    masks, boxes = [], []
    for k in range(3):
        m = np.zeros((48, 64), np.uint8)
        m[4 + 14 * k:14 + 14 * k, 8:40] = 1
        masks.append(mask_utils.encode(np.asfortranarray(m)))
        boxes.append([8, 4 + 14 * k, 40, 14 + 14 * k])
    scores = np.array([[0.2], [0.05], [0.9]], np.float32)
    rec = LabelRecord(image_id=content_id((root / "a.png").read_bytes()), path=str(root / "a.png"), width=64,
                      height=48, num_classes=1, boxes=np.array(boxes, np.float32), scores=scores,
                      box_score=scores[:, 0], masks=masks, mask_score=np.full(3, 0.9, np.float32))
    ls = LabelStore(root / "store").create({"ontology": {"classes": ["cat"]}, "test": "zero-targets"})
    with ls.writer() as w:
        w.add(rec.to_row())
    ls.commit_curation(pa.Table.from_pylist([{"image_id": rec.image_id, "instance_id": rec.instance_ids[2],
                                              "decision": "reject", "label": None, "source": "manual"}],
                                            schema=CURATION_SCHEMA))
    return root / "store"


def test_train_refuses_a_selection_with_no_target_and_says_what_removed_them(tmp_path):
    store = _low_score_store(tmp_path / "data")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--store", str(store), "--out", str(out), "--val-fraction", "0"])
    line = _one_error_line(r, "no training targets")
    assert ("3 instances in the images kept: 2 below --min-score 0.25 (1 of them ignore regions from "
            "--ignore-min-score 0.1, the rest background; the highest of their box scores is 0.200)") in line
    assert "1 rejected and 0 ignored by curation decisions" in line and "images dropped: 0 rejected" in line
    assert not out.exists()  # refused before anything was written
    from distillery.student.data import Selection, build_table

    t = build_table(LabelStore(store).open(), Selection(min_score=0.1, val_fraction=0.0))  # 0.2 is a target now
    assert t.stats["kept"] == 1 and t.stats["rejected"] == 1 and t.stats["below_min_score"] == 1


def test_train_resume_of_a_finished_run_says_how_to_train_more(good, tmp_path):
    out = tmp_path / "run"
    (out / "weights").mkdir(parents=True)
    shutil.copy(good.ckpt, out / "weights" / "last.pt")  # epoch -1: what ultralytics' strip_optimizer writes at the end
    r = CliRunner().invoke(main, ["train", "--store", good.store, "--out", str(out), "--resume"])
    line = _one_error_line(r, out)
    assert "finished its 3 epochs; nothing to resume" in line
    assert f"--model {out / 'weights' / 'last.pt'} --out NEW_RUN_DIR" in line


def test_eval_stops_when_gt_sizes_differ_from_the_images(good, tmp_path):
    from distillery.engine.evaluation import EvalError, evaluate, records_to_predictions

    gt = json.loads(Path(good.coco).read_text())
    im = next(i for i in gt["images"] if i["file_name"] == NAMES[0])
    w, h = im["width"], im["height"]
    r = CliRunner().invoke(main, ["eval", "--store", good.store, "--gt", good.coco, "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0 and '"mAP50-95": 1.0' in r.output, r.output  # the GT scored against itself
    im["width"] = w + 10
    (tmp_path / "bad.json").write_text(json.dumps(gt))
    r = CliRunner().invoke(main, ["eval", "--store", good.store, "--gt", str(tmp_path / "bad.json"),
                                  "--out", str(tmp_path / "bad")])
    line = _one_error_line(r, NAMES[0])
    assert f"is {w}x{h} (width x height, EXIF orientation applied) but the GT's {NAMES[0]} is {w + 10}x{h}" in line
    ls = LabelStore(good.store).open()
    records = list(ls.iter_records())
    with pytest.raises(EvalError, match=f"a predicted mask is {w}x{h}"):  # files gone: the masks' frame tells
        evaluate(gt, records_to_predictions(records, ls.classes), ls.classes, image_files=[NAMES[0]])
