"""Teacher kinds behind one interface: which class builds each preset ``kind``.

Three roles (the label job's stages call nothing else):

* **detector** (``detector.kind``): ``build_detector(preset, ontology)`` -> an object whose
  ``__call__(images)`` takes RGB uint8 ``(H, W, 3)`` arrays and returns one
  :class:`~distillery.labeling.detector.Detections` per image: float32 ``(N, 4)`` xyxy boxes in
  pixels of the original frame and a float32 ``(N, C)`` soft score per ontology class.
* **segmenter** (``segmenter.kind``): ``build_segmenter(preset)`` -> ``__call__(image, boxes)``
  with float32 ``(N, 4)`` xyxy pixel boxes, returning ``N`` compressed COCO RLE dicts
  (``size == [H, W]``) and a float32 ``(N,)`` mask score in [0, 1].
* **grounded segmenter** (``teacher.kind``, e.g. SAM 3): ``build_grounded(preset, ontology)`` ->
  ``__call__(images)`` returning, per image, ``(Detections, rles, mask_score)``.

Each kind registers a builder ``(preset, [ontology,] cls=None) -> teacher`` here; the builder
reads the settings its class needs from the validated
:class:`~distillery.labeling.teachers.TeacherPreset`, and builds ``cls`` instead of its own
class when given (a subclass: the geometry oracles of ``tests/oracle.py`` replace the raw
model output that way). Builders import their model code lazily, so a preset of one kind
never imports another's.
"""

from __future__ import annotations

from typing import Callable

#: ``detector.kind`` -> builder ``(preset, ontology) -> detector``.
DETECTORS: dict[str, Callable] = {}
#: ``segmenter.kind`` -> builder ``(preset) -> segmenter``.
SEGMENTERS: dict[str, Callable] = {}
#: ``teacher.kind`` -> builder ``(preset, ontology) -> grounded segmenter``.
GROUNDED: dict[str, Callable] = {}

#: ``segmenter.kind`` values whose weights are a segment-anything ``checkpoint`` + ``model_type``;
#: every other segmenter kind loads ``segmenter.model`` with transformers' ``from_pretrained``.
CHECKPOINT_SEGMENTERS = ("sam",)


def _grounding_dino(preset, ontology, cls=None):
    from distillery.labeling.detector import GroundingDinoTeacher

    d, p = preset.detector, preset
    return (cls or GroundingDinoTeacher)(d.model, ontology, revision=d.revision, device=p.device, precision=p.precision,
                                box_floor=d.box_floor, nms_iou=d.nms_iou, image_size=d.image_size,
                                max_detections=d.max_detections, merge=d.merge, adapter=d.adapter)


def _sam(preset, cls=None):
    from distillery.labeling.segmenter import SamTeacher

    s, p = preset.segmenter, preset
    return (cls or SamTeacher)(s.model_type, s.checkpoint, device=p.device, precision=p.precision,
                               boxes_per_call=s.boxes_per_call, min_region_area=s.min_region_area)


def _mm_grounding_dino(preset, ontology, cls=None):
    from distillery.labeling.mm_grounding_dino import MMGroundingDinoTeacher

    return _grounding_dino(preset, ontology, cls=cls or MMGroundingDinoTeacher)


def _owlv2(preset, ontology, cls=None):
    from distillery.labeling.owlv2 import Owlv2Teacher

    d, p = preset.detector, preset
    return (cls or Owlv2Teacher)(d.model, ontology, revision=d.revision, device=p.device, precision=p.precision,
                                 box_floor=d.box_floor, nms_iou=d.nms_iou, image_size=d.image_size,
                                 max_detections=d.max_detections, merge=d.merge, adapter=d.adapter)


def _hf_segmenter(default_cls_name):
    def build(preset, cls=None):
        from distillery.labeling import segmenter_hf

        s, p = preset.segmenter, preset
        return (cls or getattr(segmenter_hf, default_cls_name))(
            s.model, revision=s.revision, device=p.device, precision=p.precision, boxes_per_call=s.boxes_per_call,
            min_region_area=s.min_region_area)

    return build


def _sam3(preset, ontology, cls=None):
    from distillery.labeling.sam3 import Sam3Teacher

    t, p = preset.teacher, preset
    return (cls or Sam3Teacher)(t.model, ontology, revision=t.revision, device=p.device, precision=p.precision,
                                box_floor=t.box_floor, nms_iou=t.nms_iou, merge=t.merge,
                                max_detections=t.max_detections, min_region_area=t.min_region_area)


DETECTORS["grounding-dino"] = _grounding_dino
DETECTORS["mm-grounding-dino"] = _mm_grounding_dino
DETECTORS["owlv2"] = _owlv2
SEGMENTERS["sam"] = _sam
SEGMENTERS["sam2"] = _hf_segmenter("Sam2Teacher")  # labeling.segmenter_hf: transformers Sam2Model
SEGMENTERS["sam-hq"] = _hf_segmenter("SamHQTeacher")  # labeling.segmenter_hf: transformers SamHQModel
GROUNDED["sam3"] = _sam3  # labeling.sam3: transformers Sam3Model


def _lookup(table: dict, role: str, kind: str) -> Callable:
    if kind not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ValueError(f"unknown {role} kind {kind!r}; known: {known}")
    return table[kind]


def build_detector(preset, ontology, cls=None):
    """The detector of ``preset.detector.kind`` (``cls``: a subclass of its class to build
    instead). Raises ValueError for an unknown kind."""
    return _lookup(DETECTORS, "detector", preset.detector.kind)(preset, ontology, cls=cls)


def build_segmenter(preset, cls=None):
    """The segmenter of ``preset.segmenter.kind`` (``cls`` as in :func:`build_detector`)."""
    return _lookup(SEGMENTERS, "segmenter", preset.segmenter.kind)(preset, cls=cls)


def _check_sam3(preset, ontology) -> int:
    from distillery.labeling.sam3 import check_teacher

    return check_teacher(preset.teacher.model, preset.teacher.revision, ontology)


#: ``teacher.kind`` -> ``(preset, ontology) -> passes per image batch``: reads the model's config
#: and tokenizer (no weights) and checks the ontology's prompts against them.
GROUNDED_CHECKS: dict[str, Callable] = {"sam3": _check_sam3}


def check_grounded(preset, ontology) -> int:
    """Check ``preset.teacher`` before any label set exists (no weights loaded); returns the
    number of model passes per image batch. Raises ValueError (one line naming ``teacher.model``)
    or ``labeling.ontology.OntologyError``."""
    return _lookup(GROUNDED_CHECKS, "teacher", preset.teacher.kind)(preset, ontology)


def build_grounded(preset, ontology, cls=None):
    """The grounded segmenter of ``preset.teacher.kind`` (``cls`` as in :func:`build_detector`)."""
    return _lookup(GROUNDED, "teacher", preset.teacher.kind)(preset, ontology, cls=cls)
