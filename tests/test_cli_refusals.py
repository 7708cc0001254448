"""Commands refuse, in one line and before writing anything, what would destroy a user's file
or silently do something else (found by a bad-input pass)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from distillery.engine.cli import main
from tests.test_cli_bad_input import _onnx

STUDENT_META = {"task": "segment", "names": "{0: 'person'}", "imgsz": "[32, 32]", "batch": "1"}


def _invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    return r.output


def test_int8_never_overwrites_its_input_nor_requantizes(tmp_path, coco128):
    import onnx
    from onnx import TensorProto, helper

    fp32 = _onnx(tmp_path / "m.onnx", STUDENT_META)
    before = fp32.read_bytes()
    out = _invoke(["export", "int8", "--model", fp32, "--images", coco128 / "images", "--calib-images", 2,
                   "--out", fp32])
    assert "would overwrite the input model" in out and fp32.read_bytes() == before
    # a model with Q/DQ nodes (an INT8 artifact) used to hang in quantize_static
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 32, 32])
    nodes = [helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["out"])]
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.UINT8, [], [0])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))
    for k, v in STUDENT_META.items():
        m.metadata_props.add(key=k, value=v)
    q = tmp_path / "q.int8.onnx"
    onnx.save(m, str(q))
    out = _invoke(["export", "int8", "--model", q, "--images", coco128 / "images", "--calib-images", 2,
                   "--out", tmp_path / "again.onnx"])
    assert "is already quantized" in out and not (tmp_path / "again.onnx").exists()


def test_labels_export_keeps_existing_files_and_the_store(tmp_path, coco128, coco128_gt):
    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import import_coco

    sub = {"images": coco128_gt["images"][:1], "categories": coco128_gt["categories"],
           "annotations": [a for a in coco128_gt["annotations"] if a["image_id"] == coco128_gt["images"][0]["id"]]}
    (tmp_path / "gt.json").write_text(json.dumps(sub))
    ls, _ = import_coco(LabelStore(tmp_path / "store"), str(tmp_path / "gt.json"), str(coco128 / "images"))
    manifest = ls.root / "manifest.json"
    before = manifest.read_bytes()
    out = _invoke(["labels", "export", "--store", tmp_path / "store", "--format", "coco", "--out", manifest])
    assert "is inside the label sets of" in out and manifest.read_bytes() == before
    mine = tmp_path / "mine.json"
    mine.write_text("precious")
    out = _invoke(["labels", "export", "--store", tmp_path / "store", "--format", "coco", "--out", mine])
    assert "exists and is not a Distillery export; pass --overwrite" in out and mine.read_text() == "precious"
    r = CliRunner().invoke(main, ["labels", "export", "--store", str(tmp_path / "store"), "--format", "coco",
                                  "--out", str(mine), "--overwrite"])
    assert r.exit_code == 0 and len(json.loads(mine.read_text())["annotations"]) == len(sub["annotations"]), r.output
    # rerunning the same export replaces its own earlier output without --overwrite
    r = CliRunner().invoke(main, ["labels", "export", "--store", str(tmp_path / "store"), "--format", "coco",
                                  "--out", str(mine)])
    assert r.exit_code == 0, r.output
    # a damaged manifest is named, with what to do
    shutil.copy(manifest, tmp_path / "backup.json")
    manifest.write_text(before.decode()[:50])
    out = _invoke(["labels", "info", "--store", tmp_path / "store"])
    assert f"{manifest} is damaged" in out and "restore it from a backup" in out
    manifest.write_text("[1, 2]")
    assert "is not a label-set manifest" in _invoke(["labels", "info", "--store", tmp_path / "store"])


def test_train_set_refuses_own_options_and_unknown_arguments(tmp_path):
    (tmp_path / "store" / "labelsets").mkdir(parents=True)
    base = ["train", "--store", tmp_path / "store", "--out", tmp_path / "run"]
    assert "epochs has its own option; use --epochs" in _invoke([*base, "--set", "epochs=3"])
    assert "'mosiac' is not an ultralytics train argument; did you mean mosaic?" in _invoke([*base, "--set", "mosiac=0"])
    assert not (tmp_path / "run").exists()


def test_finetune_segmenter_refuses_workers_it_would_ignore(tmp_path):
    (tmp_path / "store" / "labelsets").mkdir(parents=True)
    out = _invoke(["teachers", "finetune", "--teachers", "default", "--store", tmp_path / "store",
                   "--component", "segmenter", "--workers", 2, "--out", tmp_path / "ft"])
    assert "--workers applies to the detector" in out and not (tmp_path / "ft").exists()


def test_nan_is_refused_where_click_would_let_it_through(tmp_path, coco128):
    out = _invoke(["label", coco128 / "images", "--classes", "person", "--store", tmp_path / "s",
                   "--flush-seconds", "nan"])
    assert "'nan' is not a number" in out and not (tmp_path / "s").exists()
    (tmp_path / "store" / "labelsets").mkdir(parents=True)
    out = _invoke(["teachers", "finetune", "--teachers", "default", "--store", tmp_path / "store", "--lr", "inf",
                   "--out", tmp_path / "ft"])  # trained an adapter of NaNs, exit 0
    assert "'inf' is not a finite number" in out and not (tmp_path / "ft").exists()


def test_finetune_refuses_detector_options_for_sam_and_kinds_it_cannot_train(tmp_path):
    (tmp_path / "store" / "labelsets").mkdir(parents=True)
    base = ["teachers", "finetune", "--store", tmp_path / "store", "--out", tmp_path / "ft"]
    out = _invoke(base + ["--teachers", "default", "--component", "segmenter", "--method", "full", "--rank", 4])
    assert "--method, --rank apply to the detector" in out
    out = _invoke(base + ["--teachers", "default", "--component", "segmenter", "--method", "full"])
    assert "--method applies to the detector" in out
    owl = tmp_path / "owl.yaml"
    (tmp_path / "sam.pth").write_bytes(b"")  # only its existence is checked before the refusal
    owl.write_text("detector: {kind: owlv2, model: google/owlv2-base-patch16-ensemble}\n"
                   "segmenter: {model_type: vit_b, checkpoint: sam.pth}\n")
    out = _invoke(base + ["--teachers", owl])
    assert "fine-tuning covers detector kinds grounding-dino, mm-grounding-dino, not owlv2" in out
    assert not (tmp_path / "ft").exists()


def test_teachers_that_cannot_run_here_fail_before_any_label_set_or_run_folder(tmp_path, coco128, tiny_teachers):
    """A preset for a GPU on a machine without one, a SAM checkpoint that is not a state dict, a
    detector that cannot be loaded: one line naming the preset key, before a label set (label,
    teachers eval) or a run folder (teachers finetune) exists. They were tracebacks from torch,
    pickle and huggingface_hub, after an empty label set or sam-run.json was written."""
    import torch
    import yaml

    folder = tmp_path / "t"
    shutil.copytree(Path(tiny_teachers).parent, folder)
    good = yaml.safe_load((folder / "teachers.yaml").read_text())

    def preset(name, **edit):
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in good.items()}
        for key, value in edit.items():
            part, _, field = key.partition("__")
            if field:
                data[part][field] = value
            else:
                data[part] = value
        (folder / name).write_text(yaml.safe_dump(data))
        return folder / name

    store = tmp_path / "store"
    image = coco128 / "images" / "000000000009.jpg"
    label = ["label", image, "--classes", "person", "--store", store, "--runner", "local", "--teachers"]
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = preset("cuda.yaml", device=f"cuda:{n_gpus}")
    out = _invoke([*label, cuda])
    assert f"{cuda}: device cuda:{n_gpus}: torch sees " in out and "set device: auto" in out
    bad_ckpt = preset("ckpt.yaml", segmenter__checkpoint="teachers.yaml")
    out = _invoke([*label, bad_ckpt])
    assert (f"{bad_ckpt}: segmenter.checkpoint {folder / 'teachers.yaml'} is a YAML file, not a PyTorch state dict "
            "of SAM weights") in out
    assert not store.exists()

    (store / "labelsets").mkdir(parents=True)
    ft = ["teachers", "finetune", "--store", store, "--out", tmp_path / "ft", "--teachers"]
    out = _invoke([*ft, bad_ckpt, "--component", "segmenter"])
    assert "segmenter.checkpoint" in out and "not a PyTorch state dict" in out
    no_model = preset("nomodel.yaml", detector__model="nonexistent-model-dir")
    out = _invoke([*ft, no_model])
    assert f"{no_model}: detector.model 'nonexistent-model-dir' cannot be loaded" in out
    out = _invoke([*ft, cuda])
    assert f"device cuda:{n_gpus}: torch sees" in out
    assert not (tmp_path / "ft").exists()


def test_imgsz_must_be_a_multiple_of_the_stride(tmp_path):
    """ultralytics rounds --imgsz 33 up to 64 with a warning while args.yaml records 33."""
    (tmp_path / "store" / "labelsets").mkdir(parents=True)
    out = _invoke(["train", "--store", tmp_path / "store", "--imgsz", 33, "--out", tmp_path / "run"])
    assert "Invalid value for '--imgsz': 33 is not a multiple of 32 (the model's stride); ultralytics would run at 64 " \
           "instead" in out and not (tmp_path / "run").exists()
