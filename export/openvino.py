"""OpenVINO IR of the student, for x86 CPUs and Intel GPUs/NPUs: FP32, or INT8 through NNCF.

The input is the FP32 ONNX written by :func:`distillery.export.onnx.export_onnx`, read by
OpenVINO's ONNX front end (``ov.Core().read_model``), so ONNX Runtime and OpenVINO run the same
graph. INT8 is NNCF post-training quantization (``nncf.quantize``) of that OpenVINO model,
calibrated with exactly the images and preprocessing of ``distillery export int8``:
:func:`distillery.export.int8.calibration_images` draws them and
:func:`distillery.export.int8.calibration_batches` feeds them (ultralytics' ``LetterBox``,
RGB, /255, the model's fixed input shape). NNCF inserts ``FakeQuantize`` operations on
activations and stores weights as INT8 constants; ``--head`` keeps the detection/mask head's
operations (:func:`distillery.export.int8.select_head`) out of quantization as ``export int8``
does.

The output is the folder ultralytics' ``YOLO()`` loads (``AutoBackend`` recognises the format
by a name ending in ``_openvino_model``, reads the one ``*.xml`` in it with the ``.bin`` beside,
and ``metadata.yaml``), laid out as ultralytics' own exporter writes it
(``ultralytics/engine/exporter.py``, ``export_openvino``)::

    student_openvino_model/
        student.xml        # the network (IR v11)
        student.bin        # weights: FP32, or INT8 + FP32 scales
        metadata.yaml      # ultralytics' metadata (names, imgsz, task, batch, stride, args, ...)
                           # plus distillery_* provenance (precision, calibration, source ONNX sha256)

The folder is written beside ``--out`` under a temporary name and renamed into place, so a
failure leaves no half-written model; an existing ``--out`` is replaced only with
``overwrite=True``, and only if it holds an OpenVINO model and nothing else.

``openvino`` and ``nncf`` are the optional extra ``distillery[openvino]``.

**FP32 weights do not mean FP32 arithmetic.** OpenVINO's CPU plugin computes floating-point
layers in bf16 by default on CPUs with AVX-512 BF16 or AMX (its ``INFERENCE_PRECISION_HINT``;
OpenVINO docs, "Precision Control"), and ultralytics' ``AutoBackend`` compiles with that
default on Linux x86 (it pins f32 on Windows and on ARM64 Linux). A hint stored in the IR's
``rt_info`` is not honoured for this property (tried, OpenVINO 2026.4), so the folder cannot
pin it: :func:`cpu_inference_precision` names what this machine will use, and
``export openvino``, ``export check`` and ``bench/export_latency.py`` print it. Measured on a
2-core AMX-BF16 CPU (yolov8n-seg at 640, 1 thread): ONNX Runtime FP32 94.9 ms, OpenVINO f32
90.1 ms (1.05x), OpenVINO default (bf16) 30.5 ms (3.11x).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from distillery.engine.cli_errors import MissingExtra, install_hint
from distillery.engine.filekinds import OPENVINO_SUFFIX as SUFFIX
from distillery.engine.filekinds import openvino_folder  # noqa: F401  (the export's folder check, re-exported)

INSTALL_HINT = install_hint("openvino")
#: NNCF presets: ``mixed`` (symmetric weights, asymmetric activations: suits SiLU outputs, which
#: are not centred on 0) and ``performance`` (both symmetric).
PRESETS = ("mixed", "performance")
#: ``--head``: fp32 (the whole head unquantized), outputs (only its output convs and what follows
#: them: box decoding, DFL, the score and coefficient outputs; the default of the CLI), int8
#: (nothing kept; measured on a one-epoch student at 320: box error 0.88 of the boxes' signal,
#: against 0.40 with the head in FP32, see tests/export/test_openvino.py).
HEAD_MODES = ("fp32", "outputs", "int8")
#: IR element types counted as quantized constants by :func:`ir_counts`.
LOW_PRECISION = ("i8", "u8", "i4", "u4")
#: ultralytics' metadata keys whose values it reads as numbers or Python literals
#: (``BaseBackend.apply_metadata``); the ONNX stores every value as a string.
_INT_KEYS = ("stride", "batch", "channels")
_LITERAL_KEYS = ("imgsz", "names", "args", "end2end", "kpt_shape", "kpt_names")


class OpenVinoMissing(MissingExtra):
    """``openvino`` (or, for INT8, ``nncf``) is not installed; the message says what to install."""


def _import(int8: bool):
    try:
        import openvino as ov
    except ImportError as e:
        raise OpenVinoMissing(f"OpenVINO export needs the openvino package (not installed): {INSTALL_HINT}") from e
    if not int8:
        return ov, None
    try:
        import nncf
    except ImportError as e:
        raise OpenVinoMissing(f"OpenVINO INT8 export needs the nncf package (not installed): {INSTALL_HINT}") from e
    return ov, nncf


def folder_metadata(path: str | os.PathLike, name: str = "") -> dict:
    """``metadata.yaml`` of an OpenVINO model folder (checked by :func:`openvino_folder`, which
    raises ``FileKindError`` naming ``name`` and the folder)."""
    openvino_folder(path, name)
    return yaml.safe_load((Path(path) / "metadata.yaml").read_text())


def ultralytics_metadata(onnx_meta: dict[str, str]) -> dict:
    """ONNX metadata strings -> the typed values ultralytics' exporter writes to
    ``metadata.yaml`` (``stride``/``batch``/``channels`` int; ``imgsz``, ``names``, ``args``,
    ``end2end`` Python literals); other keys (``distillery_*`` included) stay strings.

    Raises:
        ValueError: a literal key that does not parse, naming it.
    """
    out: dict = {}
    for k, v in onnx_meta.items():
        try:
            out[k] = int(v) if k in _INT_KEYS else ast.literal_eval(v) if k in _LITERAL_KEYS else v
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"ONNX metadata {k}={v!r} is not what ultralytics writes ({e}); re-export the ONNX "
                             "with `distillery export onnx`") from e
    return out


def check_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``out`` if an OpenVINO model folder may be written there.

    Raises:
        ValueError: the name does not end in ``_openvino_model``, or it is an existing file;
            with ``overwrite``, a folder holding anything but an OpenVINO model (``*.xml``,
            ``*.bin``, ``metadata.yaml``).
        FileExistsError: a non-empty folder, without ``overwrite``.
    """
    p = Path(out).expanduser()
    if not p.name.endswith(SUFFIX) or p.name == SUFFIX:
        raise ValueError(f"--out {out}: the folder name must end in {SUFFIX} (ultralytics recognises an OpenVINO "
                         f"model by it), e.g. {p.with_name((p.stem or 'student') + SUFFIX)}")
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder path (e.g. student{SUFFIX})")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or give another folder")
        other = sorted(f.name for f in p.iterdir()
                       if not (f.is_file() and (f.suffix in (".xml", ".bin") or f.name == "metadata.yaml")))
        if other:
            more = f" and {len(other) - 3} more" if len(other) > 3 else ""
            raise ValueError(f"--out {out} holds other files than an OpenVINO model ({', '.join(other[:3])}{more}); "
                             "--overwrite replaces an OpenVINO model folder only: give another --out")
    return p


class _Feed:
    """Re-iterable :func:`distillery.export.int8.calibration_batches` (NNCF may pass over the
    data more than once)."""

    def __init__(self, paths: list[str], imgsz: int, batch: int):
        self.paths, self.imgsz, self.batch = paths, imgsz, batch

    def __iter__(self):
        from distillery.export.int8 import calibration_batches

        return calibration_batches(self.paths, self.imgsz, self.batch)

    def __len__(self) -> int:
        return len(self.paths) // self.batch


def head_ops(model, prefix: str) -> list[str]:
    """Names of the OpenVINO ``model``'s operations that belong to the detection/mask head: those
    named under ``prefix`` (OpenVINO's ONNX front end keeps ONNX node names), and every
    operation computed from one of them. The second part catches the operations OpenVINO
    renames: a ``ConvTranspose`` becomes ``ConvolutionBackpropData_<n>`` (its bias ``Add`` keeps
    the ONNX name) and the last operation of an output takes the output's name (``output1``).
    Constants, parameters and results are not listed (NNCF places no quantizer on them)."""
    head: set[str] = set()
    names = []
    for op in model.get_ordered_ops():  # topological order: producers first
        name = op.get_friendly_name()
        if op.get_type_name() in ("Constant", "Parameter", "Result"):
            continue
        if name.startswith(prefix) or any(v.get_node().get_friendly_name() in head for v in op.input_values()):
            head.add(name)
            names.append(name)
    return names


def cpu_inference_precision() -> str:
    """The floating-point precision OpenVINO computes a model in on this machine's CPU when
    ultralytics' ``YOLO()`` runs it (``export check``, ``eval``, a user's own script):
    ``"f32"`` where ultralytics' OpenVINO backend pins it (Windows, and Linux on ARM64:
    ``ultralytics/nn/backends/openvino.py``, ``INFERENCE_PRECISION_HINT``), else the CPU
    plugin's default (``ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")``):
    ``"bf16"`` on CPUs with AVX-512 BF16 / AMX, ``"f32"`` on other x86 CPUs (module docstring).

    Raises:
        OpenVinoMissing: ``openvino`` is not installed.
    """
    ov, _ = _import(False)
    try:  # the flags the backend itself tests
        from ultralytics.nn.backends import openvino as backend
    except ImportError:  # an ultralytics without that module: its utils define the same flags
        from ultralytics import utils as backend
    if backend.WINDOWS or (backend.LINUX and backend.ARM64):
        return "f32"
    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()  # "bf16", "f32", "f16"


def export_openvino(onnx_in: str | Path, out: str | Path, precision: str = "fp32", images: list[str] | None = None,
                    head: str = "outputs", preset: str = "mixed", overwrite: bool = False) -> dict:
    """Write the OpenVINO model folder ``out`` (module docstring) from the FP32 student ONNX.

    Args:
        onnx_in: the FP32 ONNX from :func:`distillery.export.onnx.export_onnx` (INT8: fixed
            square input).
        out: the folder, named ``NAME_openvino_model``.
        precision: ``fp32`` (weights stored FP32, not compressed to FP16) or ``int8`` (NNCF).
        images: INT8 calibration image paths (:func:`distillery.export.int8.calibration_images`),
            a multiple of the model's fixed batch.
        head: INT8 only, one of :data:`HEAD_MODES`.
        preset: INT8 only, one of :data:`PRESETS`.
        overwrite: replace an existing OpenVINO model folder at ``out``.

    Returns:
        ``{"path": out, "xml": the .xml, "precision", "calibration_images": n (0 for FP32),
        "ignored_ops": operations NNCF kept in floating point by ``head``, "ir": ir_counts(xml)}``.

    Raises:
        OpenVinoMissing: ``openvino`` (or ``nncf``) is not installed.
        CalibrationError: too few or unreadable calibration images, naming them.
        FileExistsError: ``out`` exists, without ``overwrite``.
        ValueError: bad ``precision``/``head``/``preset``, ``out`` (:func:`check_output`), or
            ``onnx_in`` (not a segmentation student's ONNX, already quantized, dynamic input for INT8).
    """
    import onnx

    from distillery.engine.filekinds import onnx_model
    from distillery.export.int8 import (CalibrationError, check_not_quantized, check_readable, fp32_fixed_input,
                                        head_prefix, select_head)

    onnx_meta = onnx_model(onnx_in, "model")
    for value, allowed, what in ((precision, ("fp32", "int8"), "precision"), (head, HEAD_MODES, "head"),
                                 (preset, PRESETS, "preset")):
        if value not in allowed:
            raise ValueError(f"--{what} {value!r} unknown; use one of {', '.join(allowed)}")
    out = check_output(out, overwrite)
    m = onnx.load(str(onnx_in), load_external_data=False)
    int8 = precision == "int8"
    if int8:
        _, imgsz, batch = fp32_fixed_input(onnx_in, m)
        if not images:
            raise CalibrationError("no calibration images given")
        if len(images) % batch:
            raise CalibrationError(f"{onnx_in} has a fixed batch of {batch}: give a multiple of {batch} calibration "
                                   f"images (--calib-images), not {len(images)}")
        check_readable(images, imgsz)
    else:
        check_not_quantized(onnx_in, m)
    ov, nncf = _import(int8)
    model = ov.Core().read_model(str(onnx_in))
    ignored: list[str] = []
    meta = ultralytics_metadata(onnx_meta)
    if int8:
        keep = {"fp32": "all", "outputs": "outputs"}.get(head)
        if keep:
            ignored = select_head(head_ops(model, head_prefix(onnx_in, [n.name for n in m.graph.node])), "", keep)
        level = logging.getLogger("nncf").level
        nncf.set_log_level(logging.WARNING)  # one INFO line per operation otherwise
        try:
            model = nncf.quantize(
                model, nncf.Dataset(_Feed(list(images), imgsz, batch)), subset_size=len(images) // batch,
                preset={"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}[preset],
                ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None)
        finally:
            nncf.set_log_level(level)
        meta.update(distillery_calibration=f"nncf {nncf.__version__} {preset}, {len(images)} images",
                    distillery_head_precision=head, distillery_nncf_version=nncf.__version__)
    # what ultralytics' exporter records for OpenVINO's Model API (exporter.py, export_openvino)
    for value, key in (("YOLO", "model_type"), (True, "reverse_input_channels"), (114, "pad_value"),
                       ([255.0], "scale_values"), (0.7, "iou_threshold"), ("fit_to_window_letterbox", "resize_type"),
                       ([str(v).replace(" ", "_") for v in meta["names"].values()], "labels")):
        model.set_rt_info(value, ["model_info", key])
    meta.update(distillery_precision=precision, distillery_openvino_version=ov.__version__,
                distillery_source_onnx=f"{Path(onnx_in).name} sha256:{hashlib.sha256(Path(onnx_in).read_bytes()).hexdigest()}")
    stem = out.name[: -len(SUFFIX)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the folder is an ordinary output
        ov.save_model(model, str(tmp / f"{stem}.xml"), compress_to_fp16=False)
        (tmp / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
        if out.exists():
            shutil.rmtree(out)  # check_output: an OpenVINO model folder, and overwrite was asked for
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    xml = out / f"{stem}.xml"
    return {"path": str(out), "xml": str(xml), "precision": precision,
            "calibration_images": len(images) if int8 else 0, "ignored_ops": len(ignored), "ir": ir_counts(xml)}


def ir_counts(xml_path: str | Path) -> dict:
    """What the IR (``*.xml``, OpenVINO IR v10/v11) holds, read as XML (no OpenVINO needed):
    ``{"layers": n, "FakeQuantize": n, "low_precision_constants": n (``Const`` layers of
    element type :data:`LOW_PRECISION`), "float_constants": n (``f32``/``f16``/``bf16``)}``.
    An NNCF INT8 model has FakeQuantize layers and INT8 weight constants; an FP32 one neither."""
    layers = ET.parse(str(xml_path)).getroot().iter("layer")
    counts = {"layers": 0, "FakeQuantize": 0, "low_precision_constants": 0, "float_constants": 0}
    for layer in layers:
        counts["layers"] += 1
        kind = layer.get("type")
        if kind == "FakeQuantize":
            counts["FakeQuantize"] += 1
        elif kind == "Const":
            data = layer.find("data")
            et = data.get("element_type") if data is not None else None
            if et in LOW_PRECISION:
                counts["low_precision_constants"] += 1
            elif et in ("f32", "f16", "bf16"):
                counts["float_constants"] += 1
    return counts
