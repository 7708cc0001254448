"""Per-device TensorRT engines from the QDQ ONNX, with a manifest that pins them to the
TensorRT version and GPU they were built for.

TensorRT 11 builds INT8 only from explicit Q/DQ (no builder INT8 flag, no calibrators), so
the network is created *strongly typed* (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``):
precisions come from the ONNX (Q/DQ -> INT8, the FP32 head stays FP32), none are chosen by
the builder. ``tensorrt`` is an optional extra (``pip install -e '.[tensorrt]'`` on a GPU
machine); everything here except :func:`build_engine` / :func:`load_engine` runs without it.

Manifest (``<engine>.json``): ``tensorrt_version``, ``gpu_name``, ``compute_capability``,
``input_name``, ``input_shape``, ``onnx_sha256``, ``profile`` (the device profile), ``built``.
An engine is refused (:class:`EngineMismatch`) on another TensorRT version or another GPU
(compute capability or name): TensorRT engines are not portable across either
(TensorRT developer guide, "Engine compatibility").
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field

from distillery.engine.cli_errors import MissingExtra, install_hint
from distillery.engine.config import ConfigError, load_yaml
from distillery.engine.schema import StrictConfig, validate_config


class EngineMismatch(RuntimeError):
    """The engine was built for another TensorRT version or GPU; rebuild it on this device."""


class DeviceProfile(StrictConfig):
    """A target device (``configs/devices/*.yaml``), validated by pydantic.

    Attributes:
        name: profile name (the file stem when the file has none); imgsz: square input size
        (px, a multiple of 32, the YOLOv8 stride); batch: fixed batch; workspace_mib: builder
        memory pool limit (MiB, at least 64); dla_core: DLA core to build for (Jetson
        Orin/Xavier) or None for the GPU; gpu_fallback: let layers DLA cannot run fall back to
        the GPU; optimization_level: TensorRT builder optimisation level 0-5
        (``IBuilderConfig.builder_optimization_level``).
    """

    model_config = ConfigDict(frozen=True)

    name: Annotated[str, Field(min_length=1)]
    imgsz: Annotated[int, Field(gt=0, multiple_of=32)] = 640
    batch: Annotated[int, Field(ge=1)] = 1
    workspace_mib: Annotated[int, Field(ge=64)] = 2048
    dla_core: Annotated[int, Field(ge=0)] | None = None
    gpu_fallback: bool = True
    optimization_level: Annotated[int, Field(ge=0, le=5)] = 3

    @classmethod
    def load(cls, path: str | Path) -> "DeviceProfile":
        """Parse and validate a profile YAML.

        Raises:
            ConfigError: missing file, invalid YAML, a key given twice, an unknown key, a wrong
                type or a value out of range; one line per bad key naming the file, the key and
                the allowed values.
        """
        d = load_yaml(path, "device profile")
        if isinstance(d, dict):
            d = {"name": Path(path).stem, **d}
        return validate_config(cls, d, str(path), ConfigError)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def runtime_info() -> dict:
    """This machine's TensorRT version and GPU (name, compute capability ``"8.7"``).

    Raises:
        RuntimeError: no CUDA GPU.
        distillery.engine.cli_errors.MissingExtra: ``tensorrt`` not installed.
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; none is visible on this machine")
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingExtra(f"tensorrt is not installed; on the GPU machine: {install_hint('tensorrt')}") from e
    major, minor = torch.cuda.get_device_capability(0)
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(0),
            "compute_capability": f"{major}.{minor}"}


def check_compatible(manifest: dict, runtime: dict) -> None:
    """Raise :class:`EngineMismatch` unless the engine's TensorRT version, compute capability
    and GPU name equal this runtime's (pure logic; no GPU needed)."""
    problems = []
    if manifest.get("tensorrt_version") != runtime.get("tensorrt_version"):
        problems.append(f"TensorRT {manifest.get('tensorrt_version')} (this machine: {runtime.get('tensorrt_version')})")
    if manifest.get("compute_capability") != runtime.get("compute_capability"):
        problems.append(f"compute capability {manifest.get('compute_capability')} "
                        f"(this machine: {runtime.get('compute_capability')})")
    if manifest.get("gpu_name") != runtime.get("gpu_name"):
        problems.append(f"GPU {manifest.get('gpu_name')!r} (this machine: {runtime.get('gpu_name')!r})")
    if problems:
        raise EngineMismatch("engine was built for " + "; ".join(problems) +
                             ": build it on this device with `distillery export engine`")


def manifest_path(engine: str | Path) -> Path:
    return Path(str(engine) + ".json")


def build_engine(onnx_path: str | Path, profile: DeviceProfile, out: str | Path) -> dict:
    """Build a strongly typed TensorRT engine from the QDQ ONNX for ``profile``; write it to
    ``out`` and its manifest beside it; return the manifest.

    Raises:
        RuntimeError: no GPU / TensorRT, or the ONNX does not parse or build (TensorRT's errors
        are included); ValueError: not an ONNX model, or its input shape does not match the profile.
    """
    import onnx

    from distillery.engine.filekinds import onnx_model

    onnx_model(onnx_path, "model", student=False, hint="give the *.trt.onnx written by `distillery export int8`")
    rt = runtime_info()
    import tensorrt as trt

    m = onnx.load(str(onnx_path), load_external_data=False)
    inp = m.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    want = [profile.batch, 3, profile.imgsz, profile.imgsz]
    if dims != want:
        raise ValueError(f"{onnx_path}: input {dims} does not match profile {profile.name} ({want}); "
                         f"export with --imgsz {profile.imgsz} --batch {profile.batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
    config.builder_optimization_level = profile.optimization_level
    if profile.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = profile.dla_core
        if profile.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} for profile {profile.name}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(blob))
    manifest = {**rt, "input_name": inp.name, "input_shape": dims, "onnx": str(onnx_path),
                "onnx_sha256": file_sha256(onnx_path), "profile": profile.model_dump(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest_path(out).write_text(json.dumps(manifest, indent=2))
    return manifest


def load_engine(path: str | Path):
    """Deserialize an engine after checking its manifest against this machine.

    Raises:
        FileNotFoundError: no engine or manifest; EngineMismatch: built elsewhere.
    """
    mp = manifest_path(path)
    if not Path(path).is_file() or not mp.is_file():
        raise FileNotFoundError(f"engine {path} or its manifest {mp} is missing")
    check_compatible(json.loads(mp.read_text()), runtime_info())
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    return runtime.deserialize_cuda_engine(Path(path).read_bytes())
