"""ONNX Runtime FP32 / INT8 and OpenVINO FP32 / INT8 on the CPU, side by side in one run:
latency ratios, mAP drop and agreement.

    python bench/export_latency.py --model runs/person16/weights/best.pt        # a trained student
    python bench/export_latency.py                                              # trains the 16-photo person student first (slow)
    python bench/export_latency.py --model best.pt --threads 1                  # single-threaded runtimes

1. Exports the student to ONNX at ``--imgsz`` (default 640), quantizes it for ONNX Runtime
   (:mod:`distillery.export.int8`, head FP32) and writes the OpenVINO FP32 and INT8 folders
   (:mod:`distillery.export.openvino`, NNCF): the same ``--calib`` coco128 calibration photos and
   preprocessing for both INT8 models.
2. Latency: every runtime on the same preprocessed photos, one round of all of them after
   another (``--rounds`` rounds after a warm-up, so load on a shared machine hits them alike);
   prints the medians and each ratio to ONNX Runtime FP32 (targets: ORT INT8 >= 1.5x, OpenVINO
   INT8 >= 2x). ``--threads`` sets ONNX Runtime's intra-op threads and OpenVINO's
   ``INFERENCE_NUM_THREADS`` alike (0: each runtime's default); OpenVINO compiles with
   ``PERFORMANCE_HINT: LATENCY`` as ultralytics' backend does.
3. ``export check`` on the 16 coco128 photos with a person (GT filtered to ``person``): mAP of
   every model, and against ONNX Runtime FP32 the mask mAP drop, agreement and speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COCO128 = Path(os.environ.get("DISTILLERY_COCO128", ROOT.parent / "shared" / "data" / "coco128"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="student .pt (default: train the person-16 student)")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--calib", type=int, default=64, help="calibration photos from coco128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--threads", type=int, default=0, help="threads of every runtime (0: each one's default, all cores)")
    ap.add_argument("--ov-head", default="outputs", choices=["fp32", "outputs", "int8"], help="OpenVINO INT8 --head")
    ap.add_argument("--ov-preset", default="mixed", choices=["mixed", "performance"], help="OpenVINO INT8 NNCF preset")
    ap.add_argument("--skip-check", action="store_true", help="latency only, no export check")
    args = ap.parse_args()

    import onnxruntime as ort
    import openvino as ov

    from distillery.engine.evaluation import load_gt
    from distillery.export.check import export_check, format_report
    from distillery.export.int8 import calibration_images, quantize
    from distillery.export.onnx import export_onnx, preprocess
    from distillery.export.openvino import export_openvino, openvino_folder

    work = Path(tempfile.mkdtemp(prefix="export-latency-"))
    from student_vs_stock import person_subset  # bench/ is on sys.path (script dir); the same 16 photos

    gt_path = person_subset(16, work)
    model = args.model
    if model is None:
        from distillery.engine.store import LabelStore
        from distillery.labeling.coco import import_coco
        from distillery.student.data import Selection
        from distillery.student.train import train

        ls, _ = import_coco(LabelStore(work / "store"), str(gt_path), str(COCO128 / "images"))
        run = train(work / "store", work / "run", selection=Selection(val_fraction=0.0), val_labelset=ls.id,
                    epochs=150, imgsz=320, batch=16, mosaic=0.0, seed=0, deterministic=True, plots=False, workers=2,
                    patience=150)
        model = run / "weights" / "best.pt"

    fp32 = export_onnx(model, work / "student.onnx", imgsz=args.imgsz)
    calib = calibration_images(folder=str(COCO128 / "images"), n=args.calib)
    t = time.perf_counter()
    r = quantize(fp32, work / "student.int8.onnx", calib, method=args.method)
    print(f"ORT INT8: quantized ({args.method}, {args.calib} calibration photos) in {time.perf_counter() - t:.0f} s")
    ov_fp32 = export_openvino(fp32, work / "student_openvino_model")["path"]
    t = time.perf_counter()
    ov_int8 = export_openvino(fp32, work / "student_int8_openvino_model", precision="int8", images=calib,
                              head=args.ov_head, preset=args.ov_preset)
    print(f"OV INT8: quantized (NNCF {args.ov_preset}, head {args.ov_head}, {args.calib} calibration photos) in "
          f"{time.perf_counter() - t:.0f} s; {ov_int8['ir']['FakeQuantize']} FakeQuantize")

    photos = [str(p) for p in sorted((COCO128 / "images").glob("*.jpg"))[:16]]
    xs = [preprocess(p, args.imgsz) for p in photos]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": args.threads} if args.threads else {})}
    ov_models = {k: core.compile_model(core.read_model(str(openvino_folder(p))), "CPU", config)
                 for k, p in (("OV FP32", ov_fp32), ("OV INT8", ov_int8["path"]))}
    runs = {k: (lambda s: lambda x: s.run(None, {"images": x}))(ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]))
            for k, p in (("ORT FP32", fp32), ("ORT INT8", r["cpu"]), ("ORT INT8 TRT-flavour", r["tensorrt"]))}
    runs.update({k: (lambda c: lambda x: c(x))(c) for k, c in ov_models.items()})
    for run in runs.values():  # warm-up
        run(xs[0])
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, run in runs.items():
            t = time.perf_counter()
            for x in xs:
                run(x)
            times[k].append((time.perf_counter() - t) / len(xs) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    print(f"\nCPU, imgsz {args.imgsz}, {len(xs)} photos x {args.rounds} rounds, {args.threads or 'default'} threads "
          f"(median ms/img; ONNX Runtime {ort.__version__}, OpenVINO {ov.__version__} CPU inference precision {precision})")
    print(f"  {'runtime':22}{'ms/img':>9}{'vs ORT FP32':>13}")
    for k, v in med.items():
        print(f"  {k:22}{v:9.1f}{med['ORT FP32'] / v:12.2f}x")
    print(f"speed-up over ORT FP32: ORT INT8 {med['ORT FP32'] / med['ORT INT8']:.2f}x (target >= 1.5), "
          f"OV FP32 {med['ORT FP32'] / med['OV FP32']:.2f}x, OV INT8 {med['ORT FP32'] / med['OV INT8']:.2f}x (target >= 2)")

    if args.skip_check:
        return
    gt = load_gt(gt_path)
    paths = [str(COCO128 / "images" / im["file_name"]) for im in gt["images"]]
    rep = export_check({"pytorch": model, "fp32": fp32, "int8": r["cpu"], "openvino-fp32": ov_fp32,
                        "openvino-int8": ov_int8["path"]}, gt, paths, args.imgsz, ["person"])
    print("\n" + format_report(rep))
    (work / "export_check.json").write_text(json.dumps(rep, indent=2))
    print(f"(work dir {work})")


if __name__ == "__main__":
    main()
