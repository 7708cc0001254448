"""``export check``: PyTorch, ONNX Runtime (CPU) FP32 and INT8, OpenVINO FP32 and INT8 on the
same images, through the same ultralytics predictor and post-processing (``AutoBackend``),
scored with COCOeval against GT (:mod:`distillery.engine.evaluation`), plus, for every model
against the FP32 ONNX (ONNX Runtime): mAP drop, agreement and speed-up.

Agreement: FP32 ONNX detections at a reference confidence become the "ground truth" and the
other model's detections are scored against them (box and mask mAP50). It measures what
quantization or another runtime changed, and stays meaningful for a weak student whose GT
mAP is near zero. The reference confidence is the highest of :data:`REF_CONFS` at which FP32
gives at least ``min_ref`` detections (reported).

Latency is ultralytics' own ``inference`` time per image (the runtime call, without pre- and
post-processing), averaged with the first image dropped; each model runs with its runtime's
default threads (ONNX Runtime: all cores; OpenVINO: ``PERFORMANCE_HINT: LATENCY``, as
ultralytics' ``OpenVINOBackend`` compiles it, so at OpenVINO's default inference precision:
bf16 on CPUs with AVX-512 BF16 / AMX, which the report states).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from distillery.engine.evaluation import evaluate, predict_ultralytics

REF_CONFS = (0.5, 0.25, 0.1, 0.05, 0.01, 0.001)

#: Models in report order: the key ``export_check`` takes, and the row label.
MODELS = {"pytorch": "PyTorch", "fp32": "ORT FP32", "int8": "ORT INT8", "openvino-fp32": "OV FP32",
          "openvino-int8": "OV INT8"}
#: Targets from the export issues: mask mAP50-95 drop and agreement (every model against the FP32
#: ONNX), speed-up over ONNX Runtime FP32 on the CPU (ORT INT8: issue 5; OpenVINO INT8: issue 12).
TARGETS = {"max_mask_map_drop_points": 1.0, "min_agreement_map50": 0.9,
           "min_speedup": {"int8": 1.5, "openvino-int8": 2.0}}


def missed_targets(name: str, vs: dict) -> list[str]:
    """The :data:`TARGETS` that model ``name`` misses against the FP32 ONNX, given its
    ``vs_fp32`` entry: any of ``"mask drop"`` (drop above the limit), ``"agreement"`` (mask
    mAP50 agreement below the floor; not judged without reference detections) and
    ``"speed-up"`` (only for the models :data:`TARGETS` gives a speed-up for)."""
    t, missed = TARGETS, []
    if vs["mask_map_drop_points"] > t["max_mask_map_drop_points"]:
        missed.append("mask drop")
    agree = vs["agreement"]["segm_map50"]
    if agree is not None and agree < t["min_agreement_map50"]:
        missed.append("agreement")
    floor = t["min_speedup"].get(name)
    if floor is not None and (vs["speedup"] is None or vs["speedup"] < floor):
        missed.append("speed-up")
    return missed


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
    """Score every model in ``models`` (keys of :data:`MODELS`: ``{"pytorch": best.pt, "fp32":
    x.onnx, "int8": x.int8.onnx, "openvino-fp32": x_openvino_model, "openvino-int8": ...}``, any
    subset) on ``image_paths``.

    Returns:
        ``{"models": {name: {"bbox": {...}, "segm": {...}, "latency_ms": mean inference ms
        (first image dropped), "path"}}, "vs_fp32": {name: {"mask_map_drop_points",
        "box_map_drop_points", "speedup", "agreement": {"bbox_map50", "segm_map50"}}} for every
        model but ``fp32`` and ``pytorch`` (only with ``fp32``), "reference": {"conf",
        "detections"}, "targets", "images", "imgsz"}``. Drops are in points (100 x mAP50-95);
        ``speedup`` is FP32 latency / the model's; agreement is None without reference detections.
        With an OpenVINO model, ``"openvino_inference_precision"``: what OpenVINO computed in
        (:func:`distillery.export.openvino.cpu_inference_precision`).
    """
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; use {list(MODELS)}")
    report: dict = {"images": len(image_paths), "imgsz": imgsz, "models": {}, "targets": TARGETS}
    if any(k.startswith("openvino") for k in models):
        from distillery.export.openvino import cpu_inference_precision

        report["openvino_inference_precision"] = cpu_inference_precision()
    preds = {}
    for name in [k for k in MODELS if k in models]:
        path = models[name]
        timings: list = []
        preds[name] = predict_ultralytics(path, image_paths, imgsz=imgsz, timings=timings)
        rep = evaluate(gt, preds[name], class_names, image_files=image_paths, quiet=True)  # the table has the numbers
        lat = [t["inference"] for t in timings[1:]] or [t["inference"] for t in timings]
        report["models"][name] = {"path": str(path), "latency_ms": statistics.mean(lat),
                                  **{t: {k: rep[t][k] for k in ("mAP50-95", "mAP50", "mAP75")} for t in ("bbox", "segm")}}
    others = [k for k in preds if k not in ("fp32", "pytorch")]
    if "fp32" not in preds or not others:
        return report
    ref_conf = next((c for c in REF_CONFS if sum(p["score"] >= c for p in preds["fp32"]) >= min_ref), REF_CONFS[-1])
    ref = [p for p in preds["fp32"] if p["score"] >= ref_conf]
    report["reference"] = {"conf": ref_conf, "detections": len(ref)}
    ref_gt = predictions_to_gt(ref, gt, class_names) if ref else None
    f = report["models"]["fp32"]
    report["vs_fp32"] = {}
    for name in others:
        m = report["models"][name]
        agreement = {"bbox_map50": None, "segm_map50": None}
        if ref_gt is not None:
            a = evaluate(ref_gt, preds[name], class_names, image_files=image_paths, quiet=True)
            agreement = {"bbox_map50": a["bbox"]["mAP50"], "segm_map50": a["segm"]["mAP50"]}
        report["vs_fp32"][name] = {
            "mask_map_drop_points": 100 * (f["segm"]["mAP50-95"] - m["segm"]["mAP50-95"]),
            "box_map_drop_points": 100 * (f["bbox"]["mAP50-95"] - m["bbox"]["mAP50-95"]),
            "speedup": f["latency_ms"] / m["latency_ms"] if m["latency_ms"] else None,
            "agreement": agreement,
        }
        report["vs_fp32"][name]["missed_targets"] = missed_targets(name, report["vs_fp32"][name])
    return report


def _score(v: float, width: int) -> str:
    """A mAP right-aligned in ``width``; COCOeval's -1 (no GT of the scored classes in these
    images: nothing to score) as ``n/a``, not as a number."""
    return f"{'n/a':>{width}}" if v < 0 else f"{v:{width}.4f}"


def format_report(r: dict) -> str:
    """The report as a table: one row per model, GT mAP, latency, and against the FP32 ONNX the
    mask mAP drop, agreement (mask mAP50) and speed-up, then the targets."""
    vs = r.get("vs_fp32", {})
    lines = [f"{r['images']} images at imgsz {r['imgsz']}",
             f"{'model':10}{'box mAP50-95':>14}{'mask mAP50-95':>15}{'mask mAP50':>12}{'ms/img':>9}"
             + (f"{'mask drop':>11}{'agree box/mask':>16}{'speed-up':>10}  targets" if vs else "")]
    for name, m in r["models"].items():
        row = (f"{MODELS[name]:10}{_score(m['bbox']['mAP50-95'], 14)}{_score(m['segm']['mAP50-95'], 15)}"
               f"{_score(m['segm']['mAP50'], 12)}{m['latency_ms']:9.1f}")
        if name in vs:
            d, a = vs[name], vs[name]["agreement"]
            agree = f"{a['bbox_map50']:.3f}/{a['segm_map50']:.3f}" if a["bbox_map50"] is not None else "n/a"
            missed = d.get("missed_targets", [])
            row += (f"{d['mask_map_drop_points']:10.2f}p{agree:>16}{d['speedup']:9.2f}x  "
                    + ("missed: " + ", ".join(missed) if missed else "met"))
        elif name == "fp32" and vs:
            row += f"{'(reference)':>13}"
        lines.append(row)
    if r.get("openvino_inference_precision", "f32") != "f32":
        lines.append(f"OV rows: OpenVINO computed floating-point layers in {r['openvino_inference_precision']} on this CPU "
                     "(its default INFERENCE_PRECISION_HINT here, which ultralytics keeps): a model's float weights do not "
                     "mean FP32 arithmetic")
    if vs:
        t = TARGETS
        speed = [f"{MODELS[k]} >= {v}x" for k, v in t["min_speedup"].items() if k in r["models"]]  # rows shown
        lines.append(f"against ORT FP32 (agreement: scored against its {r['reference']['detections']} detections at conf "
                     f">= {r['reference']['conf']}); targets: mask drop <= {t['max_mask_map_drop_points']} points, "
                     f"agreement >= {t['min_agreement_map50']}" + (", speed-up " + ", ".join(speed) if speed else ""))
    return "\n".join(lines)


def image_list(images_dir: str | Path, gt: dict, limit: int | None = None) -> list[str]:
    """The GT's images found in ``images_dir`` (by file name), in GT order."""
    d = Path(images_dir)
    paths = [str(d / Path(im["file_name"]).name) for im in gt["images"] if (d / Path(im["file_name"]).name).is_file()]
    return paths[:limit] if limit else paths
