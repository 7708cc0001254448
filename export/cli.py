"""``distillery export onnx|int8|openvino|engine|check``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from distillery.engine.cli_errors import UserError, fail_cleanly
from distillery.engine.cli_types import Checkpoint, CocoJson, Config, ImageFolder, ImageSize, Output, Store, StudentOnnx


_errors = fail_cleanly


class OpenVinoFolder(click.ParamType):
    """An OpenVINO segmentation student folder (``NAME_openvino_model/``), checked while the
    command line is parsed (:func:`distillery.export.openvino.openvino_folder`)."""

    name = "dir"

    def __init__(self, precision: str):
        self.precision = precision

    def convert(self, value, param, ctx):
        from distillery.engine.filekinds import FileKindError
        from distillery.export.openvino import folder_metadata

        name = max(param.opts, key=len) if param is not None else ""
        try:
            got = folder_metadata(str(value), name).get("distillery_precision")
        except FileKindError as e:
            raise UserError(str(e)) from e
        if got not in (None, self.precision):
            raise UserError(f"{name} {value} is the OpenVINO {got} model; give the {self.precision} one (its "
                            f"metadata.yaml says distillery_precision: {self.precision})")
        return str(value)


def _calibration_paths(store, labelset, images_dir, calib_images) -> list[str]:
    """The calibration images of ``export int8`` and ``export openvino --precision int8``: from
    exactly one of a label set (--store/--labelset) or a folder (--images)."""
    from distillery.export.int8 import calibration_images

    if (store is None) == (images_dir is None):
        raise click.UsageError("give exactly one calibration source: --store (a label set) or --images (a folder)")
    ls = None
    if store:
        from distillery.engine.store import LabelStore

        ls = LabelStore(store).open(labelset)
    return calibration_images(ls, images_dir, calib_images)


@click.group("export")
def export() -> None:
    """Export the student: ONNX, calibrated INT8 (Q/DQ), OpenVINO (FP32, INT8), per-device TensorRT engines, checks.

    \b
    distillery export onnx   --model runs/NAME/weights/best.pt --imgsz 640 --out student.onnx
    distillery export int8   --model student.onnx --store store/ --calib-images 512 --out student.int8.onnx
    distillery export openvino --model student.onnx --precision int8 --store store/ --calib-images 512 --out student_int8_openvino_model
    distillery export engine --model student.int8.trt.onnx --device-profile jetson-orin-nx --out student.orin.engine
    distillery export check  --onnx student.onnx --int8 student.int8.onnx --openvino student_openvino_model --openvino-int8 student_int8_openvino_model --gt annotations.json --images DIR
    """


@export.command("onnx")
@click.option("--model", required=True, type=Checkpoint(), help="Student checkpoint (.pt).")
@click.option("--imgsz", type=ImageSize(), default=640, show_default=True)
@click.option("--batch", default="1", show_default=True, help="Fixed batch size, or 'dynamic'.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: ultralytics' choice).")
@click.option("--out", required=True, type=Output(folder=False, example="student.onnx"))
@click.option("--check-images", type=ImageFolder(), default=None,
              help="Folder of real photos for a PyTorch/ONNX raw-output parity check (first 8).")
@_errors
def export_onnx_cmd(model, imgsz, batch, opset, out, check_images):
    """Export the student to ONNX with metadata (classes, input size, preprocessing, label set)."""
    from distillery.export.onnx import export_onnx, metadata, raw_parity

    if check_images:  # every check image readable before anything is written
        from distillery.engine.images import list_source
        from distillery.export.int8 import check_readable

        check_paths = list_source(check_images)[:8]
        check_readable(check_paths, imgsz, "--check-images", "the parity check reads the first 8 images of the folder")
    path = export_onnx(model, out, imgsz=imgsz, batch=batch, opset=opset)
    meta = metadata(path)
    click.echo(f"wrote {path}: input {meta.get('batch')}x3x{imgsz}x{imgsz}, classes {meta.get('names')}, "
               f"label set {meta.get('distillery_labelset', 'unknown')}")
    if check_images:
        d = raw_parity(model, path, check_paths, imgsz)
        click.echo("parity (max |PyTorch - ONNX Runtime|): " + ", ".join(
            f"{k} {d[k]:.2e} of {d[k + '_scale']:.2e}" for k in ("output0", "output1")))


@export.command("int8")
@click.option("--model", required=True, type=StudentOnnx(), help="FP32 ONNX (fixed batch).")
@click.option("--store", type=Store(), default=None, help="Calibrate on a label set's images.")
@click.option("--labelset", default=None, metavar="NAME|ID",
              help="With --store: label set name, id or unique id prefix (default: the store's only one).")
@click.option("--images", "images_dir", type=ImageFolder(), default=None,
              help="Or calibrate on a folder of in-domain images.")
@click.option("--calib-images", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True)
@click.option("--head", "head", type=click.Choice(["fp32", "outputs", "int8"]), default="fp32", show_default=True,
              help="Detection/mask head precision: fp32 (all of it), outputs (only its output convs and what follows "
                   "stay FP32; its inner convs are INT8), int8 (everything; not recommended).")
@click.option("--exclude", multiple=True, help="Another node name to keep in FP32 (repeatable).")
@click.option("--out", required=True, type=Output(folder=False, example="student.int8.onnx"), help="CPU artifact; the TensorRT one is *.trt.onnx beside it.")
@_errors
def export_int8_cmd(model, store, labelset, images_dir, calib_images, method, head, exclude, out):
    """Calibrate once, write INT8 Q/DQ ONNX for ONNX Runtime CPU (unsigned activations) and
    for TensorRT (signed symmetric), head in FP32 by default."""
    from distillery.export.int8 import qdq_counts, quantize

    paths = _calibration_paths(store, labelset, images_dir, calib_images)
    keep = {"fp32": True, "outputs": "outputs", "int8": False}[head]
    r = quantize(model, out, paths, method=method, keep_head_fp32=keep, exclude=list(exclude))
    for target in ("cpu", "tensorrt"):
        q = qdq_counts(r[target])
        click.echo(f"{target:9} {r[target]}: {q['QuantizeLinear']} QuantizeLinear / {q['DequantizeLinear']} "
                   f"DequantizeLinear, activations {'/'.join(q['activation_zero_point_dtypes'])}")
    click.echo(f"calibrated on {r['calibration_images']} images ({method}); {r['excluded_nodes']} nodes kept in FP32")


@export.command("openvino")
@click.option("--model", required=True, type=StudentOnnx(), help="FP32 ONNX written by `distillery export onnx`.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="fp32, or int8 (NNCF post-training quantization, calibrated as `export int8` is).")
@click.option("--store", type=Store(), default=None, help="int8: calibrate on a label set's images.")
@click.option("--labelset", default=None, metavar="NAME|ID",
              help="With --store: label set name, id or unique id prefix (default: the store's only one).")
@click.option("--images", "images_dir", type=ImageFolder(), default=None,
              help="int8: or calibrate on a folder of in-domain images.")
@click.option("--calib-images", type=click.IntRange(min=1), default=None, help="int8: calibration images [default: 512].")
@click.option("--head", type=click.Choice(["fp32", "outputs", "int8"]), default=None,
              help="int8: detection/mask head precision, the values of `export int8 --head` (fp32: all of the head; "
                   "outputs: its output convs and what follows) [default: outputs, unlike export int8's fp32].")
@click.option("--preset", type=click.Choice(["mixed", "performance"]), default=None,
              help="int8: NNCF preset, mixed (asymmetric activations) or performance (symmetric) [default: mixed].")
@click.option("--overwrite", is_flag=True, help="Replace an existing OpenVINO model folder at --out.")
@click.option("--out", required=True, type=Output(folder=True, example="student_openvino_model"),
              help="Folder NAME_openvino_model/ (the name ultralytics' YOLO() recognises).")
@_errors
def export_openvino_cmd(model, precision, store, labelset, images_dir, calib_images, head, preset, overwrite, out):
    """OpenVINO IR for x86 CPUs and Intel GPUs/NPUs, in a folder ultralytics' YOLO() loads:
    FP32, or INT8 through NNCF on the same calibration images and preprocessing as `export int8`."""
    from distillery.export.openvino import check_output, export_openvino

    int8_only = {"--store": store, "--labelset": labelset, "--images": images_dir, "--calib-images": calib_images,
                 "--head": head, "--preset": preset}
    if precision == "fp32" and any(v is not None for v in int8_only.values()):
        given = ", ".join(k for k, v in int8_only.items() if v is not None)
        raise click.UsageError(f"{given}: for --precision int8 only (FP32 needs no calibration)")
    check_output(out, overwrite)  # before calibration images are read
    paths = _calibration_paths(store, labelset, images_dir, calib_images or 512) if precision == "int8" else None
    r = export_openvino(model, out, precision=precision, images=paths, head=head or "outputs",
                        preset=preset or "mixed", overwrite=overwrite)
    from distillery.export.openvino import cpu_inference_precision

    ir = r["ir"]
    click.echo(f"wrote {r['path']} ({precision}): {Path(r['xml']).name}, {ir['layers']} layers, {ir['FakeQuantize']} "
               f"FakeQuantize, {ir['low_precision_constants']} INT8 constants")
    if precision == "int8":
        click.echo(f"calibrated on {r['calibration_images']} images (NNCF, {preset or 'mixed'}); head {head or 'outputs'}: "
                   f"{r['ignored_ops']} operations kept in floating point")
    runs_in = cpu_inference_precision()
    if runs_in != "f32":
        click.echo(f"note: OpenVINO on this CPU computes floating-point layers in {runs_in} by default "
                   "(INFERENCE_PRECISION_HINT; ultralytics' YOLO() keeps that default), not in FP32: measure with "
                   "`distillery export check`")


@export.command("engine")
@click.option("--model", required=True, help="TensorRT QDQ ONNX (*.trt.onnx).",
              type=StudentOnnx(student=False, refuse_target="onnxruntime-cpu",
                               hint="give the *.trt.onnx written by `distillery export int8`"))
@click.option("--device-profile", required=True, type=Config("device-profile"),
              help="Device profile: a YAML file or a shipped name (jetson-orin-nx, rtx-server, ...; distillery configs list).")
@click.option("--out", required=True, type=Output(folder=False, example="student.orin.engine"))
@_errors
def export_engine_cmd(model, device_profile, out):
    """Build a strongly typed TensorRT engine on this (GPU) machine, with a manifest beside it."""
    from distillery.export.tensorrt import DeviceProfile, build_engine

    profile = DeviceProfile.load(device_profile)
    try:
        m = build_engine(model, profile, out)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {out} for {m['gpu_name']} (sm {m['compute_capability']}), TensorRT {m['tensorrt_version']}; "
               f"manifest {out}.json")


@export.command("check")
@click.option("--model", "pt", type=Checkpoint(), default=None, help="PyTorch checkpoint.")
@click.option("--onnx", "fp32", type=StudentOnnx(), default=None, help="FP32 ONNX.")
@click.option("--int8", "int8", default=None, help="INT8 ONNX (CPU artifact).",
              type=StudentOnnx(refuse_target="tensorrt", hint="give the CPU INT8 .onnx written by `distillery export int8` "
                                                               "(its *.trt.onnx is for TensorRT)"))
@click.option("--openvino", "ov_fp32", type=OpenVinoFolder("fp32"), default=None,
              help="OpenVINO FP32 folder (`distillery export openvino`).")
@click.option("--openvino-int8", "ov_int8", type=OpenVinoFolder("int8"), default=None,
              help="OpenVINO INT8 folder (`distillery export openvino --precision int8`).")
@click.option("--gt", "gt_path", required=True, type=CocoJson())
@click.option("--images", "images_dir", required=True, type=ImageFolder())
@click.option("--imgsz", type=ImageSize(), default=None, help="Default: the ONNX's input size, else 640.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N GT images only.")
@click.option("--out", type=Output(folder=False, example="check.json"), default=None, help="Write the report JSON here.")
@_errors
def export_check_cmd(pt, fp32, int8, ov_fp32, ov_int8, gt_path, images_dir, imgsz, limit, out):
    """PyTorch, ONNX Runtime FP32 and INT8, OpenVINO FP32 and INT8 on the same images: mAP, and
    against the FP32 ONNX: mAP drop, agreement, speed-up."""
    from distillery.engine.evaluation import load_gt
    from distillery.export.check import export_check, format_report, image_list
    from distillery.export.onnx import metadata

    models = {k: v for k, v in (("pytorch", pt), ("fp32", fp32), ("int8", int8), ("openvino-fp32", ov_fp32),
                                ("openvino-int8", ov_int8)) if v}
    if not models:
        raise click.UsageError("give at least one of --model, --onnx, --int8, --openvino, --openvino-int8")
    if imgsz is None:
        onnx_any, ov_any = fp32 or int8, ov_fp32 or ov_int8
        if onnx_any:
            imgsz = int(json.loads(metadata(onnx_any).get("imgsz", "[640]"))[0])
        elif ov_any:
            from distillery.export.openvino import folder_metadata

            imgsz = int(folder_metadata(ov_any).get("imgsz", [640])[0])
        else:
            imgsz = 640
    gt = load_gt(gt_path)
    paths = image_list(images_dir, gt, limit)
    if not paths:
        raise click.UsageError(f"no image of {gt_path} is in {images_dir}")
    from ultralytics import YOLO

    names = list(YOLO(next(iter(models.values())), task="segment").names.values())
    r = export_check(models, gt, paths, imgsz, names)
    click.echo(format_report(r))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(r, indent=2))
