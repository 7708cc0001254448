"""``distillery train`` and ``distillery eval`` (ultralytics and FiftyOne load only when they run)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from distillery.engine.cli_errors import UserError, fail_cleanly, install_hint
from distillery.engine.cli_types import (CocoJson, FloatRange, ImageFolder, ImageSize, Output, Store, StudentModel,
                                         TrainModel)


_errors = fail_cleanly


def _class_thresholds(values) -> dict:
    out = {}
    for v in values:
        name, sep, score = v.rpartition("=")
        try:
            out[name] = float(score)
        except ValueError:
            name = ""
        if not sep or not name:
            raise click.BadParameter(f"{v!r}: expected CLASS=SCORE, e.g. person=0.4", param_hint="--class-min-score")
    return out


#: ultralytics arguments that `train` sets from its own options (--set KEY=... is refused for them).
_OWN_OPTIONS = {"epochs": "epochs", "imgsz": "imgsz", "batch": "batch", "model": "model", "project": "out",
                "name": "out"}


@click.command("train")
@click.option("--store", required=True, type=Store(), help="Label store directory.")
@click.option("--labelset", default=None, metavar="NAME|ID",
              help="Label set name, id or unique id prefix (default: the store's only one).")
@click.option("--curation", "curation", type=click.IntRange(min=0), default=None,
              help="Curation version to apply (default: the latest; 0: none).")
@click.option("--model", default="yolov8n-seg.yaml", show_default=True, type=TrainModel(),
              help="ultralytics model YAML (from scratch) or a .pt checkpoint to start from.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--imgsz", type=ImageSize(), default=640, show_default=True)
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--out", required=True, type=Output(folder=True, example="runs/NAME"), help="Run directory, e.g. runs/NAME.")
@click.option("--min-score", type=FloatRange(0, 1), default=0.25, show_default=True,
              help="Undecided instances at or above this box score are targets.")
@click.option("--class-min-score", multiple=True, metavar="CLASS=SCORE", help="Per-class override (repeatable).")
@click.option("--ignore-min-score", type=FloatRange(0, 1), default=0.1, show_default=True,
              help="Undecided instances from this score up to the threshold become ignore regions.")
@click.option("--weight", type=click.Choice(["score", "sqrt", "none"]), default="score", show_default=True,
              help="Teacher confidence -> box/mask loss weight.")
@click.option("--classes", default=None, help="Comma-separated subset of the ontology to train on.")
@click.option("--val-fraction", type=FloatRange(0, 1), default=0.1, show_default=True,
              help="Images held out for validation (by image id).")
@click.option("--val-labelset", default=None, metavar="NAME|ID",
              help="Validate on this label set (name, id or id prefix) instead, e.g. GT from `labels import --name`.")
@click.option("--resume", is_flag=True, help="Continue OUT/weights/last.pt.")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other ultralytics train argument, e.g. --set mosaic=0 --set seed=1 --set device=0.")
@_errors
def train_cmd(store, labelset, curation, model, epochs, imgsz, batch, out, min_score, class_min_score, ignore_min_score,
              weight, classes, val_fraction, val_labelset, resume, extra):
    """Train a YOLOv8-seg student on the store's soft pseudo-labels.

    Example: distillery train --store store/ --model yolov8n-seg.yaml --epochs 100 --imgsz 640 --out runs/coco128
    """
    import yaml

    from distillery.student.data import Selection
    from distillery.student.train import train

    if resume:
        run = train(store, out, resume=True)
    else:
        kw = {}
        for e in extra:
            k, sep, v = e.partition("=")
            if not sep or not k:
                raise click.BadParameter(f"{e!r}: expected KEY=VALUE", param_hint="--set")
            if k in _OWN_OPTIONS:
                raise click.BadParameter(f"{e!r}: {k} has its own option; use --{_OWN_OPTIONS[k]}", param_hint="--set")
            from ultralytics.cfg import DEFAULT_CFG_DICT

            if k not in DEFAULT_CFG_DICT or k in ("data", "task", "mode", "resume"):
                import difflib

                near = difflib.get_close_matches(k, list(DEFAULT_CFG_DICT), n=3)
                raise click.BadParameter(f"{e!r}: {k!r} is not an ultralytics train argument"
                                         + (f"; did you mean {', '.join(near)}?" if near else ""), param_hint="--set")
            kw[k] = yaml.safe_load(v)
        sel = Selection(min_score=min_score, class_min_score=_class_thresholds(class_min_score),
                        ignore_min_score=ignore_min_score, weight=weight,
                        classes=tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None,
                        val_fraction=val_fraction, curation=curation)
        run = train(store, out, model=model, labelset=labelset, selection=sel, val_labelset=val_labelset,
                    epochs=epochs, imgsz=imgsz, batch=batch, **kw)
    click.echo(f"run: {run} (weights/best.pt, weights/last.pt, args.yaml, data.yaml, distillery.json)")


@click.command("eval")
@click.option("--model", "model_path", type=StudentModel(), default=None,
              help="Student checkpoint (.pt), its ONNX export, or its OpenVINO folder, to evaluate.")
@click.option("--images", "images_dir", type=ImageFolder(), default=None,
              help="With --model: folder of the GT images.")
@click.option("--store", type=Store(), default=None,
              help="Evaluate a label set itself (its pseudo-labels) instead of a model.")
@click.option("--labelset", default=None, metavar="NAME|ID",
              help="With --store: label set name, id or unique id prefix (default: the store's only one).")
@click.option("--gt", "gt_path", required=True, type=CocoJson(), help="COCO instances JSON.")
@click.option("--out", required=True, type=Output(folder=True, example="report/"), help="Report directory.")
@click.option("--imgsz", type=ImageSize(), default=640, show_default=True, help="With --model.")
@click.option("--conf", type=FloatRange(0, 1), default=0.001, show_default=True, help="With --model.")
@click.option("--device", default=None, help="With --model: cpu, 0, ...")
@_errors
def eval_cmd(model_path, images_dir, store, labelset, gt_path, out, imgsz, conf, device):
    """Box and mask mAP50-95 / mAP50 against COCO GT (pycocotools), per-class AP, PR curves.

    \b
    distillery eval --model runs/NAME/weights/best.pt --gt annotations.json --images DIR --out report/
    distillery eval --store store/ --labelset NAME|ID --gt annotations.json --out report/
    """
    from distillery.engine.images import list_source
    from distillery.engine.evaluation import evaluate, load_gt, predict_ultralytics, records_to_predictions, write_report

    if (model_path is None) == (store is None):
        raise click.UsageError("give exactly one of --model (a student) or --store (a label set)")
    gt = load_gt(gt_path)
    if model_path:
        if not images_dir:
            raise click.UsageError("--model needs --images (the folder of the GT images)")
        gt_names = {Path(im["file_name"]).name for im in gt["images"]}
        paths = [p for p in list_source(images_dir) if Path(p).name in gt_names]
        if not paths:
            raise click.UsageError(f"no image in {images_dir} is named in {gt_path}")
        if Path(model_path).is_dir():
            import importlib.util

            if importlib.util.find_spec("openvino") is None:  # ultralytics would try to pip-install it
                raise UserError(f"--model {model_path} is an OpenVINO model folder and the openvino "
                                f"package is not installed: {install_hint('openvino')}")
        from ultralytics import YOLO

        names = list(YOLO(model_path, task="segment").names.values())
        preds = predict_ultralytics(model_path, paths, imgsz=imgsz, conf=conf, device=device)
        report = evaluate(gt, preds, names, image_files=paths)
        title = f"{Path(model_path).name} on {Path(gt_path).name}"
    else:
        from distillery.engine.store import LabelStore

        ls = LabelStore(store).open(labelset)
        records = [r for r in ls.iter_records() if r.error is None]
        preds = records_to_predictions(records, ls.classes)
        report = evaluate(gt, preds, ls.classes, image_files=[r.path for r in records])
        title = f"label set {ls.id} on {Path(gt_path).name}"
    write_report(report, out, title)
    summary = {t: {k: round(report[t][k], 4) for k in ("mAP50-95", "mAP50")} for t in ("bbox", "segm") if t in report}
    click.echo(f"{title}: {report['images']} images; " + json.dumps(summary))
    if report["gt_classes_unknown_to_model"]:
        click.echo(f"GT classes the model does not know (not scored): {', '.join(report['gt_classes_unknown_to_model'])}")
    if report["model_classes_missing_in_gt"]:
        click.echo(f"model classes absent from the GT: {', '.join(report['model_classes_missing_in_gt'][:20])}")
    click.echo(f"report: {str(out).rstrip('/')}/ (report.json, per_class_ap.csv/.md, pr_curves.png, per_class_ap.png)")
