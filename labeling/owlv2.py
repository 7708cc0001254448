"""OWLv2 detection teacher (``detector.kind: owlv2``), with soft per-class scores.

OWLv2 (Minderer et al. 2023, "Scaling Open-Vocabulary Object Detection", arXiv:2306.09683;
transformers ``Owlv2ForObjectDetection``) predicts one box per image patch and scores every
box against every text query *separately*: a query's logit is the (shifted, scaled) cosine
of the patch's class embedding and the query's CLIP text embedding (``Owlv2ClassPredictionHead``),
trained with a per-query sigmoid focal loss. There is no caption and no token span, unlike
Grounding DINO: one query per ontology prompt.

``Owlv2Teacher`` is a callable-class model stage with the steps of
:class:`~distillery.labeling.detector.GroundingDinoTeacher`:

* :meth:`preprocess` -- the model's own image processor (``Owlv2ImageProcessor``: rescale,
  pad bottom and right with zeros to a square of side ``max(H, W)``, resize to the config's
  square input, CLIP normalisation);
* :meth:`forward` -- raw ``logits`` ``(B, P, Q_k)`` of query batch ``k`` (at most
  ``queries_per_call`` prompts) and ``pred_boxes`` ``(B, P, 4)``, normalised cxcywh of the
  *padded square*; the vision tower, the box head and the patch class embeddings run once per
  image batch and are reused by every query batch (the text tower runs once, in ``__init__``);
* :meth:`postprocess` -- sigmoid per query, max over a class's prompts, boxes to xyxy pixels
  of the original frame, ``box_floor``, the merge into one instance per object and
  ``max_detections``.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert, clip_boxes_to_image

from distillery.labeling.detector import (DTYPES, Detections, check_precision_and_merge,
                                         merge_agnostic, merge_class_aware, resolve_device)
from distillery.labeling.ontology import Ontology, OntologyError


#: text queries per class-head call (``Owlv2Teacher(queries_per_call=...)``'s default)
QUERIES_PER_CALL = 64


def check_prompts(ontology: Ontology, tokenizer, limit: int) -> None:
    """Raise :class:`~distillery.labeling.ontology.OntologyError` naming the first prompt longer than
    ``limit`` tokens (start/end tokens included; ``text_config.max_position_embeddings``, 16 for
    the released OWLv2 checkpoints), which the text tower cannot embed."""
    for p in ontology.prompts:
        n = len(tokenizer(p)["input_ids"])
        if n > limit:
            raise OntologyError(f"prompt {p!r} is {n} tokens with the start/end tokens; OWLv2's text encoder "
                                f"takes at most {limit}: shorten it")


class Owlv2Teacher:
    """OWLv2 boxes with a soft score per ontology class.

    Args:
        model: a local directory or hub id that ``transformers`` loads with ``from_pretrained``
            (``Owlv2Processor`` and ``Owlv2ForObjectDetection``), e.g.
            ``google/owlv2-base-patch16-ensemble``.
        ontology: prompts and classes; each prompt is one text query.
        revision: hub revision; ignored for local directories.
        device, precision, box_floor, nms_iou, merge, max_detections: as
            :class:`~distillery.labeling.detector.GroundingDinoTeacher`.
        image_size: must be None: OWLv2's input is its config's square (960 for B/16), fixed by
            its learned position embeddings.
        adapter: must be None (LoRA adapters are trained for the Grounding DINO kinds).
        queries_per_call: text queries scored per class-head call (the scores of a query do
            not depend on the others, so labels are the same for any value; not in the
            fingerprint).

    Raises:
        ValueError: unknown ``precision`` or ``merge``; ``image_size`` or ``adapter`` given.
        OSError: the model cannot be found or loaded (transformers' own message).
        labeling.ontology.OntologyError: a prompt is longer than the text tower's positions
            (16 tokens for the released checkpoints).
    """

    model_class = "Owlv2ForObjectDetection"

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
        queries_per_call: int = QUERIES_PER_CALL,
    ) -> None:
        check_precision_and_merge(precision, merge)
        if image_size is not None:
            raise ValueError("detector.image_size does not apply to kind owlv2 (its input is the model config's "
                             "square); remove the key")
        if adapter is not None:
            raise ValueError("detector.adapter is for the grounding-dino kinds; kind owlv2 takes no LoRA adapter")
        if queries_per_call < 1:
            raise ValueError(f"queries_per_call must be >= 1, got {queries_per_call}")
        self.device = resolve_device(device)
        self.dtype = DTYPES[precision] if self.device.type == "cuda" else torch.float32
        import transformers
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model, revision=revision)
        self.model = getattr(transformers, self.model_class).from_pretrained(model, revision=revision)
        self.model.to(self.device, self.dtype).eval()
        self.ontology = ontology
        self.merge = merge
        self.box_floor = float(box_floor)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        n = len(ontology.prompts)
        #: prompt indices of each query batch, in ontology order
        self.query_batches = [list(range(i, min(i + queries_per_call, n))) for i in range(0, n, queries_per_call)]
        self._prompt_class = torch.tensor(ontology.prompt_class, dtype=torch.long)
        self._query_embeds = self._embed_queries()

    @torch.inference_mode()
    def _embed_queries(self) -> torch.Tensor:
        """``(num_prompts, D)`` text embeddings, L2-normalised as ``Owlv2Model.forward`` does before
        ``Owlv2ForObjectDetection`` hands them to the class head."""
        limit = int(self.model.config.text_config.max_position_embeddings)
        tok = self.processor.tokenizer
        check_prompts(self.ontology, tok, limit)
        text = tok(list(self.ontology.prompts), padding="max_length", max_length=limit, return_tensors="pt")
        out = self.model.owlv2.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                 attention_mask=text["attention_mask"].to(self.device))
        emb = out.pooler_output
        return emb / torch.linalg.norm(emb, ord=2, dim=-1, keepdim=True)

    # -- steps -------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> dict:
        """RGB uint8 ``(H, W, 3)`` images -> ``{"pixel_values": (B, 3, S, S)}`` (S: the config's
        ``vision_config.image_size``), each image padded bottom/right to a ``max(H, W)`` square
        then resized, on the model's device and dtype. :meth:`forward` adds the image features
        it computes to this dict (keys ``_feats``, ``_boxes``) so later query batches reuse them."""
        out = self.processor.image_processor(images=list(images), return_tensors="pt",
                                             input_data_format="channels_last")
        return {"pixel_values": out["pixel_values"].to(self.device, self.dtype)}

    @torch.inference_mode()
    def forward(self, inputs: dict, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw output for query batch ``batch``: ``logits`` float32 ``(B, P, Q_k)`` (one column per
        prompt of ``query_batches[batch]``) and ``pred_boxes`` float32 ``(B, P, 4)`` normalised
        cxcywh of the padded square, on CPU; ``P`` patches. The same operations as
        ``Owlv2ForObjectDetection.forward`` (``image_embedder``, ``class_predictor``, ``box_predictor``)."""
        m = self.model
        if "_feats" not in inputs:
            feature_map = m.image_embedder(pixel_values=inputs["pixel_values"])[0]  # (B, h, w, D)
            b, h, w, d = feature_map.shape
            inputs["_feats"] = feature_map.reshape(b, h * w, d)
            inputs["_boxes"] = m.box_predictor(inputs["_feats"], feature_map).float().cpu()
        feats = inputs["_feats"]
        queries = self._query_embeds[self.query_batches[batch]].to(feats.dtype)
        logits, _ = m.class_predictor(feats, queries.expand(feats.shape[0], -1, -1))
        return logits.float().cpu(), inputs["_boxes"]

    def postprocess(self, outputs: list[tuple[torch.Tensor, torch.Tensor]],
                    sizes: list[tuple[int, int]]) -> list[Detections]:
        """Per-query raw outputs -> detections per image.

        Args:
            outputs: per query batch, ``(logits, pred_boxes)`` as returned by :meth:`forward`.
            sizes: per image, ``(height, width)`` of the original frame.

        Rules, and where they come from:

        * a query's score is ``sigmoid(logit)``, each query on its own (OWLv2's per-query sigmoid
          focal loss; transformers ``Owlv2ImageProcessor.post_process_object_detection`` applies
          the sigmoid the same way, then keeps only the best query);
        * a class's score is the max over its prompts' scores (as the Grounding DINO teacher);
          the objectness head is not used (transformers' text-query post-processing ignores it);
        * boxes: cxcywh -> xyxy, times ``max(H, W)`` on both axes, because the processor pads
          the image to a square of that side at the top-left before resizing (transformers
          ``owlv2.image_processing_owlv2._scale_boxes``); then clipped to ``(H, W)`` and dropped
          if empty or if their best class score is below ``box_floor``;
        * one instance per object: :func:`~distillery.labeling.detector.merge_agnostic` (or
          ``merge_class_aware``, every query batch's columns being filled for every box) at
          ``nms_iou``, then the best ``max_detections``.
        """
        C = len(self.ontology.classes)
        results = []
        for i, (h, w) in enumerate(sizes):
            prompt_scores = torch.cat([torch.sigmoid(logits[i]) for logits, _ in outputs], dim=1)  # (P, prompts)
            cls = torch.zeros(prompt_scores.shape[0], C)
            cls.scatter_reduce_(1, self._prompt_class.expand(prompt_scores.shape[0], -1), prompt_scores, reduce="amax")
            side = float(max(h, w))
            xyxy = clip_boxes_to_image(box_convert(outputs[0][1][i], "cxcywh", "xyxy") * side, (h, w))
            keep = (cls.max(dim=1).values >= self.box_floor) & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
            boxes, scores = xyxy[keep], cls[keep]
            if self.merge == "agnostic":
                kept, kept_scores = merge_agnostic(boxes, scores, self.nms_iou)
            else:
                kept, kept_scores = merge_class_aware(boxes, scores, torch.zeros(len(boxes), dtype=torch.long),
                                                      self.nms_iou)
            n = self.max_detections
            results.append(Detections(boxes[kept[:n]].numpy().astype(np.float32),
                                      kept_scores[:n].numpy().astype(np.float32)))
        return results

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        """Detect on RGB uint8 ``(H, W, 3)`` images; one :class:`Detections` per image."""
        if not len(images):
            return []
        sizes = [tuple(im.shape[:2]) for im in images]
        inputs = self.preprocess(images)
        outputs = [self.forward(inputs, k) for k in range(len(self.query_batches))]
        return self.postprocess(outputs, sizes)
