"""``export check``: PyTorch, FP32 ONNX and INT8 ONNX (ONNX Runtime, CPU) on the same images,
through the same ultralytics predictor and post-processing (``AutoBackend``), scored with
COCOeval against GT (:mod:`distillery.engine.evaluation`), plus the agreement of INT8 with FP32 and the
latency of each.

Agreement: FP32 detections at a reference confidence become the "ground truth" and the
INT8 detections are scored against them (box and mask mAP50). It measures what
quantization changed, and stays meaningful for a weak student whose GT mAP is near zero.
The reference confidence is the highest of :data:`REF_CONFS` at which FP32 gives at least
``min_ref`` detections (reported).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from distillery.engine.evaluation import evaluate, predict_ultralytics

REF_CONFS = (0.5, 0.25, 0.1, 0.05, 0.01, 0.001)

#: Targets from the export issue: INT8 mask mAP50-95 drop, agreement, CPU speed-up.
TARGETS = {"max_mask_map_drop_points": 1.0, "min_agreement_map50": 0.9, "min_speedup": 1.5}


def predictions_to_gt(preds: list[dict], gt: dict, class_names: list[str]) -> dict:
    """Neutral predictions -> a COCO GT dict on ``gt``'s images (same ids and sizes; matched by
    file basename) with categories 1..C named ``class_names``."""
    import os

    from pycocotools import mask as mask_utils

    images = [dict(im, file_name=os.path.basename(im["file_name"])) for im in gt["images"]]
    img_id = {im["file_name"]: im["id"] for im in images}
    cat_id = {n: j + 1 for j, n in enumerate(class_names)}
    anns = []
    for p in preds:
        seg = dict(p["segmentation"])
        if isinstance(seg["counts"], str):
            seg["counts"] = seg["counts"].encode()
        anns.append({"id": len(anns) + 1, "image_id": img_id[os.path.basename(p["file_name"])],
                     "category_id": cat_id[p["class_name"]], "bbox": p["bbox"], "iscrowd": 0,
                     "area": float(mask_utils.area(seg)),
                     "segmentation": {"size": list(seg["size"]), "counts": seg["counts"].decode()}})
    return {"images": images, "annotations": anns,
            "categories": [{"id": j, "name": n} for n, j in cat_id.items()]}


def export_check(models: dict, gt: dict, image_paths: list[str], imgsz: int, class_names: list[str],
                 min_ref: int = 30) -> dict:
    """Score every model in ``models`` (``{"pytorch": best.pt, "fp32": x.onnx, "int8": x.int8.onnx}``,
    any subset) on ``image_paths``.

    Returns:
        ``{"models": {name: {"bbox": {...}, "segm": {...}, "latency_ms": mean inference ms
        (first image dropped), "path"}}, "agreement": {"reference_conf", "reference_detections",
        "bbox_map50", "segm_map50"}, "int8_vs_fp32": {"mask_map_drop_points",
        "box_map_drop_points", "speedup"}, "targets", "images", "imgsz"}``.
    """
    report: dict = {"images": len(image_paths), "imgsz": imgsz, "models": {}, "targets": TARGETS}
    preds = {}
    for name, path in models.items():
        timings: list = []
        preds[name] = predict_ultralytics(path, image_paths, imgsz=imgsz, timings=timings)
        rep = evaluate(gt, preds[name], class_names, image_files=image_paths)
        lat = [t["inference"] for t in timings[1:]] or [t["inference"] for t in timings]
        report["models"][name] = {"path": str(path), "latency_ms": statistics.mean(lat),
                                  **{t: {k: rep[t][k] for k in ("mAP50-95", "mAP50", "mAP75")} for t in ("bbox", "segm")}}
    if "fp32" in preds and "int8" in preds:
        ref_conf = next((c for c in REF_CONFS if sum(p["score"] >= c for p in preds["fp32"]) >= min_ref), REF_CONFS[-1])
        ref = [p for p in preds["fp32"] if p["score"] >= ref_conf]
        if ref:
            agree = evaluate(predictions_to_gt(ref, gt, class_names), preds["int8"], class_names,
                             image_files=image_paths)
            report["agreement"] = {"reference_conf": ref_conf, "reference_detections": len(ref),
                                   "bbox_map50": agree["bbox"]["mAP50"], "segm_map50": agree["segm"]["mAP50"]}
        else:
            report["agreement"] = {"reference_conf": ref_conf, "reference_detections": 0,
                                   "bbox_map50": None, "segm_map50": None}
        f, i = report["models"]["fp32"], report["models"]["int8"]
        report["int8_vs_fp32"] = {
            "mask_map_drop_points": 100 * (f["segm"]["mAP50-95"] - i["segm"]["mAP50-95"]),
            "box_map_drop_points": 100 * (f["bbox"]["mAP50-95"] - i["bbox"]["mAP50-95"]),
            "speedup": f["latency_ms"] / i["latency_ms"] if i["latency_ms"] else None,
        }
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['images']} images at imgsz {r['imgsz']}",
             f"{'model':10}{'box mAP50-95':>14}{'box mAP50':>11}{'mask mAP50-95':>15}{'mask mAP50':>12}{'ms/img':>9}"]
    for name, m in r["models"].items():
        lines.append(f"{name:10}{m['bbox']['mAP50-95']:14.4f}{m['bbox']['mAP50']:11.4f}{m['segm']['mAP50-95']:15.4f}"
                     f"{m['segm']['mAP50']:12.4f}{m['latency_ms']:9.1f}")
    if "int8_vs_fp32" in r:
        d, a = r["int8_vs_fp32"], r["agreement"]
        lines.append(f"INT8 vs FP32: mask mAP50-95 drop {d['mask_map_drop_points']:.2f} points (target <= "
                     f"{TARGETS['max_mask_map_drop_points']}), box drop {d['box_map_drop_points']:.2f}, "
                     f"speed-up {d['speedup']:.2f}x (target >= {TARGETS['min_speedup']})")
        if a["bbox_map50"] is not None:
            lines.append(f"agreement (INT8 scored against FP32 detections at conf >= {a['reference_conf']}, "
                         f"{a['reference_detections']} detections): box mAP50 {a['bbox_map50']:.3f}, mask mAP50 "
                         f"{a['segm_map50']:.3f} (target >= {TARGETS['min_agreement_map50']})")
    return "\n".join(lines)


def image_list(images_dir: str | Path, gt: dict, limit: int | None = None) -> list[str]:
    """The GT's images found in ``images_dir`` (by file name), in GT order."""
    d = Path(images_dir)
    paths = [str(d / Path(im["file_name"]).name) for im in gt["images"] if (d / Path(im["file_name"]).name).is_file()]
    return paths[:limit] if limit else paths
