"""ONNX export of a trained student (ultralytics' exporter), its metadata, the one
preprocessing function shared by calibration and checks, and PyTorch/ONNX parity.

Preprocessing (ultralytics' predictor for a fixed-shape exported model, ``BasePredictor``
``pre_transform`` + ``preprocess``): read BGR with ultralytics' ``imread`` (EXIF orientation
applied by OpenCV), ``LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=32)`` (scale
to fit without changing aspect, pad to the square with value 114, centred), BGR -> RGB,
HWC -> CHW, ``/ 255`` to float32 in [0, 1]. Output: float32 ``(1, 3, imgsz, imgsz)``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

#: Written into the ONNX metadata (``distillery_preprocessing``) and applied by :func:`preprocess`.
PREPROCESSING = {
    "read": "BGR uint8 via ultralytics.utils.patches.imread (EXIF orientation applied)",
    "letterbox": {"auto": False, "scaleup": True, "center": True, "pad_value": 114, "stride": 32},
    "color": "RGB",
    "layout": "NCHW",
    "scale": "1/255",
    "dtype": "float32",
}


def preprocess(path: str, imgsz: int) -> np.ndarray:
    """One image file -> float32 ``(1, 3, imgsz, imgsz)`` exactly as ultralytics feeds an
    exported fixed-shape model (see the module docstring).

    Raises:
        ValueError: the file cannot be read as an image (names the file).
    """
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.patches import imread

    im = imread(str(path))
    if im is None:
        raise ValueError(f"{path}: cannot be read as an image")
    lb = LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=32)(image=im)
    x = lb[..., ::-1].transpose(2, 0, 1)[None]  # BGR -> RGB, HWC -> CHW, batch
    return np.ascontiguousarray(x, dtype=np.float32) / 255.0


def export_onnx(model: str | Path, out: str | Path, imgsz: int = 640, batch: int | str = 1,
                opset: int | None = None) -> Path:
    """Export an ultralytics segmentation checkpoint to ``out`` (ONNX, simplified by onnxslim).

    Args:
        model: the student ``.pt``.
        imgsz: square input size in pixels (a multiple of 32).
        batch: fixed batch size, or ``"dynamic"`` (batch and spatial axes dynamic).
        opset: ONNX opset (default: ultralytics' choice).

    Metadata beside ultralytics' own (``names``, ``imgsz``, ``stride``, ``task``, ``batch``):
    ``distillery_preprocessing`` (:data:`PREPROCESSING`), ``distillery_labelset`` and
    ``distillery_curation_version`` (from the run's ``distillery.json`` when the checkpoint sits
    in a run directory), ``distillery_head`` (the node-name prefix of the detection/mask head).

    Raises:
        ValueError: ``imgsz`` not a multiple of 32 or ``batch`` invalid, or ``model`` missing or
        not an ultralytics segmentation checkpoint
        (:class:`distillery.engine.filekinds.FileKindError`).
    """
    import onnx
    from ultralytics import YOLO

    from distillery.engine.filekinds import ultralytics_checkpoint

    model = ultralytics_checkpoint(model, "model")
    if imgsz % 32:
        raise ValueError(f"--imgsz must be a multiple of 32 (the model's stride), got {imgsz}")
    dynamic = batch == "dynamic"
    if not dynamic and (not str(batch).isdigit() or int(batch) < 1):
        raise ValueError(f"--batch must be a positive integer or 'dynamic', got {batch!r}")
    yolo = YOLO(str(model), task="segment")
    head = f"/model.{len(yolo.model.model) - 1}/"
    from ultralytics.utils import LOGGER

    level = LOGGER.level  # its info lines name the .onnx beside the checkpoint, which is moved to `out` below
    LOGGER.setLevel(logging.WARNING)
    try:
        tmp = Path(yolo.export(format="onnx", imgsz=imgsz, dynamic=dynamic, batch=1 if dynamic else int(batch),
                               simplify=True, opset=opset))
    finally:
        LOGGER.setLevel(level)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), out)
    m = onnx.load(str(out))
    meta = {"distillery_preprocessing": json.dumps(PREPROCESSING), "distillery_head": head}
    info = model.parent.parent / "distillery.json"
    if info.is_file():
        d = json.loads(info.read_text())
        meta["distillery_labelset"] = d.get("labelset")  # its id is the fingerprint of what made it
        meta["distillery_curation_version"] = str(d.get("curation_version"))
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=str(v))
    onnx.save(m, str(out))
    return out


def metadata(path: str | Path) -> dict:
    """The ONNX file's metadata properties as a dict of strings."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def raw_parity(model: str | Path, onnx_path: str | Path, images: list[str], imgsz: int) -> dict:
    """Largest absolute difference of each raw output (``output0`` boxes+scores+mask
    coefficients, ``output1`` mask prototypes) between the PyTorch model (fp32, eval mode)
    and ONNX Runtime (CPU) on the same preprocessed tensors.

    Returns:
        ``{"output0": max_abs, "output1": max_abs, "output0_scale": max |value|, ...}``.
    """
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO

    net = YOLO(str(model), task="segment").model.float().eval()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out: dict = {}
    for p in images:
        x = preprocess(p, imgsz)
        with torch.no_grad():
            y = net(torch.from_numpy(x))
        pt = y[0]  # eval mode: ((boxes+scores+coefficients, prototypes), training dict)
        on = sess.run(None, {name: x})
        for k, (a, b) in enumerate(zip(pt, on)):
            a = a.numpy() if hasattr(a, "numpy") else np.asarray(a)
            key = f"output{k}"
            out[key] = max(out.get(key, 0.0), float(np.abs(a - b).max()))
            out[key + "_scale"] = max(out.get(key + "_scale", 0.0), float(np.abs(a).max()))
    return out
