"""Grounding DINO detection teacher (transformers), with soft per-class scores.

``GroundingDinoTeacher`` is a callable-class model stage: it loads once in ``__init__``
and maps a list of images to boxes and soft score vectors in ``__call__``. The three
steps are separate methods so each can be checked alone:

* :meth:`preprocess` -- the model's own image processor (resize shortest edge to
  ``image_size["shortest_edge"]``, longest at most ``image_size["longest_edge"]``,
  ImageNet normalisation, pad with a pixel mask);
* :meth:`forward` -- one model call per prompt chunk, returning raw ``logits``
  ``(B, Q, max_text_len)`` and ``pred_boxes`` ``(B, Q, 4)`` in normalised cxcywh of the
  unpadded resized image (transformers ``GroundingDinoObjectDetectionOutput``);
* :meth:`postprocess` -- sigmoid, token spans -> per-class scores (see
  :mod:`distillery.labeling.ontology`), boxes to xyxy absolute pixels of the original frame,
  chunk merge and class-aware NMS (``torchvision.ops.batched_nms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms, box_convert, box_iou, clip_boxes_to_image

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
        nms_iou: IoU above which a lower-scored box of the same (argmax) class is removed.
            Default 0.7, not 0.5: Grounding DINO, like DETR, rarely emits duplicates within
            one caption, and at 0.5 NMS removes real, overlapping same-class objects
            (15 of coco128's 939 instances overlap one of their class above 0.5, 4 above 0.7).
        image_size: ``{"shortest_edge": int, "longest_edge": int}`` resize of the processor
            (None keeps the model's own, 800/1333 for the released checkpoints).
        max_detections: at most this many boxes per image after NMS, best first.
        adapter: a peft LoRA adapter directory (``distillery teachers finetune``), loaded onto
            ``model`` and merged into its weights (``merge_and_unload``) for inference.

    Raises:
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
        adapter: str | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self.dtype = DTYPES[precision] if self.device.type == "cuda" else torch.float32
        self.processor, self.model = self.load(model, revision, adapter)
        self.model.to(self.device, self.dtype).eval()
        self.ontology = ontology
        self.max_text_len = int(self.model.config.max_text_len)
        self.use_chunks(build_chunks(ontology, self.processor.tokenizer, self.max_text_len))
        self.box_floor = float(box_floor)
        self.nms_iou = float(nms_iou)
        self.image_size = dict(image_size) if image_size else None
        self.max_detections = int(max_detections)

    def load(self, model: str, revision: str | None, adapter: str | None):
        """``(processor, GroundingDinoForObjectDetection)`` from ``model``; with ``adapter``, the
        LoRA adapter merged into the weights (peft ``merge_and_unload``)."""
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        processor = AutoProcessor.from_pretrained(model, revision=revision)
        net = GroundingDinoForObjectDetection.from_pretrained(model, revision=revision)
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
        ``(B, h, w)`` (1 on real pixels, 0 on padding), resized and normalised by the processor."""
        kwargs = {"size": self.image_size} if self.image_size else {}
        out = self.processor.image_processor(images=list(images), return_tensors="pt", **kwargs)
        return {"pixel_values": out["pixel_values"], "pixel_mask": out["pixel_mask"]}

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

        A query of chunk k scores only chunk k's classes. Boxes of all chunks go through
        class-aware NMS on their best class; a kept box then takes, for the columns of
        other chunks, the best score of that chunk's boxes overlapping it at IoU >=
        ``nms_iou``, so its soft vector covers the whole ontology.
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
            boxes = torch.cat(all_boxes)
            scores = torch.cat(all_scores)
            chunk_of = torch.cat(all_chunk)
            best, label = scores.max(dim=1) if len(scores) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            keep = batched_nms(boxes, best, label, self.nms_iou)[: self.max_detections]
            kept_boxes, kept_scores = boxes[keep], scores[keep].clone()
            if len(outputs) > 1 and len(keep):
                iou = box_iou(kept_boxes, boxes)  # (K, M)
                other = chunk_of[None, :] != chunk_of[keep][:, None]
                near = (iou >= self.nms_iou) & other
                for r in range(len(keep)):
                    if near[r].any():
                        kept_scores[r] = torch.maximum(kept_scores[r], scores[near[r]].max(dim=0).values)
            results.append(Detections(kept_boxes.numpy().astype(np.float32), kept_scores.numpy().astype(np.float32)))
        return results

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        """Detect on RGB uint8 ``(H, W, 3)`` images; one :class:`Detections` per image."""
        if not len(images):
            return []
        sizes = [tuple(im.shape[:2]) for im in images]
        inputs = self.preprocess(images)
        outputs = [self.forward(inputs, k) for k in range(len(self.chunks))]
        return self.postprocess(outputs, sizes)
