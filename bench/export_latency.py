"""ONNX Runtime FP32 / INT8 and OpenVINO FP32 / INT8 on the CPU, side by side in one run:
latency ratios, mAP drop and agreement.

    python bench/export_latency.py                          # trains the synthetic-shapes student first (~10 min)
    python bench/export_latency.py --threads 1              # single-threaded runtimes
    python bench/export_latency.py --data person16          # the 16-photo coco128 person student (mAP near 0)
    python bench/export_latency.py --model best.pt --data shapes --skip-check

0. The student: ``--model``, or one trained from scratch at 320 on ``--data``: ``shapes``
   (``bench/shapes_data.py``: 128 synthetic images of disks, boxes and triangles, which a
   yolov8n-seg learns from scratch on a CPU to a mask mAP a quantization drop can be read on)
   or ``person16`` (16 coco128 photos; from scratch its mask mAP stays near 0, so a drop means
   little).
1. Exports the student to ONNX at ``--imgsz`` (default 640), quantizes it for ONNX Runtime
   (:mod:`distillery.export.int8`, head FP32) and writes the OpenVINO FP32 and INT8 folders
   (:mod:`distillery.export.openvino`, NNCF): the same ``--calib`` calibration images and
   preprocessing for both INT8 models.
2. Latency: every runtime on the same preprocessed photos, one round of all of them after
   another (``--rounds`` rounds after a warm-up, so load on a shared machine hits them alike);
   prints the medians and each ratio to ONNX Runtime FP32 (targets: ORT INT8 >= 1.5x, OpenVINO
   INT8 >= 2x). ``--threads`` sets ONNX Runtime's intra-op threads and OpenVINO's
   ``INFERENCE_NUM_THREADS`` alike (0: each runtime's default); OpenVINO compiles with
   ``PERFORMANCE_HINT: LATENCY`` as ultralytics' backend does, once at OpenVINO's default
   inference precision (bf16 on CPUs with AVX-512 BF16 / AMX: what ``YOLO()`` runs) and once
   pinned to f32 (``INFERENCE_PRECISION_HINT``), so "OV FP32" is seen for what it computes.
3. ``export check`` on held-out images (shapes: 32 new synthetic images; person16: its 16
   training photos) at the student's training size (models exported again at that size when it
   differs from ``--imgsz``): mAP of every model, and against ONNX Runtime FP32 the mask mAP
   drop, agreement and speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
import bench_args as ba  # bench/ is on sys.path (the script's folder)

ROOT = Path(__file__).resolve().parent.parent
COCO128 = Path(os.environ.get("DISTILLERY_COCO128", ROOT.parent / "shared" / "data" / "coco128"))


def student_and_gt(args, work: Path):
    """(student .pt, check GT json, check images dir, calibration images dir, class names)."""
    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import import_coco
    from distillery.student.data import Selection
    from distillery.student.train import train

    if args.data == "person16":
        from student_vs_stock import person_subset  # bench/ is on sys.path (script dir); the same 16 photos

        gt_path, images, calib_dir, names = person_subset(16, work), COCO128 / "images", COCO128 / "images", ["person"]
        train_gt = gt_path
    else:
        from shapes_data import CLASSES, write_shapes

        train_gt, calib_dir = write_shapes(work / "shapes-train", args.train_images, seed=0)
        gt_path, images = write_shapes(work / "shapes-check", 32, seed=1, prefix="check")
        names = CLASSES
    if args.model is not None:
        return args.model, gt_path, images, calib_dir, names
    store = LabelStore(work / "store")
    ls, _ = import_coco(store, str(train_gt), str(calib_dir))  # the training images (person16: coco128's)
    val, _ = import_coco(store, str(gt_path), str(images)) if args.data == "shapes" else (ls, None)
    t = time.perf_counter()
    run = train(work / "store", work / "run", labelset=ls.id, selection=Selection(val_fraction=0.0),
                val_labelset=val.id, epochs=args.epochs, imgsz=args.train_imgsz, batch=16, seed=0, deterministic=True,
                plots=False, workers=2, patience=args.epochs, **({"mosaic": 0.0} if args.data == "person16" else {}))
    print(f"trained the {args.data} student ({args.epochs} epochs at {args.train_imgsz}) in {time.perf_counter() - t:.0f} s")
    return run / "weights" / "best.pt", gt_path, images, calib_dir, names


def export_all(model: Path, imgsz: int, calib: list[str], out: Path, args) -> dict:
    """FP32 ONNX, ORT INT8 (CPU and TensorRT-flavour), OpenVINO FP32 and INT8 at ``imgsz``."""
    from distillery.export.int8 import quantize
    from distillery.export.onnx import export_onnx
    from distillery.export.openvino import export_openvino

    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, out / "student.onnx", imgsz=imgsz)
    t = time.perf_counter()
    r = quantize(fp32, out / "student.int8.onnx", calib, method=args.method)
    print(f"imgsz {imgsz}: ORT INT8 quantized ({args.method}, {len(calib)} calibration images) in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    ov_fp32 = export_openvino(fp32, out / "student_openvino_model")["path"]
    t = time.perf_counter()
    ov_int8 = export_openvino(fp32, out / "student_int8_openvino_model", precision="int8", images=calib,
                              head=args.ov_head, preset=args.ov_preset)
    print(f"imgsz {imgsz}: OV INT8 quantized (NNCF {args.ov_preset}, head {args.ov_head}) in "
          f"{time.perf_counter() - t:.0f} s; {ov_int8['ir']['FakeQuantize']} FakeQuantize", flush=True)
    return {"fp32": fp32, "int8": r["cpu"], "int8-trt": r["tensorrt"], "openvino-fp32": ov_fp32,
            "openvino-int8": ov_int8["path"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="student .pt (default: train one on --data)")
    ap.add_argument("--data", default="shapes", choices=["shapes", "person16"],
                    help="what the student learns and is checked on (shapes: synthetic, learnable from scratch "
                         "in minutes; person16: 16 coco128 photos, GT of those same photos)")
    ap.add_argument("--epochs", type=ba.positive, default=None,
                    help="training epochs (default: shapes 40, person16 150)")
    ap.add_argument("--train-images", type=ba.positive, default=128, help="shapes: training images")
    ap.add_argument("--train-imgsz", type=ba.imgsz, default=320, help="training input size (the check runs at it)")
    ap.add_argument("--imgsz", type=ba.imgsz, default=640, help="latency input size")
    ap.add_argument("--check-imgsz", type=ba.imgsz, default=None,
                    help="export check input size (default: the student's training imgsz, from its checkpoint)")
    ap.add_argument("--calib", type=ba.positive, default=64,
                    help="calibration images (shapes: training images; person16: coco128)")
    ap.add_argument("--rounds", type=ba.positive, default=5, help="timed rounds over the 16 photos (median counts)")
    ap.add_argument("--method", default="minmax", help="ORT INT8 calibration method (export int8 --method)")
    ap.add_argument("--threads", type=ba.non_negative, default=0,
                    help="threads of every runtime (0: each one's default, all cores)")
    ap.add_argument("--ov-head", default="outputs", choices=["fp32", "outputs", "int8"], help="OpenVINO INT8 --head")
    ap.add_argument("--ov-preset", default="mixed", choices=["mixed", "performance"], help="OpenVINO INT8 NNCF preset")
    ap.add_argument("--skip-check", action="store_true", help="latency only, no export check")
    args = ap.parse_args()
    args.epochs = args.epochs or {"shapes": 40, "person16": 150}[args.data]
    if args.model is None and args.data == "shapes" and args.calib > args.train_images:
        ap.error(f"--calib {args.calib} is more than the {args.train_images} --train-images it draws from")
    if args.model is not None:
        from distillery.engine.filekinds import FileKindError, ultralytics_checkpoint

        try:
            args.model = ultralytics_checkpoint(args.model, "--model")
        except FileKindError as e:
            ap.error(str(e))

    import onnxruntime as ort
    import openvino as ov
    import torch

    from distillery.engine.evaluation import load_gt
    from distillery.export.check import export_check, format_report
    from distillery.export.int8 import calibration_images
    from distillery.export.onnx import preprocess
    from distillery.export.openvino import cpu_inference_precision, openvino_folder

    work = Path(tempfile.mkdtemp(prefix="export-latency-"))
    model, gt_path, images, calib_dir, names = student_and_gt(args, work)
    calib = calibration_images(folder=str(calib_dir), n=args.calib)
    paths = export_all(model, args.imgsz, calib, work / f"at{args.imgsz}", args)

    photos = [str(p) for p in sorted((COCO128 / "images").glob("*.jpg"))[:16]]
    xs = [preprocess(p, args.imgsz) for p in photos]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    core = ov.Core()
    default = cpu_inference_precision()
    runs = {k: (lambda s: lambda x: s.run(None, {"images": x}))(ort.InferenceSession(str(paths[p]), opts,
                                                                                     providers=["CPUExecutionProvider"]))
            for k, p in (("ORT FP32", "fp32"), ("ORT INT8", "int8"), ("ORT INT8 TRT-flavour", "int8-trt"))}
    # OpenVINO at its default precision (what ultralytics' YOLO() runs) and pinned to f32
    for hint in dict.fromkeys([default, "f32"]):
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint,
                  **({"INFERENCE_NUM_THREADS": args.threads} if args.threads else {})}
        for k, p in (("OV FP32", "openvino-fp32"), ("OV INT8", "openvino-int8")):
            c = core.compile_model(core.read_model(str(openvino_folder(paths[p]))), "CPU", config)
            runs[f"{k} ({hint}{', default' if hint == default else ''})"] = (lambda c: lambda x: c(x))(c)
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
    print(f"\nCPU, imgsz {args.imgsz}, {len(xs)} coco128 photos x {args.rounds} rounds, {args.threads or 'default'} threads "
          f"(median ms/img; ONNX Runtime {ort.__version__}, OpenVINO {ov.__version__}; OpenVINO's default CPU "
          f"inference precision here: {default})")
    print(f"  {'runtime':28}{'ms/img':>9}{'vs ORT FP32':>13}")
    for k, v in med.items():
        print(f"  {k:28}{v:9.1f}{med['ORT FP32'] / v:12.2f}x")
    ov_int8 = f"OV INT8 ({default}, default)"
    print(f"speed-up over ORT FP32: ORT INT8 {med['ORT FP32'] / med['ORT INT8']:.2f}x (target >= 1.5), "
          f"OV INT8 as YOLO() runs it {med['ORT FP32'] / med[ov_int8]:.2f}x (target >= 2)")

    if args.skip_check:
        print(f"(work dir {work})")
        return
    ck = torch.load(model, map_location="cpu", weights_only=False)
    check_imgsz = args.check_imgsz or int((ck.get("train_args") or {}).get("imgsz", args.imgsz))
    if check_imgsz != args.imgsz:
        paths = export_all(model, check_imgsz, calib, work / f"at{check_imgsz}", args)
    gt = load_gt(gt_path)
    check_paths = [str(Path(images) / Path(im["file_name"]).name) for im in gt["images"]]
    rep = export_check({"pytorch": model, **{k: v for k, v in paths.items() if k != "int8-trt"}}, gt, check_paths,
                       check_imgsz, names)
    print(f"\nexport check on {len(check_paths)} held-out {args.data} images at imgsz {check_imgsz} "
          f"(the student's training size):\n" + format_report(rep))
    (work / "export_check.json").write_text(json.dumps(rep, indent=2))
    print(f"(work dir {work})")


if __name__ == "__main__":
    main()
