"""FP32 vs INT8 ONNX Runtime (CPU) latency, same run, and the INT8 accuracy check.

    python bench/export_latency.py --model runs/person16/weights/best.pt        # a trained student
    python bench/export_latency.py                                              # trains the 16-photo person student first (slow)

1. Exports the student to ONNX at ``--imgsz`` (default 640) and quantizes it
   (:mod:`distillery.export.int8`, calibration on coco128 photos, head FP32).
2. Latency: both ONNX Runtime sessions on the same preprocessed photos, alternating
   FP32 / INT8 per round, ``--rounds`` rounds after a warm-up; prints the medians and the
   ratio FP32 / INT8 (target >= 1.5 at 640).
3. ``export check`` on the 16 coco128 photos with a person (GT filtered to ``person``): mAP of
   PyTorch, FP32, INT8, the INT8 drop and the agreement of INT8 with FP32.
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
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default, all cores)")
    ap.add_argument("--skip-check", action="store_true", help="latency only, no export check")
    args = ap.parse_args()

    import onnxruntime as ort

    from distillery.engine.evaluation import load_gt
    from distillery.export.check import export_check, format_report
    from distillery.export.int8 import calibration_images, quantize
    from distillery.export.onnx import export_onnx, preprocess

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
    t = time.perf_counter()
    r = quantize(fp32, work / "student.int8.onnx", calibration_images(folder=str(COCO128 / "images"), n=args.calib),
                 method=args.method)
    print(f"quantized ({args.method}, {args.calib} calibration photos) in {time.perf_counter() - t:.0f} s")

    photos = [str(p) for p in sorted((COCO128 / "images").glob("*.jpg"))[:16]]
    xs = [preprocess(p, args.imgsz) for p in photos]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for k, p in (("fp32", fp32), ("int8", r["cpu"]), ("int8-trt-flavour", r["tensorrt"]))}
    name = sessions["fp32"].get_inputs()[0].name
    for s in sessions.values():  # warm-up
        s.run(None, {name: xs[0]})
    times = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            for x in xs:
                s.run(None, {name: x})
            times[k].append((time.perf_counter() - t) / len(xs) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nONNX Runtime {ort.__version__} CPU, imgsz {args.imgsz}, {len(xs)} photos x {args.rounds} rounds, "
          f"{args.threads or 'default'} threads (median ms/img)")
    for k, v in med.items():
        print(f"  {k:18} {v:8.1f} ms   ratio FP32/this {med['fp32'] / v:5.2f}")
    print(f"speed-up of the CPU INT8 artifact: {med['fp32'] / med['int8']:.2f}x (target >= 1.5); the TensorRT "
          f"flavour (signed activations) on CPU: {med['fp32'] / med['int8-trt-flavour']:.2f}x")

    if args.skip_check:
        return
    gt = load_gt(gt_path)
    paths = [str(COCO128 / "images" / im["file_name"]) for im in gt["images"]]
    rep = export_check({"pytorch": model, "fp32": fp32, "int8": r["cpu"]}, gt, paths, args.imgsz, ["person"])
    print("\n" + format_report(rep))
    (work / "export_check.json").write_text(json.dumps(rep, indent=2))
    print(f"(work dir {work})")


if __name__ == "__main__":
    main()
