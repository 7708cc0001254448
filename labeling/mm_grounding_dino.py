"""MM-Grounding-DINO detection teacher (``detector.kind: mm-grounding-dino``).

MM-Grounding-DINO is the mmdetection re-training of Grounding DINO (Zhao et al. 2024,
"An Open and Comprehensive Pipeline for Unified Object Grounding and Detection",
arXiv:2401.02361). transformers ships it as ``MMGroundingDinoForObjectDetection``
(``models/mm_grounding_dino``, a modular copy of Grounding DINO): the same Swin backbone,
BERT text encoder, fusion encoder and decoder, the same outputs (``logits``
``(B, Q, max_text_len)``, ``pred_boxes`` ``(B, Q, 4)`` normalised cxcywh of the unpadded
resized image) and the same processor (``GroundingDinoProcessor``: ``AutoProcessor`` maps
``mm-grounding-dino`` to it). The differences are weights and two config defaults (class and
box heads shared across decoder layers), so the teacher is :class:`GroundingDinoTeacher` with
another model class: the prompt chunks, token-span soft scores, merge, image-feature cache
(``model.backbone`` / ``model.input_proj_vision`` exist under the same names and are called
positionally, see :mod:`distillery.labeling.detector_cache`) and peft LoRA adapters all apply.
"""

from __future__ import annotations

from distillery.labeling.detector import GroundingDinoTeacher


class MMGroundingDinoTeacher(GroundingDinoTeacher):
    """:class:`~distillery.labeling.detector.GroundingDinoTeacher` loading
    ``MMGroundingDinoForObjectDetection`` (e.g. ``openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg_v3det``);
    arguments, outputs and errors as there."""

    model_class = "MMGroundingDinoForObjectDetection"
