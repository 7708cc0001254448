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
  INT8: engines are built from Q/DQ ONNX, see ``distillery.export.tensorrt``). Biases stay
  FP32 (``QuantizeBias: False``): TensorRT's ONNX parser rejects a Conv bias from an INT32
  ``DequantizeLinear`` (onnx/onnx-tensorrt#850, NVIDIA/TensorRT#3360) and folds FP32 biases
  itself. The CPU artifact keeps INT32 biases, which ONNX Runtime needs to fuse ``QLinearConv``.

The detection/mask head (ONNX node names under ``distillery_head``, e.g. ``/model.22/``)
stays FP32 by default: box coordinates and class scores share one output tensor, and so
one scale, which leaves no usable score resolution when quantized. A node kept in FP32 also
reads FP32 inputs: where ONNX Runtime shares a Q/DQ pair between a quantized consumer and an
excluded one (the neck outputs that feed both the next neck layer and the head), the excluded
node is rewired to the tensor before the pair (:func:`_fp32_inputs_for_excluded`).

Calibration images are all read (with :func:`distillery.export.onnx.preprocess`) before
calibrating: one unreadable file is a :class:`CalibrationError` naming it, never a
calibration on fewer images than asked for.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from distillery.engine.store import LabelSet
from distillery.export.onnx import metadata, preprocess

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class CalibrationError(ValueError):
    """Fewer usable calibration images than asked for (too few in the source, or some that
    cannot be read, named in the message); the message says what to change."""


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


def calibration_batches(paths: list[str], imgsz: int, batch: int = 1) -> Iterator[np.ndarray]:
    """The calibration feed shared by every INT8 target (ONNX Runtime here, NNCF in
    :mod:`distillery.export.openvino`): float32 ``(batch, 3, imgsz, imgsz)`` arrays, ``batch``
    images at a time in ``paths`` order, each read with the inference preprocessing
    (:func:`distillery.export.onnx.preprocess`). ``len(paths)`` must be a multiple of ``batch``
    (the model's fixed batch; callers check it).

    Raises:
        CalibrationError: an image cannot be read (it was readable when :func:`check_readable`
            ran: it changed since).
    """
    for i in range(0, len(paths), batch):
        try:
            yield np.concatenate([preprocess(p, imgsz) for p in paths[i:i + batch]], axis=0)
        except ValueError as e:
            raise CalibrationError(f"calibration image {e}; calibration stopped") from e


def _reader(paths: list[str], input_name: str, imgsz: int, batch: int = 1):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """ONNX Runtime's view of :func:`calibration_batches`: ``{input_name: batch}`` dicts."""

        def __init__(self):
            self.batches = calibration_batches(paths, imgsz, batch)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {input_name: x}

    return Reader()


def check_readable(paths: list[str], imgsz: int, what: str = "calibration images",
                   fix: str = "INT8 never calibrates on fewer images than --calib-images") -> None:
    """Read every calibration image with the inference preprocessing
    (:func:`distillery.export.onnx.preprocess`), before calibrating.

    Raises:
        CalibrationError: naming the files that cannot be read (all of them, the first 10 in
            the message), since calibrating on the rest would use fewer images than asked for.
    """
    bad = []
    for p in paths:
        try:
            preprocess(p, imgsz)
        except ValueError:
            bad.append(str(p))
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CalibrationError(
            f"{len(bad)} of the {len(paths)} {what} cannot be read as images: {', '.join(bad[:10])}{more}; "
            f"replace or remove them ({fix})"
        )


def _fp32_inputs_for_excluded(model, excluded: set[str]) -> int:
    """Rewire each excluded node's activation inputs that come through a ``QuantizeLinear`` ->
    ``DequantizeLinear`` pair to the FP32 tensor before the pair, then drop pairs left
    without consumers. Edits the ``onnx.ModelProto`` in place; returns the inputs rewired.

    ONNX Runtime's QDQ quantizer gives a tensor one Q/DQ pair that every consumer reads,
    excluded nodes included (``DedicatedQDQPair`` splits pairs among quantized consumers only).
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for node in graph.node:
        if node.name not in excluded:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                rewired += 1
    outputs = {o.name for o in graph.output}
    dropped_inputs: set[str] = set()
    while True:
        consumed = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in consumed for o in n.output)]
        if not dead:
            break
        for n in dead:
            dropped_inputs.update(n.input[1:])
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in dropped_inputs and i.name not in used]:
        graph.initializer.remove(init)  # the scales / zero points of dropped pairs
    return rewired


#: Head nodes that may be quantized in ``head="outputs"`` mode: the inner 3x3 convs of the box,
#: class and mask-coefficient branches (``cv2|cv3|cv4.<level>.<0|1>``) and of the prototype net
#: before its last conv. The last convs and everything after them (decode, concat) stay FP32.
HEAD_INNER = r"/cv[234]\.\d+/cv[234]\.\d+\.[01]/|/proto/(cv1|upsample|cv2)/"


def head_prefix(onnx_path: str | Path, names: list[str] | None = None) -> str:
    """The node-name prefix of the detection/mask head: the file's ``distillery_head`` metadata
    (written by :func:`distillery.export.onnx.export_onnx`), else the highest ``/model.N/`` among
    ``names`` (default: the ONNX graph's node names)."""
    prefix = metadata(onnx_path).get("distillery_head")
    if prefix is not None:
        return prefix
    if names is None:
        import onnx

        names = [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    idx = [int(n.split("/")[1].split(".")[1]) for n in names if n.startswith("/model.") and n.split("/")[1][6:].isdigit()]
    return f"/model.{max(idx)}/" if idx else "/"


def select_head(names: list[str], prefix: str, keep: str = "all") -> list[str]:
    """The ``names`` under the head ``prefix``; ``keep="outputs"`` leaves out the inner convs
    matched by :data:`HEAD_INNER` (so they are quantized). Works on ONNX node names and on
    OpenVINO operation names converted from them (OpenVINO's ONNX front end keeps the node
    name, e.g. ``/model.22/cv2.0/cv2.0.2/Conv`` and ``.../Conv/WithoutBiases``)."""
    import re

    nodes = [n for n in names if n.startswith(prefix)]
    if keep == "outputs":
        nodes = [n for n in nodes if not re.search(HEAD_INNER, n)]
    return nodes


def head_nodes(onnx_path: str | Path, prefix: str | None = None, keep: str = "all") -> list[str]:
    """Names of the head's ONNX nodes to keep in FP32: under the head prefix (default:
    :func:`head_prefix`); ``keep="outputs"`` as in :func:`select_head`."""
    import onnx

    names = [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    return select_head(names, prefix if prefix is not None else head_prefix(onnx_path, names), keep)


def check_not_quantized(onnx_in: str | Path, model=None) -> None:
    """Refuse an ONNX that already has Q/DQ nodes (an INT8 artifact): quantizing it again hangs
    in ONNX Runtime, and converting it would give an "FP32" export that is INT8.

    Raises:
        ValueError: naming the file and the FP32 ONNX to give instead.
    """
    import onnx

    m = model if model is not None else onnx.load(str(onnx_in), load_external_data=False)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node):
        raise ValueError(f"{onnx_in} is already quantized (it has QuantizeLinear/DequantizeLinear nodes); give the "
                         "FP32 ONNX written by `distillery export onnx`")


def fp32_fixed_input(onnx_in: str | Path, model=None) -> tuple[str, int, int]:
    """``(input name, imgsz, batch)`` of an FP32 student ONNX with a fixed square input, as
    INT8 calibration needs (``model``: the loaded ``onnx.ModelProto``, else it is loaded).

    Raises:
        ValueError: ``onnx_in`` is already quantized (:func:`check_not_quantized`), or its input
            is dynamic or not square, naming the file and what to export instead.
    """
    import onnx

    m = model if model is not None else onnx.load(str(onnx_in), load_external_data=False)
    check_not_quantized(onnx_in, m)
    inp = m.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims) or dims[2] != dims[3]:
        raise ValueError(f"{onnx_in}: INT8 calibration needs a fixed square input (export with a fixed --batch); "
                         f"got input shape {dims}")
    return inp.name, dims[2], dims[0]


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
        ``{"cpu": path, "tensorrt": path, "calibration_images": n, "excluded_nodes": n,
        "fp32_inputs_rewired": {"cpu": n, "tensorrt": n}}`` (the last: excluded nodes' inputs
        moved off a shared Q/DQ pair, see the module docstring).

    Raises:
        CalibrationError: a calibration image cannot be read (:func:`check_readable`).
        ValueError: bad method or input shape; a node to keep in FP32 (head or ``exclude``) is
            not in the graph ONNX Runtime quantizes (``quant_pre_process`` output), naming it.
        ValueError: ``out`` (or its ``*.trt.onnx``) is ``onnx_in``; ``onnx_in`` is already
            quantized; ``onnx_in`` is not a segmentation student's ONNX
            (:class:`distillery.engine.filekinds.FileKindError`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from distillery.engine.filekinds import onnx_model

    onnx_model(onnx_in, "model")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} unknown; use one of {CALIBRATION_METHODS}")
    out = Path(out)
    trt_out = out.with_name(out.name.removesuffix(".onnx") + ".trt.onnx")
    if Path(onnx_in).resolve() in (out.resolve(), trt_out.resolve()):
        raise ValueError(f"{out} would overwrite the input model {onnx_in}; write the INT8 model to another file, "
                         "e.g. student.int8.onnx")
    m = onnx.load(str(onnx_in), load_external_data=False)
    input_name, imgsz, batch = fp32_fixed_input(onnx_in, m)
    if images and len(images) % batch:
        raise CalibrationError(f"{onnx_in} has a fixed batch of {batch}: give a multiple of {batch} calibration "
                               f"images (--calib-images), not {len(images)}")
    keep = "outputs" if keep_head_fp32 == "outputs" else "all"
    nodes_to_exclude = (head_nodes(onnx_in, keep=keep) if keep_head_fp32 else []) + list(exclude or [])
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    if not images:
        raise CalibrationError("no calibration images given")
    check_readable(images, imgsz)
    rewired = {}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(onnx_in), str(pre), skip_symbolic_shape=True)
        # names come from onnx_in; ONNX Runtime matches them against the pre-processed graph
        # and silently quantizes any node whose name is not there (renamed or fused)
        present = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
        missing = [n for n in dict.fromkeys(nodes_to_exclude) if n not in present]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(
                f"{onnx_in}: {len(missing)} node(s) to keep in FP32 are not in the graph being quantized (after "
                f"onnxruntime's quant_pre_process): {', '.join(missing[:5])}{more}; check --exclude names against "
                "the ONNX graph (pre-processing may have renamed or fused them)"
            )
        cache = Path(tmp) / "calibration.json"
        common = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                      nodes_to_exclude=nodes_to_exclude, calibrate_method=cm, calibration_cache_path=cache)
        cpu_tmp, trt_tmp = Path(tmp) / "cpu.onnx", Path(tmp) / "trt.onnx"
        quantize_static(str(pre), str(cpu_tmp), _reader(images, input_name, imgsz, batch), activation_type=QuantType.QUInt8,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True}, **common)
        # the same ranges (from the cache), quantized for TensorRT: signed, symmetric, FP32 biases
        quantize_static(str(pre), str(trt_tmp), None, activation_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
                        **common)
        out.parent.mkdir(parents=True, exist_ok=True)
        src = {p.key: p.value for p in m.metadata_props}
        for tmp_path, path, target in ((cpu_tmp, out, "onnxruntime-cpu"), (trt_tmp, trt_out, "tensorrt")):
            q = onnx.load(str(tmp_path))
            rewired[target] = _fp32_inputs_for_excluded(q, set(nodes_to_exclude))
            meta = {**{p.key: p.value for p in q.metadata_props}, **src, "distillery_int8_target": target,
                    "distillery_calibration": f"{method}, {len(images)} images", "distillery_head_fp32": str(keep_head_fp32)}
            del q.metadata_props[:]  # one entry per key (quant_pre_process already copied the input's)
            for k, v in meta.items():
                q.metadata_props.add(key=k, value=v)
            onnx.checker.check_model(q)
            onnx.save(q, str(path))
    return {"cpu": str(out), "tensorrt": str(trt_out), "calibration_images": len(images),
            "excluded_nodes": len(nodes_to_exclude),
            "fp32_inputs_rewired": {"cpu": rewired["onnxruntime-cpu"], "tensorrt": rewired["tensorrt"]}}


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
