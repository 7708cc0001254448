"""INT8 with explicit quantization: Q/DQ nodes in the ONNX (ONNX Runtime's
``quantize_static``, QDQ format), calibrated on in-domain images with exactly the
inference preprocessing (:func:`distillery.export.onnx.preprocess`).

One calibration (activation ranges collected once, cached by ``calibration_cache_path``)
gives two artifacts:

* **CPU** (``--out``): weights signed INT8 symmetric per channel, activations *unsigned*
  INT8 asymmetric -- what ONNX Runtime's x86 kernels run fast (signed activations take a
  slow path; measured on yolov8n-seg at 320: 2.4x slower than FP32).
* **TensorRT** (``*.trt.onnx`` beside it): weights and activations signed INT8, symmetric
  (zero point 0), as TensorRT's explicit quantization requires (TensorRT 11 has no implicit
  INT8: engines are built from Q/DQ ONNX, see ``distillery.export.tensorrt``).

The detection/mask head (ONNX node names under ``distillery_head``, e.g. ``/model.22/``)
stays FP32 by default: box coordinates and class scores share one output tensor, and so
one scale, which leaves no usable score resolution when quantized.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np

from distillery.engine.store import LabelSet
from distillery.export.onnx import metadata, preprocess

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class CalibrationError(ValueError):
    """Too few calibration images, or none readable; the message says what to change."""


def calibration_images(labelset: LabelSet | None = None, folder: str | None = None, n: int = 512,
                       seed: int = 0) -> list[str]:
    """``n`` image paths for calibration, from a label set's labeled images (errors skipped) or
    a folder, drawn deterministically (sha256 of path + seed order).

    Raises:
        CalibrationError: fewer than ``n`` usable images (never falls back to other data).
    """
    if (labelset is None) == (folder is None):
        raise CalibrationError("give exactly one calibration source: a label set or a folder of images")
    if labelset is not None:
        t = labelset.read_columns(["path", "error"])
        paths = [p for p, e in zip(t.column("path").to_pylist(), t.column("error").to_pylist())
                 if e is None and Path(p).is_file()]
        where = f"label set {labelset.id}"
    else:
        from distillery.engine.images import list_source

        paths = list_source(folder)
        where = f"folder {folder}"
    if len(paths) < n:
        raise CalibrationError(
            f"{where} has {len(paths)} usable images, fewer than the {n} calibration images asked for; "
            "lower --calib-images or calibrate on a larger in-domain set"
        )
    key = lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()  # noqa: E731
    return sorted(paths, key=key)[:n]


def _reader(paths: list[str], input_name: str, imgsz: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Yields ``{input_name: float32 (1, 3, imgsz, imgsz)}`` per image (inference preprocessing)."""

        def __init__(self):
            self.it = iter(paths)
            self.skipped: list[str] = []

        def get_next(self):
            for p in self.it:
                try:
                    return {input_name: preprocess(p, imgsz)}
                except ValueError:
                    self.skipped.append(p)
            return None

    return Reader()


#: Head nodes that may be quantized in ``head="outputs"`` mode: the inner 3x3 convs of the box,
#: class and mask-coefficient branches (``cv2|cv3|cv4.<level>.<0|1>``) and of the prototype net
#: before its last conv. The last convs and everything after them (decode, concat) stay FP32.
HEAD_INNER = r"/cv[234]\.\d+/cv[234]\.\d+\.[01]/|/proto/(cv1|upsample|cv2)/"


def head_nodes(onnx_path: str | Path, prefix: str | None = None, keep: str = "all") -> list[str]:
    """Names of the head's nodes to keep in FP32: under the head prefix (default: the file's
    ``distillery_head`` metadata, else the highest ``/model.N/``); ``keep="outputs"`` leaves out
    the inner convs matched by :data:`HEAD_INNER` (so they are quantized)."""
    import re

    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    names = [n.name for n in m.graph.node]
    if prefix is None:
        prefix = metadata(onnx_path).get("distillery_head")
    if prefix is None:
        idx = [int(n.split("/")[1].split(".")[1]) for n in names if n.startswith("/model.") and n.split("/")[1][6:].isdigit()]
        prefix = f"/model.{max(idx)}/" if idx else "/"
    nodes = [n for n in names if n.startswith(prefix)]
    if keep == "outputs":
        nodes = [n for n in nodes if not re.search(HEAD_INNER, n)]
    return nodes


def quantize(onnx_in: str | Path, out: str | Path, images: list[str], method: str = "minmax",
             keep_head_fp32: bool | str = True, exclude: list[str] | None = None) -> dict:
    """Calibrate once on ``images`` and write the CPU (``out``) and TensorRT
    (``out`` with ``.trt.onnx``) QDQ artifacts (module docstring).

    Args:
        onnx_in: the FP32 ONNX from :func:`distillery.export.onnx.export_onnx` (fixed input shape).
        images: calibration image paths (:func:`calibration_images`).
        method: ``minmax`` | ``percentile`` (99.999th) | ``entropy`` (ONNX Runtime calibrators).
        keep_head_fp32: True: leave the whole detection/mask head unquantized; ``"outputs"``:
            only its output convs and what follows them (:data:`HEAD_INNER` is quantized);
            False: quantize the head too.
        exclude: more node names to leave unquantized.

    Returns:
        ``{"cpu": path, "tensorrt": path, "calibration_images": n, "skipped": [...],
        "excluded_nodes": n}``.

    Raises:
        CalibrationError: no calibration image could be read; ValueError: bad method or shape,
        or ``onnx_in`` is not a segmentation student's ONNX
        (:class:`distillery.engine.filekinds.FileKindError`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from distillery.engine.filekinds import onnx_model

    onnx_model(onnx_in, "model")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} unknown; use one of {CALIBRATION_METHODS}")
    m = onnx.load(str(onnx_in), load_external_data=False)
    inp = m.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims) or dims[2] != dims[3]:
        raise ValueError(f"{onnx_in}: INT8 calibration needs a fixed square input (export with a fixed --batch); "
                         f"got input shape {dims}")
    imgsz = dims[2]
    out = Path(out)
    trt_out = out.with_name(out.name.removesuffix(".onnx") + ".trt.onnx")
    keep = "outputs" if keep_head_fp32 == "outputs" else "all"
    nodes_to_exclude = (head_nodes(onnx_in, keep=keep) if keep_head_fp32 else []) + list(exclude or [])
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(onnx_in), str(pre), skip_symbolic_shape=True)
        cache = Path(tmp) / "calibration.json"
        reader = _reader(images, inp.name, imgsz)
        common = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                      nodes_to_exclude=nodes_to_exclude, calibrate_method=cm, calibration_cache_path=cache)
        quantize_static(str(pre), str(out), reader, activation_type=QuantType.QUInt8,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True}, **common)
        if len(reader.skipped) == len(images):
            raise CalibrationError(f"none of the {len(images)} calibration images could be read")
        # the same ranges (from the cache), quantized for TensorRT: signed, symmetric
        quantize_static(str(pre), str(trt_out), None, activation_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}, **common)
    for path, target in ((out, "onnxruntime-cpu"), (trt_out, "tensorrt")):
        q = onnx.load(str(path))
        src = {p.key: p.value for p in m.metadata_props}
        for k, v in {**src, "distillery_int8_target": target, "distillery_calibration": f"{method}, {len(images)} images",
                     "distillery_head_fp32": str(keep_head_fp32)}.items():
            q.metadata_props.add(key=k, value=v)
        onnx.save(q, str(path))
    return {"cpu": str(out), "tensorrt": str(trt_out), "calibration_images": len(images) - len(reader.skipped),
            "skipped": reader.skipped, "excluded_nodes": len(nodes_to_exclude)}


def qdq_counts(path: str | Path) -> dict:
    """Counts of ``QuantizeLinear`` / ``DequantizeLinear`` nodes and the activation zero-point
    dtypes used (``uint8`` / ``int8``)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    zp_types = set()
    for n in q:
        if len(n.input) > 2 and n.input[2] in inits:
            zp_types.add(str(numpy_helper.to_array(inits[n.input[2]]).dtype))
    return {"QuantizeLinear": len(q), "DequantizeLinear": len(dq), "activation_zero_point_dtypes": sorted(zp_types),
            "nonzero_zero_points": int(sum(np.any(numpy_helper.to_array(inits[n.input[2]]) != 0)
                                           for n in q if len(n.input) > 2 and n.input[2] in inits))}
