"""Teacher presets (YAML) and the Ray Data model stages built from them.

A preset names the two teachers and their settings::

    detector:                       # anything transformers' from_pretrained loads
      kind: grounding-dino          # labeling.kinds.DETECTORS
      model: IDEA-Research/grounding-dino-tiny
      revision: null
      adapter: null                 # a LoRA adapter folder from `distillery teachers finetune`
      box_floor: 0.05
      nms_iou: 0.7
      merge: agnostic               # agnostic: one instance per object | class-aware: NMS per class
      image_size: {shortest_edge: 800, longest_edge: 1333}
      max_detections: 300
      batch_size: 4
      actors: 1
    segmenter:
      kind: sam                     # labeling.kinds.SEGMENTERS; sam: segment-anything, other
      model: null                   #   kinds load `model` (+ revision) with from_pretrained
      model_type: vit_b
      checkpoint: ~/models/sam_vit_b_01ec64.pth
      boxes_per_call: 32
      min_region_area: 100          # px: SAM's clean-up of smaller islands and holes (0: off)
      batch_size: 4
      actors: 1
    teacher: null                   # or {kind: sam3, model: facebook/sam3, revision, box_floor,
                                    #   nms_iou, merge, max_detections, min_region_area,
                                    #   batch_size, actors}: one model (labeling.kinds.GROUNDED)
                                    #   detects and segments; detector and segmenter are unused
    device: auto                    # auto | cpu | cuda
    precision: fp32                 # fp32 | fp16 | bf16 (GPU only)

Relative paths (a local detector directory, the detector adapter, the SAM checkpoint, a local
``teacher.model``) are relative to the preset file's folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator
from typing_extensions import TypedDict

from distillery.engine.schema import StrictConfig, validate_config
from distillery.engine.job import DECODED_SCHEMA, StageSpec, as_table, image_of
from distillery.engine.record import LabelRecord, rows_to_table
from distillery.labeling.ontology import Ontology, OntologyError
from distillery.labeling.segmenter import MIN_REGION_AREA, SAM_MODEL_TYPES

#: Decoded columns plus the detector's boxes (float32 N*4, xyxy px) and scores (float32 N*C).
DETECTED_SCHEMA = DECODED_SCHEMA.append(pa.field("boxes", pa.list_(pa.float32()))).append(
    pa.field("scores", pa.list_(pa.float32()))
)


class PresetError(ValueError):
    """A teachers preset is missing, malformed, or names unknown settings."""


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ImageSize(TypedDict):
    """The detector processor's resize, pixels: the shorter side to ``shortest_edge``, capped
    so the longer side is at most ``longest_edge`` (transformers ``GroundingDinoImageProcessor``)."""

    shortest_edge: PositiveInt
    longest_edge: PositiveInt


def _base(info: ValidationInfo) -> Path | None:
    """The folder relative paths resolve against (``context={"base": ...}``), or None."""
    return (info.context or {}).get("base")


def _registered(table: dict, role: str, v: str) -> str:
    if v not in table:
        raise ValueError(f"unknown {role} kind {v!r}; known: {', '.join(sorted(table)) or 'none in this version'}")
    return v


def _model_dir(v: str | None, info: ValidationInfo) -> str | None:
    """A directory relative to the preset's folder becomes absolute; anything else is a hub id."""
    base = _base(info)
    if v is not None and base is not None and (local := Path(base) / os.path.expanduser(v)).is_dir():
        return str(local.resolve())
    return v


class DetectorConfig(StrictConfig):
    """Detector settings (see the module docstring); ``image_size`` stays a plain dict."""

    kind: str = "grounding-dino"  # labeling.kinds.DETECTORS
    model: str = "IDEA-Research/grounding-dino-tiny"
    revision: str | None = None
    box_floor: Fraction = 0.05
    nms_iou: Fraction = 0.7
    merge: Literal["agnostic", "class-aware"] = "agnostic"  # labeling.detector.MERGE_MODES
    image_size: ImageSize | None = None
    max_detections: PositiveInt = 300
    batch_size: PositiveInt = 4
    actors: PositiveInt = 1
    adapter: str | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from distillery.labeling.kinds import DETECTORS

        return _registered(DETECTORS, "detector", v)

    @field_validator("model")
    @classmethod
    def _local_dir(cls, v: str, info: ValidationInfo) -> str:
        return _model_dir(v, info)

    @field_validator("adapter")
    @classmethod
    def _adapter_dir(cls, v: str | None, info: ValidationInfo) -> str | None:
        """A peft adapter folder (``adapter_config.json`` in it), made absolute against the preset's folder."""
        if v is None:
            return v
        base = _base(info)
        if base is not None:
            v = str((Path(base) / os.path.expanduser(v)).resolve())
        if not (Path(v) / "adapter_config.json").is_file():
            raise ValueError(f"{v!r} is not a LoRA adapter folder (no adapter_config.json in it); give the adapter/ "
                             "folder that `distillery teachers finetune` wrote, or remove the key")
        return v


class SegmenterConfig(StrictConfig):
    """Segmenter settings (see the module docstring): ``kind: sam`` (segment-anything) reads
    ``model_type`` and ``checkpoint``; the other kinds read ``model`` (+ ``revision``), a local
    folder or hub id that transformers' ``from_pretrained`` loads."""

    kind: str = "sam"  # labeling.kinds.SEGMENTERS
    model: str | None = None
    revision: str | None = None
    model_type: Literal[SAM_MODEL_TYPES] = "vit_b"
    checkpoint: str | None = None
    boxes_per_call: PositiveInt = 32
    min_region_area: Annotated[int, Field(ge=0)] = MIN_REGION_AREA  # px (labeling.segmenter.remove_small_regions)
    batch_size: PositiveInt = 4
    actors: PositiveInt = 1

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from distillery.labeling.kinds import SEGMENTERS

        return _registered(SEGMENTERS, "segmenter", v)

    @field_validator("model")
    @classmethod
    def _local_dir(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _model_dir(v, info)

    @model_validator(mode="after")
    def _weights_of_the_kind(self) -> "SegmenterConfig":
        from distillery.labeling.kinds import CHECKPOINT_SEGMENTERS

        if self.kind in CHECKPOINT_SEGMENTERS and self.model is not None:
            raise ValueError(f"kind {self.kind} loads model_type + checkpoint (segment-anything); remove 'model'")
        if self.kind not in CHECKPOINT_SEGMENTERS and (self.model is None or self.checkpoint is not None):
            raise ValueError(f"kind {self.kind} loads 'model' (a folder or hub id for transformers' "
                             "from_pretrained); set it, and remove 'checkpoint'")
        return self

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        base = _base(info)
        if base is not None:
            v = str((Path(base) / os.path.expanduser(v)).resolve())
        if not os.path.isfile(v):
            model_type = info.data.get("model_type", "SAM")
            raise ValueError(
                f"{v!r} not found: download the {model_type} checkpoint from the segment-anything release "
                "(e.g. sam_vit_b_01ec64.pth), or write tiny test teachers with `distillery teachers tiny DIR`"
            )
        return v


class GroundedConfig(StrictConfig):
    """One model that detects and segments from text (``teacher.kind``, e.g. SAM 3)."""

    kind: str  # labeling.kinds.GROUNDED
    model: str
    revision: str | None = None
    box_floor: Fraction = 0.05
    nms_iou: Fraction = 0.7
    merge: Literal["agnostic", "class-aware"] = "agnostic"
    max_detections: PositiveInt = 300
    min_region_area: Annotated[int, Field(ge=0)] = MIN_REGION_AREA  # px, as segmenter.min_region_area
    batch_size: PositiveInt = 4
    actors: PositiveInt = 1

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from distillery.labeling.kinds import GROUNDED

        return _registered(GROUNDED, "teacher", v)

    @field_validator("model")
    @classmethod
    def _local_dir(cls, v: str, info: ValidationInfo) -> str:
        return _model_dir(v, info)


def check_sam_checkpoint(path: str, what: str) -> None:
    """``path`` is a PyTorch state dict (read lazily, ``torch.load(mmap=True,
    weights_only=True)``, when it is a zip-format file; a pre-1.6 ``torch.save`` file is read
    whole), so that a wrong file fails before any label set
    or fine-tuning run exists instead of as an unpickling traceback from inside a stage.

    Raises:
        PresetError: naming ``what`` and what the file is.
    """
    import zipfile

    import torch

    from distillery.engine.filekinds import describe

    try:  # mmap needs the zip format (torch >= 1.6's default); an older .pth is read whole
        sd = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's weights-only unpickler raises many kinds on foreign files
        raise PresetError(f"{what} {path} is {describe(path)}, not a PyTorch state dict of SAM weights; give the "
                          "segment-anything .pth (e.g. sam_vit_b_01ec64.pth)") from e
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PresetError(f"{what} {path} is a PyTorch file but not a state dict of tensors; give the "
                          "segment-anything .pth (e.g. sam_vit_b_01ec64.pth)")


class TeacherPreset(StrictConfig):
    """A teachers preset (see the module docstring); validated by pydantic on construction.
    With ``teacher`` set, that one model labels and ``detector`` / ``segmenter`` are unused."""

    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    teacher: GroundedConfig | None = None
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"

    @field_validator("device")
    @classmethod
    def _torch_device(cls, v: str) -> str:
        if v == "auto":
            return v
        import torch

        try:
            kind = torch.device(v).type
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}") from e
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @model_validator(mode="after")
    def _half_needs_gpu(self) -> "TeacherPreset":
        if self.device != "auto" and self.device.startswith("cpu") and self.precision != "fp32":
            raise ValueError(f"precision {self.precision} needs a GPU; use fp32 with device: cpu")
        return self

    @model_validator(mode="after")
    def _sam_needs_weights(self) -> "TeacherPreset":
        """A segment-anything segmenter without ``checkpoint`` would label with random weights
        (``load_sam(..., None)``), silently: refused unless another ``teacher`` does the work."""
        from distillery.labeling.kinds import CHECKPOINT_SEGMENTERS

        seg = self.segmenter
        if self.teacher is None and seg.kind in CHECKPOINT_SEGMENTERS and seg.checkpoint is None:
            raise ValueError(f"segmenter.checkpoint is not set, so SAM {seg.model_type} would run with random "
                             "weights; set it to the segment-anything checkpoint (the shipped default preset uses "
                             "~/.cache/distillery/sam_vit_b_01ec64.pth), or write tiny test teachers with "
                             "`distillery teachers tiny DIR`")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TeacherPreset":
        """Read a preset YAML (see module docstring); relative paths resolve against its folder.

        Raises:
            PresetError: missing file, invalid YAML, a key given twice, and every error of
                :meth:`from_dict`, each line naming the file.
        """
        from distillery.engine.config import ConfigError, load_yaml

        p = Path(path).expanduser()
        try:
            data = load_yaml(p, "teachers preset (see configs/teachers/)")
        except ConfigError as e:
            raise PresetError(str(e)) from e
        return cls.from_dict({} if data is None else data, base=p.parent, source=str(p))

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None, source: str = "preset") -> "TeacherPreset":
        """Build and validate; relative paths (a local detector directory, the SAM checkpoint)
        resolve against ``base`` when given.

        Raises:
            PresetError: one line per bad key, ``"{source}: {key.path}: {problem}"``: unknown
                keys (with the known ones), wrong types, a count that is not a positive integer,
                a threshold outside [0, 1], an unknown device, precision or SAM model type, half
                precision on ``device: cpu``, a SAM checkpoint that does not exist.
        """
        return validate_config(cls, data, source, PresetError, context={"base": base})

    def validate(self, source: str = "preset") -> None:
        """Check the current values again (e.g. after editing fields) without loading models.

        Raises:
            PresetError: as :meth:`from_dict`.
        """
        validate_config(type(self), self.to_dict(), source, PresetError)

    def check_detector(self, ontology: Ontology, source: str = "preset") -> int:
        """Load the detector's tokenizer and config (no weights) and split ``ontology`` into
        prompt chunks, so that a bad model or ontology fails before any label set exists.

        With ``teacher`` set, checks that model instead (its kind's check,
        :func:`distillery.labeling.kinds.check_grounded`) and nothing else.

        Returns:
            the number of prompt chunks (``owlv2``: of query batches, one query per prompt, whose
            token count it checks instead; ``teacher.kind: sam3``: of prompts, one pass each).

        Raises:
            PresetError: the model is neither a local directory nor loadable by
                ``transformers`` (offline and not in the cache, a typo), or is of another kind.
            labeling.ontology.OntologyError: the ontology does not tokenize into chunks.
        """
        from distillery.labeling.ontology import build_chunks

        if self.teacher is not None:
            from distillery.labeling.kinds import check_grounded

            try:
                return check_grounded(self, ontology)
            except ValueError as e:
                if isinstance(e, OntologyError):
                    raise
                raise PresetError(f"{source}: {e}") from e

        d = self.detector
        cfg, tok = self.detector_text(source)
        self.check_segmenter(source)
        if d.kind == "owlv2":  # one text query per prompt, no caption: the prompts' length is what can fail
            from distillery.labeling.owlv2 import QUERIES_PER_CALL, check_prompts

            check_prompts(ontology, tok, int(cfg.text_config.max_position_embeddings))
            return -(-len(ontology.prompts) // QUERIES_PER_CALL)
        return len(build_chunks(ontology, tok, int(getattr(cfg, "max_text_len", 256))))

    def detector_text(self, source: str = "preset"):
        """``(config, tokenizer)`` of ``detector.model`` (no weights), checked to be of
        ``detector.kind``.

        Raises:
            PresetError: the model is neither a local directory nor loadable by
                ``transformers`` (offline and not in the cache, a typo), or is of another kind.
        """
        from transformers import AutoConfig, AutoTokenizer

        d = self.detector
        local = Path(d.model).is_dir()
        try:
            cfg = AutoConfig.from_pretrained(d.model, revision=d.revision)
            if cfg.model_type != d.kind:  # transformers' model_type names equal the detector kinds
                raise PresetError(f"{source}: detector.model {d.model!r} is a {cfg.model_type!r} model, not the "
                                  f"{d.kind!r} that detector.kind {d.kind} loads; set the kind that matches it")
            tok = AutoTokenizer.from_pretrained(d.model, revision=d.revision)
        except (OSError, ValueError) as e:
            if isinstance(e, PresetError):
                raise
            where = ("a local directory, but transformers cannot load it" if local else
                     "not a local directory (relative paths are relative to the preset), and transformers could "
                     "not load it as a hub id (offline and not in the cache?)")
            raise PresetError(f"{source}: detector.model {d.model!r} cannot be loaded: it is {where}. "
                              f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
        return cfg, tok

    def check_device_here(self, source: str = "preset") -> None:
        """``device`` exists on this machine: for jobs that run here (the local runner, a local
        Ray, fine-tuning), so that ``cuda`` without a GPU fails before a label set is made
        rather than as torch's "Found no NVIDIA driver" traceback from inside a stage.

        Raises:
            PresetError: ``cuda`` / ``cuda:N`` and torch sees no CUDA GPU, or fewer than N+1.
        """
        import torch

        if not self.device.startswith("cuda"):
            return
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = torch.device(self.device).index or 0
        if index >= n:
            seen = "no CUDA GPU" if n == 0 else f"{n} CUDA GPU(s), cuda:0..cuda:{n - 1}"
            raise PresetError(f"{source}: device {self.device}: torch sees {seen} on this machine; set device: auto "
                              "(a GPU when there is one, else the CPU) or cpu")

    def check_segmenter(self, source: str = "preset") -> None:
        """For a ``segmenter.kind`` loaded by ``from_pretrained``: read its config (no weights) and
        check its ``model_type``, so a wrong folder fails before any label set exists.

        Raises:
            PresetError: the model cannot be loaded, or is of another kind (one line naming the key).
        """
        from distillery.labeling.kinds import CHECKPOINT_SEGMENTERS

        s = self.segmenter
        if s.kind in CHECKPOINT_SEGMENTERS:
            if s.checkpoint is not None:
                check_sam_checkpoint(s.checkpoint, f"{source}: segmenter.checkpoint")
            return
        from transformers import AutoConfig

        if not Path(s.model).is_dir() and Path(s.model).suffix in (".pth", ".pt", ".bin", ".safetensors"):
            raise PresetError(f"{source}: segmenter.model {s.model!r} is a weights file; kind {s.kind} loads a "
                              "from_pretrained folder or hub id (segment-anything .pth files are kind sam's checkpoint)")
        from distillery.labeling.segmenter_hf import HFSegmenter

        want = {c.kind: c.model_type for c in HFSegmenter.__subclasses__()}[s.kind]
        try:
            cfg = AutoConfig.from_pretrained(s.model, revision=s.revision)
        except (OSError, ValueError) as e:
            raise PresetError(f"{source}: segmenter.model {s.model!r} cannot be loaded by transformers "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
        if cfg.model_type != want:
            raise PresetError(f"{source}: segmenter.model {s.model!r} is a {cfg.model_type!r} model, not the "
                              f"{want!r} that segmenter.kind {s.kind} loads; set the kind that matches it")

    def to_dict(self) -> dict:
        """Plain, JSON-able nested dict (``image_size`` a dict or None), as stored in manifests."""
        return self.model_dump()


_HASH_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) in this process."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def adapter_sha256(folder: str | os.PathLike) -> str:
    """sha256 of a peft adapter folder: over the sorted names and sha256 of its ``adapter_config.json``
    (rank, scaling, target modules) and weight files (``*.safetensors``, ``*.bin``)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and (f.name == "adapter_config.json" or f.suffix in (".safetensors", ".bin")):
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def detector_identity(model: str, revision: str | None) -> dict:
    """What identifies the detector's weights: for a local directory, sha256 of its config and
    weight files (so moving the folder keeps the id); for a hub id, the id, the revision
    asked for and, when it is in the local cache, the resolved commit."""
    p = Path(model)
    if p.is_dir():
        files = sorted(
            f for f in p.iterdir() if f.suffix in (".json", ".safetensors", ".bin", ".txt") and f.is_file()
        )
        return {"model": p.name, "files": {f.name: file_sha256(f) for f in files}}
    ident = {"model": model, "revision": revision or "main"}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
        if isinstance(cached, str):
            ident["commit"] = Path(cached).parent.name
    except Exception:  # noqa: BLE001 - identity without the commit is still valid
        pass
    return ident


def labelset_spec(ontology: Ontology, preset: TeacherPreset) -> dict:
    """Everything that changes the labels, hashed into the label set id (see engine.store.fingerprint).
    A detector adapter adds its :func:`adapter_sha256` (absent without one, so ids stay as they were).

    Not in it: batch sizes, actor counts, the device, and ``max_pixels`` (it decides which
    images are labeled, not their labels; a rerun with a larger limit labels the images
    that were too large, in the same label set)."""
    d, s = preset.detector, preset.segmenter
    if preset.teacher is not None:
        t = preset.teacher
        return {
            "kind": "teacher",
            "ontology": ontology.to_dict(),
            "teachers": {"teacher": {"type": t.kind, **detector_identity(t.model, t.revision)},
                         "precision": preset.precision},
            # the model's processor, whose config the identity's files cover (sam3: 1008x1008 resize)
            "preprocessing": {"decode": "pillow-exif_transpose-rgb", "teacher_input": f"{t.kind} processor"},
            "thresholds": {"box_floor": t.box_floor, "nms_iou": t.nms_iou, "max_detections": t.max_detections,
                           "merge": t.merge, "mask_threshold": 0.5, "min_region_area": t.min_region_area},
        }
    detector = {"type": d.kind, **detector_identity(d.model, d.revision)}
    if d.adapter is not None:
        detector["adapter_sha256"] = adapter_sha256(d.adapter)
    if s.kind == "sam":  # segment-anything: the type name ids had before other kinds existed
        segmenter = {"type": "segment-anything", "model_type": s.model_type,
                     "checkpoint_sha256": file_sha256(s.checkpoint) if s.checkpoint else None}
    else:
        segmenter = {"type": s.kind, **detector_identity(s.model, s.revision)}
    return {
        "kind": "teacher",
        "ontology": ontology.to_dict(),
        "teachers": {
            "detector": detector,
            "segmenter": segmenter,
            "precision": preset.precision,
        },
        "preprocessing": {
            "decode": "pillow-exif_transpose-rgb",
            "detector_image_size": d.image_size,
            # sam2 / sam-hq: their processor's (SAM 2 stretches to 1024x1024), whose
            # preprocessor_config.json the segmenter's identity already covers
            "segmenter_input": "ResizeLongestSide(1024)" if s.kind == "sam" else f"{s.kind} processor",
        },
        "thresholds": {"box_floor": d.box_floor, "nms_iou": d.nms_iou, "max_detections": d.max_detections,
                       "mask_threshold": 0.0, "merge": d.merge, "min_region_area": s.min_region_area},
    }


class DetectStage:
    """Ray Data stage: adds ``boxes`` (float32 N*4, xyxy px) and ``scores`` (float32 N*C)."""

    #: a subclass of the kind's class to build instead (tests' oracles); None: the kind's own
    teacher_class = None

    def __init__(self, preset: dict, ontology: dict) -> None:
        from distillery.labeling.kinds import build_detector

        self.teacher = build_detector(TeacherPreset.from_dict(preset), Ontology.from_dict(ontology),
                                      cls=self.teacher_class)
        self.num_classes = len(self.teacher.ontology.classes)

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["path"])
        ok = [i for i in range(n) if batch["error"][i] is None]
        dets = dict(zip(ok, self.teacher([image_of(batch, i) for i in ok])))
        empty = np.zeros(0, np.float32)
        batch = dict(batch)
        batch["boxes"] = [dets[i].boxes.reshape(-1) if i in dets else empty for i in range(n)]
        batch["scores"] = [dets[i].scores.reshape(-1) if i in dets else empty for i in range(n)]
        return as_table(batch, DETECTED_SCHEMA)


class SegmentStage:
    """Ray Data stage: SAM masks for the detected boxes; returns ROW_SCHEMA columns (pixels dropped)."""

    #: as :attr:`DetectStage.teacher_class`
    teacher_class = None

    def __init__(self, preset: dict, num_classes: int) -> None:
        from distillery.labeling.kinds import build_segmenter

        self.teacher = build_segmenter(TeacherPreset.from_dict(preset), cls=self.teacher_class)
        self.num_classes = int(num_classes)

    def __call__(self, batch: dict) -> pa.Table:
        rows = []
        C = self.num_classes
        for i in range(len(batch["path"])):
            path, image_id, err = str(batch["path"][i]), str(batch["image_id"][i]), batch["error"][i]
            if err is not None:
                rows.append(LabelRecord.failed(path, str(err), C, image_id).to_row())
                continue
            boxes = np.array(batch["boxes"][i], np.float32).reshape(-1, 4)  # a writable copy for torch
            scores = np.asarray(batch["scores"][i], np.float32).reshape(-1, C)
            masks, mask_score = self.teacher(image_of(batch, i), boxes)
            rec = LabelRecord(
                image_id=image_id, path=path, width=int(batch["width"][i]), height=int(batch["height"][i]),
                num_classes=C, boxes=boxes, scores=scores, masks=masks, mask_score=mask_score,
            )
            rows.append(rec.to_row())
        return rows_to_table(rows)


class GroundedStage:
    """Ray Data stage of a grounded segmenter (``teacher.kind``): boxes, soft scores and masks
    from one model; returns ROW_SCHEMA columns (pixels dropped)."""

    #: as :attr:`DetectStage.teacher_class`
    teacher_class = None

    def __init__(self, preset: dict, ontology: dict) -> None:
        from distillery.labeling.kinds import build_grounded

        self.teacher = build_grounded(TeacherPreset.from_dict(preset), Ontology.from_dict(ontology),
                                      cls=self.teacher_class)
        self.num_classes = len(self.teacher.ontology.classes)

    def __call__(self, batch: dict) -> pa.Table:
        n, C = len(batch["path"]), self.num_classes
        ok = [i for i in range(n) if batch["error"][i] is None]
        out = dict(zip(ok, self.teacher([image_of(batch, i) for i in ok])))
        rows = []
        for i in range(n):
            path, image_id = str(batch["path"][i]), str(batch["image_id"][i])
            if i not in out:
                rows.append(LabelRecord.failed(path, str(batch["error"][i]), C, image_id).to_row())
                continue
            det, masks, mask_score = out[i]
            rows.append(LabelRecord(
                image_id=image_id, path=path, width=int(batch["width"][i]), height=int(batch["height"][i]),
                num_classes=C, boxes=det.boxes, scores=det.scores, masks=masks, mask_score=mask_score,
            ).to_row())
        return rows_to_table(rows)


def teacher_stages(preset: TeacherPreset, ontology: Ontology) -> list[StageSpec]:
    """The detector and segmenter stages (named ``detect`` and ``segment`` in the job summary's
    timings), or with ``teacher`` set the one grounded stage (``label``), for
    :func:`distillery.engine.job.run_label_job`; each actor asks
    for a share of the GPUs (:func:`~distillery.engine.job.plan_actor_gpus`) when the preset's device
    is ``auto`` or ``cuda*`` and the cluster has GPUs."""
    gpu = preset.device == "auto" or preset.device.startswith("cuda")
    pd = preset.to_dict()
    if preset.teacher is not None:
        return [StageSpec(GroundedStage, {"preset": pd, "ontology": ontology.to_dict()},
                          preset.teacher.batch_size, preset.teacher.actors, gpu, name="label")]
    return [
        StageSpec(DetectStage, {"preset": pd, "ontology": ontology.to_dict()},
                  preset.detector.batch_size, preset.detector.actors, gpu, name="detect"),
        StageSpec(SegmentStage, {"preset": pd, "num_classes": len(ontology.classes)},
                  preset.segmenter.batch_size, preset.segmenter.actors, gpu, name="segment"),
    ]
