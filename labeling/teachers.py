"""Teacher presets (YAML) and the Ray Data model stages built from them.

A preset names the two teachers and their settings::

    detector:                       # Grounding DINO, anything transformers' from_pretrained loads
      model: IDEA-Research/grounding-dino-tiny
      revision: null
      box_floor: 0.05
      nms_iou: 0.7
      merge: agnostic               # agnostic: one instance per object | class-aware: NMS per class
      image_size: {shortest_edge: 800, longest_edge: 1333}
      max_detections: 300
      batch_size: 4
      actors: 1
    segmenter:                      # segment-anything
      model_type: vit_b
      checkpoint: ~/models/sam_vit_b_01ec64.pth
      boxes_per_call: 32
      batch_size: 4
      actors: 1
    device: auto                    # auto | cpu | cuda
    precision: fp32                 # fp32 | fp16 | bf16 (GPU only)

Relative paths (a local detector directory, the SAM checkpoint) are relative to the
preset file's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import pyarrow as pa

from distillery.engine.job import DECODED_SCHEMA, StageSpec, as_table, image_of
from distillery.engine.record import LabelRecord, rows_to_table

#: Decoded columns plus the detector's boxes (float32 N*4, xyxy px) and scores (float32 N*C).
DETECTED_SCHEMA = DECODED_SCHEMA.append(pa.field("boxes", pa.list_(pa.float32()))).append(
    pa.field("scores", pa.list_(pa.float32()))
)
from distillery.labeling.detector import GroundingDinoTeacher
from distillery.labeling.ontology import Ontology
from distillery.labeling.segmenter import SamTeacher


class PresetError(ValueError):
    """A teachers preset is missing, malformed, or names unknown settings."""


@dataclass
class DetectorConfig:
    model: str = "IDEA-Research/grounding-dino-tiny"
    revision: str | None = None
    box_floor: float = 0.05
    nms_iou: float = 0.7
    merge: str = "agnostic"  # labeling.detector.MERGE_MODES
    image_size: dict | None = None
    max_detections: int = 300
    batch_size: int = 4
    actors: int = 1


@dataclass
class SegmenterConfig:
    model_type: str = "vit_b"
    checkpoint: str | None = None
    boxes_per_call: int = 32
    batch_size: int = 4
    actors: int = 1


@dataclass
class TeacherPreset:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    device: str = "auto"
    precision: str = "fp32"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TeacherPreset":
        """Read a preset YAML (see module docstring).

        Raises:
            PresetError: missing file, invalid YAML, unknown keys, wrong types.
        """
        from distillery.engine.config import ConfigError, load_yaml

        p = Path(path).expanduser()
        try:
            data = load_yaml(p, "teachers preset (see configs/teachers/)")
        except ConfigError as e:
            raise PresetError(str(e)) from e
        return cls.from_dict(data or {}, base=p.parent, source=str(p))

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None, source: str = "preset") -> "TeacherPreset":
        """Build and validate (see :meth:`validate`); relative paths resolve against ``base``."""
        if not isinstance(data, dict):
            raise PresetError(f"{source}: a preset is a mapping with detector, segmenter, device, precision")

        def build(kind, values, where):
            if not isinstance(values, dict):
                raise PresetError(f"{source}: {where} must be a mapping")
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise PresetError(f"{source}: unknown key(s) {sorted(unknown)} in {where}; known: {sorted(names)}")
            return kind(**values)

        names = {"detector", "segmenter", "device", "precision"}
        unknown = set(data) - names
        if unknown:
            raise PresetError(f"{source}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
        det = build(DetectorConfig, data.get("detector", {}), "detector")
        seg = build(SegmenterConfig, data.get("segmenter", {}), "segmenter")
        if base is not None:
            local = base / os.path.expanduser(det.model)
            if local.is_dir():
                det.model = str(local.resolve())
            if seg.checkpoint:
                seg.checkpoint = str((base / os.path.expanduser(seg.checkpoint)).resolve())
        preset = cls(det, seg, str(data.get("device", "auto")), str(data.get("precision", "fp32")))
        preset.validate(source)
        return preset

    def validate(self, source: str = "preset") -> None:
        """Check values without loading models.

        Raises:
            PresetError: a count that is not a positive integer, a threshold outside its
                range, an unknown device, precision or SAM model type, half precision on
                ``device: cpu``, a SAM checkpoint that does not exist.
        """
        import torch

        from distillery.labeling.segmenter import SAM_MODEL_TYPES

        d, s = self.detector, self.segmenter
        for where, obj, names in (("detector", d, ("batch_size", "actors", "max_detections")),
                                  ("segmenter", s, ("batch_size", "actors", "boxes_per_call"))):
            for n in names:
                v = getattr(obj, n)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise PresetError(f"{source}: {where}.{n} must be a positive integer, got {v!r}")
        for n, lo, hi in (("box_floor", 0.0, 1.0), ("nms_iou", 0.0, 1.0)):
            v = getattr(d, n)
            if not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise PresetError(f"{source}: detector.{n} must be a number in [{lo}, {hi}], got {v!r}")
        if d.image_size is not None and not (
            isinstance(d.image_size, dict) and set(d.image_size) == {"shortest_edge", "longest_edge"}
            and all(isinstance(v, int) and v > 0 for v in d.image_size.values())
        ):
            raise PresetError(f"{source}: detector.image_size must be {{shortest_edge: int, longest_edge: int}}")
        if d.merge not in ("agnostic", "class-aware"):
            raise PresetError(f"{source}: detector.merge must be agnostic or class-aware, got {d.merge!r}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise PresetError(f"{source}: precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise PresetError(f"{source}: device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from e
            if dev.type not in ("cpu", "cuda"):
                raise PresetError(f"{source}: device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
            if dev.type == "cpu" and self.precision != "fp32":
                raise PresetError(f"{source}: precision {self.precision} needs a GPU; use fp32 with device: cpu")
        if s.model_type not in SAM_MODEL_TYPES:
            raise PresetError(f"{source}: segmenter.model_type must be one of {', '.join(SAM_MODEL_TYPES)}, "
                              f"got {s.model_type!r}")
        if s.checkpoint is not None and not os.path.isfile(s.checkpoint):
            raise PresetError(
                f"{source}: segmenter.checkpoint {s.checkpoint!r} not found: download the {s.model_type} "
                "checkpoint from the segment-anything release (e.g. sam_vit_b_01ec64.pth), or write tiny "
                "test teachers with `distillery teachers tiny DIR`"
            )

    def check_detector(self, ontology: Ontology, source: str = "preset") -> int:
        """Load the detector's tokenizer and config (no weights) and split ``ontology`` into
        prompt chunks, so that a bad model or ontology fails before any label set exists.

        Returns:
            the number of prompt chunks.

        Raises:
            PresetError: the model is neither a local directory nor loadable by
                ``transformers`` (offline and not in the cache, a typo).
            labeling.ontology.OntologyError: the ontology does not tokenize into chunks.
        """
        from transformers import AutoConfig, AutoTokenizer

        from distillery.labeling.ontology import build_chunks

        d = self.detector
        try:
            tok = AutoTokenizer.from_pretrained(d.model, revision=d.revision)
            cfg = AutoConfig.from_pretrained(d.model, revision=d.revision)
        except (OSError, ValueError) as e:
            raise PresetError(
                f"{source}: detector.model {d.model!r} cannot be loaded: it is not a local directory "
                "(relative paths are relative to the preset), and transformers could not load it as a hub "
                f"id (offline and not in the cache?). {type(e).__name__}: {str(e).splitlines()[0]}"
            ) from e
        return len(build_chunks(ontology, tok, int(getattr(cfg, "max_text_len", 256))))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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

    Not in it: batch sizes, actor counts, the device, and ``max_pixels`` (it decides which
    images are labeled, not their labels; a rerun with a larger limit labels the images
    that were too large, in the same label set)."""
    d, s = preset.detector, preset.segmenter
    return {
        "kind": "teacher",
        "ontology": ontology.to_dict(),
        "teachers": {
            "detector": {"type": "grounding-dino", **detector_identity(d.model, d.revision)},
            "segmenter": {
                "type": "segment-anything",
                "model_type": s.model_type,
                "checkpoint_sha256": file_sha256(s.checkpoint) if s.checkpoint else None,
            },
            "precision": preset.precision,
        },
        "preprocessing": {
            "decode": "pillow-exif_transpose-rgb",
            "detector_image_size": d.image_size,
            "segmenter_input": "ResizeLongestSide(1024)",
        },
        "thresholds": {"box_floor": d.box_floor, "nms_iou": d.nms_iou, "max_detections": d.max_detections,
                       "mask_threshold": 0.0, "merge": d.merge},
    }


class DetectStage:
    """Ray Data stage: adds ``boxes`` (float32 N*4, xyxy px) and ``scores`` (float32 N*C)."""

    teacher_class = GroundingDinoTeacher

    def __init__(self, preset: dict, ontology: dict) -> None:
        p = TeacherPreset.from_dict(preset)
        d = p.detector
        self.teacher = self.teacher_class(
            d.model, Ontology.from_dict(ontology), revision=d.revision, device=p.device, precision=p.precision,
            box_floor=d.box_floor, nms_iou=d.nms_iou, image_size=d.image_size, max_detections=d.max_detections,
            merge=d.merge,
        )
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

    teacher_class = SamTeacher

    def __init__(self, preset: dict, num_classes: int) -> None:
        p = TeacherPreset.from_dict(preset)
        s = p.segmenter
        self.teacher = self.teacher_class(
            s.model_type, s.checkpoint, device=p.device, precision=p.precision, boxes_per_call=s.boxes_per_call
        )
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


def teacher_stages(preset: TeacherPreset, ontology: Ontology) -> list[StageSpec]:
    """The detector and segmenter stages for :func:`distillery.engine.job.run_label_job`; each actor asks
    for one GPU when the preset's device is ``auto`` or ``cuda*`` and the cluster has GPUs."""
    gpu = preset.device == "auto" or preset.device.startswith("cuda")
    pd = preset.to_dict()
    return [
        StageSpec(DetectStage, {"preset": pd, "ontology": ontology.to_dict()},
                  preset.detector.batch_size, preset.detector.actors, gpu),
        StageSpec(SegmentStage, {"preset": pd, "num_classes": len(ontology.classes)},
                  preset.segmenter.batch_size, preset.segmenter.actors, gpu),
    ]
