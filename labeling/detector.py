"""Grounding DINO detection teacher (transformers), with soft per-class scores.

``GroundingDinoTeacher`` is a callable-class model stage: it loads once in ``__init__``
and maps a list of images to boxes and soft score vectors in ``__call__``. The three
steps are separate methods so each can be checked alone:

* :meth:`preprocess` -- the model's own image processor (resize shortest edge to
  ``image_size["shortest_edge"]``, longest at most ``image_size["longest_edge"]``,
  ImageNet normalisation, pad with a pixel mask);
* :meth:`forward` -- one model call per prompt chunk, returning raw ``logits``
  ``(B, Q, max_text_len)`` and ``pred_boxes`` ``(B, Q, 4)`` in normalised cxcywh of the
  unpadded resized image (transformers ``GroundingDinoObjectDetectionOutput``); the
  image-only part of the model (Swin backbone, input projections, masks, position
  embeddings) runs once per image batch and is reused by every chunk
  (:class:`distillery.labeling.detector_cache.ImageFeatureCache`);
* :meth:`postprocess` -- sigmoid, token spans -> per-class scores (see
  :mod:`distillery.labeling.ontology`), boxes to xyxy absolute pixels of the original frame,
  and the merge of all chunks' boxes into one instance per object (:func:`merge_agnostic`),
  or, as an option, class-aware NMS (:func:`merge_class_aware`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms, box_convert, box_iou, clip_boxes_to_image, nms

from distillery.labeling.detector_cache import ImageFeatureCache
from distillery.labeling.ontology import Ontology, build_chunks


@dataclass
class Detections:
    """Detector output for one image: ``boxes`` float32 ``(N, 4)`` xyxy absolute pixels of the
    original frame; ``scores`` float32 ``(N, C)`` soft class scores in [0, 1]."""

    boxes: np.ndarray
    scores: np.ndarray


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when a GPU is visible, else ``cpu``; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: How boxes of all prompt chunks become instances (the preset's ``detector.merge``).
MERGE_MODES = ("agnostic", "class-aware")


def merge_agnostic(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One instance per object: class-agnostic NMS, each kept box taking the element-wise
    max of the soft vectors of the boxes it suppressed.

    Greedy NMS (``torchvision.ops.nms`` on each box's best class score) keeps a box unless
    a better box overlaps it at IoU > ``iou_threshold``; a removed box joins the group of
    the best kept box that overlaps it (the one that removed it). The group's soft vector
    is the element-wise max over its members, so an object seen by two prompt chunks, or
    by two queries peaked on different classes, comes out once with both classes' scores.

    Args:
        boxes: float32 ``(M, 4)`` xyxy, any one frame.
        scores: float32 ``(M, C)`` soft class scores, non-negative.
        iou_threshold: IoU (``torchvision.ops.box_iou``) above which two boxes are one object.

    Returns:
        ``keep`` int64 ``(K,)`` indices into ``boxes`` of the kept boxes, best first, and
        their merged soft vectors float32 ``(K, C)``.
    """
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long), scores[:0].clone()
    keep = nms(boxes, scores.max(dim=1).values, iou_threshold)
    over = box_iou(boxes[keep], boxes) > iou_threshold  # (K, M)
    owner = over.to(torch.uint8).argmax(dim=0)  # first (best) kept box overlapping each box
    owner[keep] = torch.arange(len(keep))
    member = over.any(dim=0)
    member[keep] = True
    merged = torch.zeros(len(keep), scores.shape[1], dtype=scores.dtype)
    index = owner[member][:, None].expand(-1, scores.shape[1])
    merged.scatter_reduce_(0, index, scores[member], reduce="amax")
    return keep, merged


def merge_class_aware(
    boxes: torch.Tensor, scores: torch.Tensor, chunk_of: torch.Tensor, iou_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-aware NMS (``torchvision.ops.batched_nms`` on each box's argmax class); a kept
    box then takes, for the columns of other prompt chunks, the best score of that chunk's
    boxes overlapping it at IoU >= ``iou_threshold``. Boxes of one object whose argmax
    classes differ all stay (one instance per class).

    Args:
        boxes: float32 ``(M, 4)`` xyxy; scores: float32 ``(M, C)``; chunk_of: int64 ``(M,)``
            the prompt chunk of each box.

    Returns:
        ``keep`` int64 ``(K,)`` best first, and the kept soft vectors float32 ``(K, C)``.
    """
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long), scores[:0].clone()
    best, label = scores.max(dim=1)
    keep = batched_nms(boxes, best, label, iou_threshold)
    kept = scores[keep].clone()
    near = (box_iou(boxes[keep], boxes) >= iou_threshold) & (chunk_of[None, :] != chunk_of[keep][:, None])
    for r in range(len(keep)):
        if near[r].any():
            kept[r] = torch.maximum(kept[r], scores[near[r]].max(dim=0).values)
    return keep, kept


def check_precision_and_merge(precision: str, merge: str) -> None:
    """The settings every detector kind shares. Raises ValueError naming the allowed values."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {', '.join(MERGE_MODES)}, got {merge!r}")


class GroundingDinoTeacher:
    """Grounding DINO boxes with a soft score per ontology class.

    Args:
        model: a local directory or hub id that ``transformers`` loads with
            ``from_pretrained`` (processor and ``GroundingDinoForObjectDetection``), e.g.
            ``IDEA-Research/grounding-dino-tiny``.
        ontology: prompts and classes.
        revision: hub revision (branch, tag or commit); ignored for local directories.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (half precisions only on GPU).
        box_floor: keep a box when its best class score is at least this (default 0.05:
            later stages threshold; soft labels need the low end).
        nms_iou: IoU above which a lower-scored box is merged into a better one (``merge``
            says whether classes must match). Default 0.7, not 0.5: Grounding DINO, like
            DETR, rarely emits duplicates within one caption, and at 0.5 NMS removes real,
            overlapping objects. Of coco128's 929 non-crowd instances, 15 overlap one of
            their class above 0.5 and 4 above 0.7; 23 overlap another class above 0.5 and
            12 above 0.7 (6 pairs: a person on a chair at 0.92, a car and a truck at 0.75...).
        merge: ``"agnostic"`` (default): one instance per object, boxes of all classes and
            chunks merged by IoU, soft vector the element-wise max over the merged boxes
            (:func:`merge_agnostic`); right for pseudo-labels, where a student trained on
            two boxes of one object learns duplicates. ``"class-aware"``: NMS per argmax
            class (:func:`merge_class_aware`); keeps distinct objects of different classes
            that overlap above ``nms_iou`` but also one box per class on a single object.
        image_size: ``{"shortest_edge": int, "longest_edge": int}`` resize of the processor
            (None keeps the model's own, 800/1333 for the released checkpoints).
        max_detections: at most this many boxes per image after NMS, best first.
        adapter: a peft LoRA adapter directory (``distillery teachers finetune``), loaded onto
            ``model`` and merged into its weights (``merge_and_unload``) for inference.
        reuse_image_features: run the image backbone once per image batch and reuse it for
            every prompt chunk (default True; False reruns it per chunk, the plain
            transformers call, kept for benchmarks and parity tests). Labels are the same
            either way (same operations on the same tensors), so it is not in the fingerprint.

    Raises:
        ValueError: unknown ``precision`` or ``merge``.
        OSError: the model cannot be found or loaded (transformers' own message).
        labeling.ontology.OntologyError: the ontology cannot be tokenized into chunks.
    """

    def __init__(
        self,
        model: str,
        ontology: Ontology,
        *,
        revision: str | None = None,
        device: str = "auto",
        precision: str = "fp32",
        box_floor: float = 0.05,
        nms_iou: float = 0.7,
        image_size: dict | None = None,
        max_detections: int = 300,
        merge: str = "agnostic",
        adapter: str | None = None,
        reuse_image_features: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        check_precision_and_merge(precision, merge)
        self.merge = merge
        self.dtype = DTYPES[precision] if self.device.type == "cuda" else torch.float32
        self.processor, self.model = self.load(model, revision, adapter)
        self.model.to(self.device, self.dtype).eval()
        self.image_cache = ImageFeatureCache(self.model) if reuse_image_features else None
        self.ontology = ontology
        self.max_text_len = int(self.model.config.max_text_len)
        self.use_chunks(build_chunks(ontology, self.processor.tokenizer, self.max_text_len))
        self.box_floor = float(box_floor)
        self.nms_iou = float(nms_iou)
        self.image_size = dict(image_size) if image_size else None
        self.max_detections = int(max_detections)

    #: the transformers model class ``load`` builds (a subclass names another of the same
    #: architecture, e.g. :class:`distillery.labeling.mm_grounding_dino.MMGroundingDinoTeacher`)
    model_class = "GroundingDinoForObjectDetection"

    def load(self, model: str, revision: str | None, adapter: str | None):
        """``(processor, model_class)`` from ``model``; with ``adapter``, the
        LoRA adapter merged into the weights (peft ``merge_and_unload``)."""
        import transformers
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model, revision=revision)
        net = getattr(transformers, self.model_class).from_pretrained(model, revision=revision)
        if adapter is not None:
            from peft import PeftModel

            from distillery.labeling.finetune.detector import peft_ready

            net = PeftModel.from_pretrained(peft_ready(net), adapter).merge_and_unload()
        return processor, net

    def use_chunks(self, chunks: list) -> None:
        """Caption the images with these prompt chunks (:class:`distillery.labeling.ontology.PromptChunk`
        of ``self.ontology``) from now on; ``__init__`` uses :func:`build_chunks` of the whole ontology."""
        self.chunks = list(chunks)
        self._text = [
            self.processor.tokenizer(c.text, return_tensors="pt", return_token_type_ids=True) for c in self.chunks
        ]
        # (P_chunk, L) positive maps and, per chunk, prompt -> class index
        self._posmaps = [torch.from_numpy(c.positive_map) for c in self.chunks]
        self._prompt_class = [
            torch.tensor([self.ontology.prompt_class[p] for p in c.prompt_ids], dtype=torch.long) for c in self.chunks
        ]

    # -- steps -------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """RGB uint8 ``(H, W, 3)`` images -> ``pixel_values`` float ``(B, 3, h, w)`` and ``pixel_mask``
        ``(B, h, w)`` (1 on real pixels, 0 on padding), resized and normalised by the processor,
        on the model's device and ``pixel_values`` in its dtype (moved once, so every chunk's
        :meth:`forward` gets the same tensors and the image cache applies)."""
        kwargs = {"size": self.image_size} if self.image_size else {}
        # channels_last, said outright: the processor otherwise guesses the channel axis from the
        # shape, and a 1x1, 4x4 or 100x1 image reads as channels-first (a crash that took down
        # the whole labelling batch, on every resume)
        out = self.processor.image_processor(images=list(images), return_tensors="pt",
                                             input_data_format="channels_last", **kwargs)
        return {"pixel_values": out["pixel_values"].to(self.device, self.dtype),
                "pixel_mask": out["pixel_mask"].to(self.device)}

    @torch.inference_mode()
    def forward(self, inputs: dict[str, torch.Tensor], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw model output for prompt chunk ``chunk``: ``logits`` ``(B, Q, max_text_len)`` (``-inf``
        past the caption) and ``pred_boxes`` ``(B, Q, 4)`` normalised cxcywh, both float32 on CPU."""
        b = inputs["pixel_values"].shape[0]
        text = {k: v.expand(b, -1).to(self.device) for k, v in self._text[chunk].items()}
        out = self.model(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            pixel_mask=inputs["pixel_mask"].to(self.device),
            **text,
        )
        return out.logits.float().cpu(), out.pred_boxes.float().cpu()

    def postprocess(
        self, outputs: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Merge per-chunk raw outputs into detections per image.

        Args:
            outputs: per chunk, ``(logits, pred_boxes)`` as returned by :meth:`forward`.
            sizes: per image, ``(height, width)`` of the original frame.

        A query of chunk k scores only chunk k's classes: the mean token probability over
        each prompt's span (``positive_map`` rows), then the max over a class's prompts.
        Boxes below ``box_floor`` or empty after clipping are dropped; the rest of all
        chunks are merged (``merge``) and the best ``max_detections`` kept.
        """
        C = len(self.ontology.classes)
        results = []
        for i, (h, w) in enumerate(sizes):
            all_boxes, all_scores, all_chunk = [], [], []
            for k, (logits, boxes) in enumerate(outputs):
                prob = torch.sigmoid(logits[i]).nan_to_num(0.0)  # (Q, L); -inf -> 0
                prompt_scores = prob @ self._posmaps[k].T  # (Q, P_k) mean over each span
                cls = torch.zeros(prob.shape[0], C)
                idx = self._prompt_class[k].expand(prob.shape[0], -1)
                cls.scatter_reduce_(1, idx, prompt_scores, reduce="amax")
                xyxy = box_convert(boxes[i], "cxcywh", "xyxy") * torch.tensor([w, h, w, h], dtype=torch.float32)
                xyxy = clip_boxes_to_image(xyxy, (h, w))
                keep = cls.max(dim=1).values >= self.box_floor
                keep &= (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
                all_boxes.append(xyxy[keep])
                all_scores.append(cls[keep])
                all_chunk.append(torch.full((int(keep.sum()),), k))
            boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
            if self.merge == "agnostic":
                keep, kept_scores = merge_agnostic(boxes, scores, self.nms_iou)
            else:
                keep, kept_scores = merge_class_aware(boxes, scores, torch.cat(all_chunk), self.nms_iou)
            n = self.max_detections
            results.append(Detections(boxes[keep[:n]].numpy().astype(np.float32),
                                      kept_scores[:n].numpy().astype(np.float32)))
        return results

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        """Detect on RGB uint8 ``(H, W, 3)`` images; one :class:`Detections` per image."""
        if not len(images):
            return []
        sizes = [tuple(im.shape[:2]) for im in images]
        inputs = self.preprocess(images)
        with self.image_cache.reuse() if self.image_cache else nullcontext():
            outputs = [self.forward(inputs, k) for k in range(len(self.chunks))]
        return self.postprocess(outputs, sizes)
