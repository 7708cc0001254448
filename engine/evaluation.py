"""Evaluation against COCO ground truth with ``pycocotools`` ``COCOeval``: box and mask
mAP50-95 and mAP50, per-class AP, precision-recall curves, for a student checkpoint (PyTorch
or an exported ONNX, through ultralytics' predictor) or for a label set itself (how good are
the pseudo-labels). Shared by the student (``distillery eval``) and export (``export check``).

Predictions are first put in one neutral form -- ``{"file_name", "class_name", "score",
"bbox" (xywh px), "segmentation" (COCO RLE over the full image)}`` -- then mapped to the GT:
images by file basename, classes by exact name (no fuzzy matching). AP is averaged over the
GT categories whose names the predictor knows; GT categories it does not know and
predicted classes the GT lacks are listed in the report, not silently scored as zero.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from pycocotools import mask as mask_utils

from distillery.engine.cocofile import CocoError, for_pycocotools, validate_instances
from distillery.engine.record import LabelRecord

IOU_TYPES = ("bbox", "segm")


class EvalError(ValueError):
    """GT or predictions cannot be evaluated together (nothing in common, bad file)."""


def records_to_predictions(records: Iterable[LabelRecord], classes: list[str], min_score: float = 0.0) -> list[dict]:
    """Label records -> neutral predictions (class = argmax soft score, score = box_score)."""
    out = []
    for rec in records:
        if rec.error is not None:
            continue
        for k in range(rec.num_instances):
            if rec.box_score[k] < min_score:
                continue
            x1, y1, x2, y2 = (float(v) for v in rec.boxes[k])
            m = rec.masks[k]
            out.append({"file_name": rec.path, "class_name": classes[int(rec.scores[k].argmax())],
                        "score": float(rec.box_score[k]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "segmentation": {"size": list(m["size"]), "counts": m["counts"]}})
    return out


def predict_ultralytics(model_path: str | Path, image_paths: list[str], imgsz: int = 640, conf: float = 0.001,
                        iou: float = 0.7, max_det: int = 100, device: str | None = None,
                        timings: list | None = None) -> list[dict]:
    """Run an ultralytics segmentation model (``.pt``, or an exported ``.onnx`` run by ONNX
    Runtime through ultralytics' ``AutoBackend``) on ``image_paths`` -> neutral predictions.

    Masks are predicted at full image resolution (``retina_masks=True``) so they compare with
    the GT's pixels; ``conf`` is low (COCO practice) so the PR curve is complete. ``timings``,
    if given, receives each image's ultralytics ``speed`` dict (ms: preprocess, inference,
    postprocess).
    """
    from ultralytics import YOLO

    model = YOLO(str(model_path), task="segment")
    out = []
    for r in model.predict(source=list(image_paths), imgsz=imgsz, conf=conf, iou=iou, max_det=max_det,
                           retina_masks=True, stream=True, verbose=False, device=device):
        if timings is not None:
            timings.append(dict(r.speed))
        if r.boxes is None or not len(r.boxes):
            continue
        xyxy = r.boxes.xyxy.cpu().numpy()
        scores = r.boxes.conf.cpu().numpy()
        cls = r.boxes.cls.cpu().numpy().astype(int)
        masks = r.masks.data.cpu().numpy().astype(np.uint8) if r.masks is not None else None
        for k in range(len(xyxy)):
            x1, y1, x2, y2 = (float(v) for v in xyxy[k])
            p = {"file_name": r.path, "class_name": r.names[int(cls[k])], "score": float(scores[k]),
                 "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if masks is not None:
                p["segmentation"] = mask_utils.encode(np.asfortranarray(masks[k]))
            out.append(p)
    return out


def load_gt(path: str | Path) -> dict:
    """A COCO instances JSON, checked as :func:`distillery.engine.cocofile.validate_instances`
    checks it (the rules ``labels import`` applies).

    Raises:
        EvalError: naming the file, and the offending entry, if it is not a usable instances file.
    """
    p = Path(path)
    try:
        gt = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"GT file {p}: cannot be read as JSON ({e})") from e
    if not isinstance(gt, dict) or not all(k in gt for k in ("images", "annotations", "categories")):
        raise EvalError(f"GT file {p}: not a COCO instances file (needs images, annotations, categories)")
    try:
        validate_instances(gt)
    except CocoError as e:
        raise EvalError(f"GT file {p}: {e}") from None
    return gt


def check_sizes(gt_by_base: dict, image_files: list[str], predictions: list[dict]) -> None:
    """Every predicted image must have the GT's size, else COCOeval silently scores it zero
    (masks and boxes live in another frame).

    Args:
        gt_by_base: GT image entries by file basename.
        image_files: predicted images; those that exist are measured (EXIF-corrected
            (width, height), :func:`distillery.engine.images.exif_size`).
        predictions: neutral predictions; a mask's RLE ``size`` ([height, width]) is compared too.

    Raises:
        EvalError: naming the image and both sizes.
    """
    from distillery.engine.images import exif_size

    def refuse(name: str, w: int, h: int, what: str, im: dict):
        raise EvalError(f"{name}: {what} is {w}x{h} (width x height, EXIF orientation applied) but the GT's "
                        f"{im['file_name']} is {im['width']}x{im['height']}; fix the GT's width/height or give the "
                        "images it was made from")

    for f in image_files:
        im = gt_by_base.get(os.path.basename(f))
        if im is None or not os.path.isfile(f):
            continue
        try:
            w, h = exif_size(f)
        except OSError:
            continue  # an unreadable image has no predictions to misplace
        if (w, h) != (im["width"], im["height"]):
            refuse(f, w, h, "the image", im)
    for p in predictions:
        im = gt_by_base.get(os.path.basename(p["file_name"]))
        size = (p.get("segmentation") or {}).get("size")
        if im is not None and size is not None and list(size) != [im["height"], im["width"]]:
            refuse(p["file_name"], size[1], size[0], "a predicted mask", im)


def evaluate(gt: dict, predictions: list[dict], class_names: list[str], image_files: list[str] | None = None,
             iou_types=IOU_TYPES, quiet: bool = False) -> dict:
    """COCOeval of neutral ``predictions`` against ``gt``.

    The GT goes through :func:`distillery.engine.cocofile.for_pycocotools` first: images,
    categories and annotations are renumbered 1..N (pycocotools miscounts GT annotation id 0
    and duplicated ids, and fails on string or mixed ids), boxes are clipped to the frame,
    polygons clipped and rasterised exactly as ``labels import`` does. Any valid GT file
    scored against its own imported label set gives 1.0.

    Args:
        gt: COCO instances dict (ids of any form :func:`~distillery.engine.cocofile.validate_instances`
            accepts; non-contiguous category ids are fine).
        predictions: neutral predictions (module docstring).
        class_names: every class the predictor can output (for the class mapping report).
        image_files: the images that were predicted (paths or basenames); None: the GT
            images that have a prediction or are named by predictions.
        iou_types: ``bbox`` and/or ``segm``.
        quiet: keep pycocotools' printed loading lines and summaries off stdout (for callers
            that print their own table of the report's numbers).

    Returns:
        report dict: ``images``, ``categories_evaluated``, ``gt_classes_unknown_to_model``,
        ``model_classes_missing_in_gt``, ``gt_unmatchable`` (GT instances with no box area or
        no mask pixel in their image: misses for any model, listed by position and id), per IoU type ``{"mAP50-95", "mAP50", "mAP75",
        "stats" (COCOeval's 12), "per_class" {name: {"AP50-95", "AP50", "gt_instances"}},
        "pr": {"recall", "precision@50", "precision@50-95"}}``.

    Raises:
        EvalError: the GT is malformed (naming the entry), two GT images share a file name,
            no GT image matches a predicted image, no class names are shared, or an image's
            size differs from the GT's ``width`` x ``height`` (:func:`check_sizes`).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    try:
        validate_instances(gt)
    except CocoError as e:
        raise EvalError(f"GT: {e}") from None
    gt_by_base = {}
    for im in gt["images"]:
        base = os.path.basename(im["file_name"])
        if base in gt_by_base:
            raise EvalError(f"GT images {gt_by_base[base]['file_name']!r} and {im['file_name']!r} share the file name "
                            f"{base!r}: predictions are matched to GT images by file name, so give them unique names")
        gt_by_base[base] = im
    if image_files is None:
        image_files = sorted({p["file_name"] for p in predictions})
    wanted = {os.path.basename(f) for f in image_files}
    src_img_ids = [im["id"] for im in gt["images"] if os.path.basename(im["file_name"]) in wanted]
    if not src_img_ids:
        raise EvalError("no predicted image matches a GT image by file name; check --images / the label set's paths")
    check_sizes(gt_by_base, image_files, predictions)
    try:
        prepared = for_pycocotools(gt, image_ids=src_img_ids)
    except CocoError as e:
        raise EvalError(f"GT: {e}") from None
    ds, img_map = prepared.dataset, prepared.image_map
    img_ids = sorted(img_map.values())
    cat_by_name = {c["name"]: c["id"] for c in ds["categories"]}
    shared = [n for n in class_names if n in cat_by_name]
    if not shared:
        raise EvalError(f"the model's classes ({', '.join(class_names[:10])}...) share no name with the GT categories")
    cat_ids = [cat_by_name[n] for n in shared]
    results = []
    for p in predictions:
        im = gt_by_base.get(os.path.basename(p["file_name"]))
        if im is None or im["id"] not in img_map or p["class_name"] not in cat_by_name:
            continue
        r = {"image_id": img_map[im["id"]], "category_id": cat_by_name[p["class_name"]], "score": p["score"],
             "bbox": p["bbox"]}
        if "segmentation" in p:
            seg = dict(p["segmentation"])
            seg["counts"] = seg["counts"].decode("ascii") if isinstance(seg["counts"], bytes) else seg["counts"]
            r["segmentation"] = seg
        results.append(r)
    gt_present = {a["category_id"] for a in ds["annotations"]}
    report = {
        "images": len(img_ids),
        "predictions": len(results),
        "categories_evaluated": shared,
        "gt_classes_unknown_to_model": sorted(c["name"] for c in ds["categories"]
                                              if c["name"] not in class_names and c["id"] in gt_present),
        "model_classes_missing_in_gt": sorted(n for n in class_names if n not in cat_by_name),
        "gt_unmatchable": prepared.unmatchable,
    }
    hush = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()  # both reusable
    coco_gt = COCO()
    coco_gt.dataset = ds  # a fresh copy: COCOeval rewrites GT segmentations in place
    with hush:
        coco_gt.createIndex()
    for iou_type in iou_types:
        res = [dict(r) for r in results if iou_type == "bbox" or "segmentation" in r]
        if iou_type == "bbox":
            for r in res:
                r.pop("segmentation", None)  # loadRes would otherwise take boxes from the masks
        if not res:
            report[iou_type] = {"mAP50-95": 0.0, "mAP50": 0.0, "mAP75": 0.0, "stats": [], "per_class": {}, "pr": {}}
            continue
        with hush:
            ev = COCOeval(coco_gt, coco_gt.loadRes(res), iou_type)
            ev.params.imgIds, ev.params.catIds = img_ids, cat_ids
            ev.evaluate(), ev.accumulate(), ev.summarize()
        prec = ev.eval["precision"]  # [T=10 IoUs, R=101 recalls, K cats, A=4 areas, M=3 maxDets]
        per_class = {}
        for k, name in enumerate(shared):
            pk = prec[:, :, k, 0, -1]
            n_gt = sum(1 for a in ds["annotations"] if a["category_id"] == cat_ids[k] and not a.get("iscrowd", 0))
            per_class[name] = {
                "AP50-95": float(pk[pk > -1].mean()) if (pk > -1).any() else None,
                "AP50": float(pk[0][pk[0] > -1].mean()) if (pk[0] > -1).any() else None,
                "gt_instances": n_gt,
            }

        def curve(p):
            p = np.where(p > -1, p, np.nan)
            return [None if np.isnan(v) else float(v) for v in np.nanmean(p, axis=-1)] if p.size else []

        with np.errstate(all="ignore"), _quiet_nan():
            report[iou_type] = {
                "mAP50-95": float(ev.stats[0]), "mAP50": float(ev.stats[1]), "mAP75": float(ev.stats[2]),
                "stats": [float(s) for s in ev.stats], "per_class": per_class,
                "pr": {"recall": ev.params.recThrs.tolist(),
                       "precision@50": curve(prec[0, :, :, 0, -1]),
                       "precision@50-95": curve(prec[:, :, :, 0, -1].mean(0))},
            }
    return report


class _quiet_nan:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def write_report(report: dict, out: str | Path, title: str) -> Path:
    """``report.json``, ``per_class_ap.csv``, ``per_class_ap.md``, ``pr_curves.png``,
    ``per_class_ap.png`` into ``out`` (created)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"eval output {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    report = {"title": title, **report}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    types = [t for t in IOU_TYPES if t in report]
    names = report["categories_evaluated"]
    rows = [[n] + [_fmt(report[t]["per_class"].get(n, {}).get(k)) for t in types for k in ("AP50-95", "AP50")]
            + [report[types[0]]["per_class"].get(n, {}).get("gt_instances", 0)] for n in names]
    header = ["class"] + [f"{t} {k}" for t in types for k in ("AP50-95", "AP50")] + ["GT instances"]
    with open(out / "per_class_ap.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    md = [f"# {title}", "", " | ".join(["all"] + [_fmt(report[t][k]) for t in types for k in ("mAP50-95", "mAP50")]
                                       + [str(report["images"]) + " images"]), "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    (out / "per_class_ap.md").write_text("\n".join(md) + "\n")

    fig, axes = plt.subplots(1, len(types), figsize=(6 * len(types), 4.5), squeeze=False)
    for ax, t in zip(axes[0], types):
        pr = report[t]["pr"]
        if pr:
            for key, style in (("precision@50", "-"), ("precision@50-95", "--")):
                y = np.array([np.nan if v is None else v for v in pr[key]])
                ax.plot(pr["recall"], y, style, label=f"{key.split('@')[1]} (mAP {_fmt(report[t]['mAP' + key.split('@')[1]])})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
               title=f"{'box' if t == 'bbox' else 'mask'} precision-recall, mean over classes")
        if pr:  # nothing plotted (no class with GT and predictions): no legend, and no matplotlib warning
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "pr_curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.3 * len(names) + 1.2)))
    y = np.arange(len(names))
    hgt = 0.8 / max(1, len(types))
    for i, t in enumerate(types):
        vals = [report[t]["per_class"].get(n, {}).get("AP50-95") or 0.0 for n in names]
        ax.barh(y + i * hgt, vals, height=hgt, label=f"{'box' if t == 'bbox' else 'mask'} AP50-95")
    ax.set_yticks(y + hgt * (len(types) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"per-class AP50-95 - {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "per_class_ap.png", dpi=100)
    plt.close(fig)
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
