"""SAM 3 grounded segmenter teacher (``teacher.kind: sam3``): boxes, soft class scores and masks
from text prompts, one model.

SAM 3 (Carion et al. 2025, "SAM 3: Segment Anything with Concepts", arXiv:2511.16719; transformers
``Sam3Model`` + ``Sam3Processor``) finds every instance of one *concept* (a short noun phrase) per
forward: a ViT image encoder (1008x1008 input, 14-pixel patches) feeds a DETR-style encoder and
decoder conditioned on the phrase's CLIP text features; each of the decoder's queries (200 in the
released model) has a box, a mask and a logit, and a *presence* token scores whether the concept
is in the image at all. It takes one phrase per forward, so an ontology of P prompts takes P
passes. ``Sam3Teacher`` runs the image encoder once per image batch
(``Sam3Model.get_vision_features``) and the text encoder once per prompt when the ontology is
set (``Sam3Model.get_text_features``, :meth:`Sam3Teacher.use_ontology`), and hands both to ``Sam3Model.forward`` (``vision_embeds``,
``text_embeds``) for each prompt: the reuse transformers documents for ``get_vision_features``.

Steps, as separate methods (callable-class model stage, like the other teachers):

* :meth:`preprocess` -- the model's own image processor (``Sam3ImageProcessor``: resize to
  1008x1008 *without* keeping the aspect ratio, rescale, normalise with mean = std = 0.5);
* :meth:`forward` -- raw output for one prompt: ``pred_logits`` ``(B, Q)``, ``presence_logits``
  ``(B, 1)``, ``pred_boxes`` ``(B, Q, 4)`` normalised xyxy, ``pred_masks`` ``(B, Q, 288, 288)``
  mask logits (the 4x-upsampled level of the 72x72 patch grid), as a transformers
  ``Sam3ImageSegmentationOutput``;
* :meth:`select` -- the processor's own post-processing of one prompt's output: query scores,
  boxes to the original frame; the candidates (score >= ``box_floor``) keep their mask logits;
* :meth:`postprocess` -- the merge of all prompts' candidates into one instance per object, the
  soft score vectors, the masks through the processor's post-processing to the original frame,
  SAM's small-region clean-up and RLE (see its docstring for every rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou, clip_boxes_to_image

from distillery.labeling.detector import (DTYPES, Detections, check_precision_and_merge, merge_agnostic,
                                         merge_class_aware, resolve_device)
from distillery.labeling.ontology import Ontology, OntologyError
from distillery.labeling.segmenter import MIN_REGION_AREA, encode_masks, remove_small_regions

#: masks upsampled to the original frame per post-processing call (a (n, H, W) float32 tensor)
MASKS_PER_CALL = 32


def load_error(model: str, e: Exception) -> ValueError:
    """The one-line error for weights ``Sam3Model.from_pretrained`` cannot load."""
    first = str(e).splitlines()[0] if str(e) else ""
    return ValueError(
        f"teacher.model {model!r} (kind sam3) cannot be loaded as a Sam3Model: not a local folder with its "
        "weights, preprocessor and tokenizer files (relative paths are relative to the preset), nor a hub id in "
        f"the cache (facebook/sam3 is gated: accept its licence, then download it). {type(e).__name__}: {first}")


def check_model(model: str, revision: str | None):
    """``(config, tokenizer)`` of ``model`` (no weights loaded), so a wrong folder fails first.

    Raises:
        ValueError: one line naming ``teacher.model`` and the fix: not loadable, or the
            ``config.model_type`` is not ``sam3``.
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        raise load_error(model, e) from e
    if config.model_type != "sam3":
        raise ValueError(f"teacher.model {model!r} is a {config.model_type!r} model, not the 'sam3' that "
                         "teacher.kind sam3 loads; give a Sam3Model folder or hub id (e.g. facebook/sam3)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        raise load_error(model, e) from e
    return config, tokenizer


def check_teacher(model: str, revision: str | None, ontology: Ontology) -> int:
    """:func:`check_model` and :func:`check_prompts` (no weights loaded); returns the number of
    passes per image batch, one per prompt."""
    config, tokenizer = check_model(model, revision)
    check_prompts(ontology, tokenizer, int(config.text_config.max_position_embeddings))
    return len(ontology.prompts)


def check_prompts(ontology: Ontology, tokenizer, limit: int) -> None:
    """Raise :class:`~distillery.labeling.ontology.OntologyError` naming the first prompt longer
    than ``limit`` tokens with the start/end tokens (``text_config.max_position_embeddings``, 32
    for ``facebook/sam3``; ``Sam3Processor`` pads every prompt to 32 and does not truncate)."""
    for p in ontology.prompts:
        n = len(tokenizer(p)["input_ids"])
        if n > limit:
            raise OntologyError(f"prompt {p!r} is {n} tokens with the start/end tokens; SAM 3's text encoder "
                                f"takes at most {limit}: shorten it")


@dataclass
class PromptOutput:
    """One prompt's queries on an image batch (:meth:`Sam3Teacher.select`): ``scores`` float32
    ``(B, Q)`` in [0, 1]; ``boxes`` float32 ``(B, Q, 4)`` xyxy pixels of each original frame,
    clipped; ``candidate`` bool ``(B, Q)``; ``masks`` per image, the candidates' mask logits
    ``(n_i, h, w)`` in query order (on the teacher's device)."""

    scores: torch.Tensor
    boxes: torch.Tensor
    candidate: torch.Tensor
    masks: list


class Sam3Teacher:
    """SAM 3 boxes, soft score per ontology class, and masks, from text prompts.

    Args:
        model: a local folder or hub id that ``Sam3Model.from_pretrained`` and
            ``Sam3Processor.from_pretrained`` load, e.g. ``facebook/sam3``.
        ontology: prompts and classes; each prompt is one forward pass (one concept).
        revision: hub revision; ignored for local folders.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the model's dtype; GPU only).
        box_floor: a query is a candidate instance when its score for its prompt is at least this.
        nms_iou: IoU above which two boxes are one object (the merge, and the soft vectors).
        merge: ``"agnostic"`` (one instance per object, :func:`~distillery.labeling.detector.merge_agnostic`)
            or ``"class-aware"`` (:func:`~distillery.labeling.detector.merge_class_aware`, one
            instance per object and class), across all prompts' candidates.
        max_detections: at most this many instances per image, best first.
        min_region_area: px; SAM's clean-up of every mask
            (:func:`~distillery.labeling.segmenter.remove_small_regions`; 0 turns it off).
        reuse_image_features: run the image encoder once per image batch and the text encoder once
            per prompt (default True); False makes the plain ``model(pixel_values, input_ids,
            attention_mask)`` call per prompt (for parity tests and benchmarks). Same operations on
            the same tensors, so not in the fingerprint.
        masks_per_call: masks upsampled per post-processing call (memory, not labels).

    Raises:
        ValueError: unknown ``precision`` or ``merge``, ``min_region_area < 0``, or weights that
            cannot be loaded or are not a ``sam3`` model (one line naming ``teacher.model``).
        labeling.ontology.OntologyError: a prompt longer than the text encoder's 32 positions.
    """

    model_class, processor_class, kind = "Sam3Model", "Sam3Processor", "sam3"

    def __init__(self, model: str, ontology: Ontology, *, revision: str | None = None, device: str = "auto",
                 precision: str = "fp32", box_floor: float = 0.05, nms_iou: float = 0.7, merge: str = "agnostic",
                 max_detections: int = 300, min_region_area: int = MIN_REGION_AREA,
                 reuse_image_features: bool = True, masks_per_call: int = MASKS_PER_CALL) -> None:
        import transformers

        check_precision_and_merge(precision, merge)
        if int(min_region_area) < 0:
            raise ValueError(f"min_region_area must be >= 0 px, got {min_region_area}")
        config, tokenizer = check_model(model, revision)
        check_prompts(ontology, tokenizer, int(config.text_config.max_position_embeddings))
        try:
            self.processor = getattr(transformers, self.processor_class).from_pretrained(model, revision=revision)
            net = getattr(transformers, self.model_class).from_pretrained(model, revision=revision)
        except (OSError, ValueError) as e:
            raise load_error(model, e) from e
        self.device = resolve_device(device)
        self.dtype = DTYPES[precision] if self.device.type == "cuda" else torch.float32
        self.model = net.to(self.device, self.dtype).eval()
        self.merge = merge
        self.box_floor = float(box_floor)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        self.min_region_area = int(min_region_area)
        self.reuse_image_features = bool(reuse_image_features)
        self.masks_per_call = int(masks_per_call)
        self.use_ontology(ontology)

    def use_ontology(self, ontology: Ontology) -> None:
        """Label with ``ontology`` from now on: tokenizes its prompts with the processor's own text
        call (padded to 32 positions, attention mask over the real tokens) and, with
        ``reuse_image_features``, runs the text encoder once per prompt. Raises
        :class:`~distillery.labeling.ontology.OntologyError` for a prompt over 32 tokens."""
        check_prompts(ontology, self.processor.tokenizer, int(self.model.config.text_config.max_position_embeddings))
        self.ontology = ontology
        self._prompt_class = torch.tensor(ontology.prompt_class, dtype=torch.long)
        self._text = [self.processor(text=p, return_tensors="pt") for p in ontology.prompts]
        self._text_embeds = [self._embed_text(t) for t in self._text] if self.reuse_image_features else None

    @torch.inference_mode()
    def _embed_text(self, text) -> torch.Tensor:
        """``(1, 32, D)`` projected text features of one prompt (``Sam3Model.get_text_features``'s
        ``pooler_output``, what ``forward`` computes from ``input_ids``)."""
        out = self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                           attention_mask=text["attention_mask"].to(self.device))
        return out.pooler_output

    # -- steps -------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> dict:
        """RGB uint8 ``(H, W, 3)`` images -> ``{"pixel_values": (B, 3, 1008, 1008)}`` on the model's
        device and dtype (the processor's resize, aspect ratio not kept). :meth:`forward` adds the
        image encoder's output (key ``_vision``) so the next prompts reuse it."""
        out = self.processor.image_processor(images=list(images), return_tensors="pt",
                                             input_data_format="channels_last")
        return {"pixel_values": out["pixel_values"].to(self.device, self.dtype)}

    @torch.inference_mode()
    def forward(self, inputs: dict, prompt: int):
        """Raw ``Sam3Model`` output for prompt ``prompt`` (index into ``ontology.prompts``) on the
        images of ``inputs``: a ``Sam3ImageSegmentationOutput`` with ``pred_logits`` ``(B, Q)``,
        ``presence_logits`` ``(B, 1)``, ``pred_boxes`` ``(B, Q, 4)`` normalised xyxy of the frame and
        ``pred_masks`` ``(B, Q, h, w)`` mask logits over the whole frame, float32 on the teacher's device."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

        pixels = inputs["pixel_values"]
        b = pixels.shape[0]
        mask = self._text[prompt]["attention_mask"].expand(b, -1).to(self.device)
        if self.reuse_image_features:
            if "_vision" not in inputs:
                inputs["_vision"] = self.model.get_vision_features(pixel_values=pixels)
            text = BaseModelOutputWithPooling(pooler_output=self._text_embeds[prompt].expand(b, -1, -1))
            out = self.model(vision_embeds=inputs["_vision"], text_embeds=text, attention_mask=mask)
        else:
            ids = self._text[prompt]["input_ids"].expand(b, -1).to(self.device)
            out = self.model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        return Sam3ImageSegmentationOutput(pred_logits=out.pred_logits.float(), presence_logits=out.presence_logits.float(),
                                           pred_boxes=out.pred_boxes.float(), pred_masks=out.pred_masks.float())

    def select(self, output, sizes: list[tuple[int, int]]) -> PromptOutput:
        """One prompt's raw output -> every query's score and box, and the candidates' mask logits.

        A query's score is ``sigmoid(pred_logit) * sigmoid(presence_logit)`` and its box
        ``pred_boxes`` times (W, H): transformers ``Sam3ImageProcessor.post_process_object_detection``
        (called here with its threshold off, so query order is kept), the scoring of the SAM 3
        paper (recognition by the presence token, localisation by the query). Boxes are then
        clipped to the frame. A *candidate* scores at least ``box_floor`` and has a non-empty box;
        only candidates' mask logits are kept (0.33 MB each at 288x288), the rest are dropped here.
        """
        dets = self.processor.post_process_object_detection(output, threshold=-1.0, target_sizes=list(sizes))
        boxes = torch.stack([clip_boxes_to_image(d["boxes"].float(), hw) for d, hw in zip(dets, sizes)]).cpu()
        scores = torch.stack([d["scores"].float() for d in dets]).cpu()
        cand = (scores >= self.box_floor) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        masks = [output.pred_masks[i][cand[i].to(output.pred_masks.device)] for i in range(len(sizes))]
        return PromptOutput(scores, boxes, cand, masks)

    def postprocess(self, outputs: list[PromptOutput],
                    sizes: list[tuple[int, int]]) -> list[tuple[Detections, list[dict], np.ndarray]]:
        """Per-prompt outputs (:meth:`select`) -> instances per image.

        Args:
            outputs: per prompt, in ``ontology.prompts`` order.
            sizes: per image, ``(height, width)`` of the original frame.

        Returns:
            per image ``(Detections, rles, mask_score)``: float32 ``(N, 4)`` xyxy pixel boxes of the
            original frame, clipped; float32 ``(N, C)`` soft scores; ``N`` compressed COCO RLEs
            (``size == [H, W]``); float32 ``(N,)`` mask scores. ``N = 0``: arrays of those shapes.

        Rules, and where they come from (scores, boxes and candidates: :meth:`select`):

        * instances: all prompts' candidates, each carrying its score in its prompt's class
          column, merged into one instance per object as the other detectors merge their prompt
          chunks (:func:`merge_agnostic`, or :func:`merge_class_aware` with the prompt as the
          chunk) at ``nms_iou``; the best ``max_detections`` kept;
        * soft vector of an instance: per prompt, the best score among *all* that prompt's queries
          (below ``box_floor`` too) whose box overlaps the instance's box at IoU >= ``nms_iou``
          (the merge's "same object"), then the max over a class's prompts (as the Grounding DINO
          and OWLv2 teachers). SAM 3 scores one concept per pass, so a class's column is what its
          pass found at that place; the instance's own score is in it (IoU 1 with itself);
        * mask: the instance query's ``pred_masks`` through ``post_process_instance_segmentation``
          (sigmoid, bilinear upsampling to the original frame, > 0.5), then SAM's small-region
          clean-up at ``min_region_area`` and pycocotools RLE;
        * mask score: the instance query's own score. SAM 3's detector has no mask-IoU head
          (``Sam3ImageSegmentationOutput`` carries masks, boxes, logits and presence only), and a
          query's mask and box come from one decoder state, so its score is the model's only
          confidence in the mask.
        """
        C, P = len(self.ontology.classes), len(outputs)
        results = []
        for i, (h, w) in enumerate(sizes):
            boxes = torch.stack([o.boxes[i] for o in outputs])  # (P, Q, 4)
            scores = torch.stack([o.scores[i] for o in outputs])  # (P, Q)
            Q = scores.shape[1]
            cand_p, cand_q = torch.stack([o.candidate[i] for o in outputs]).nonzero(as_tuple=True)
            cand_boxes = boxes[cand_p, cand_q]
            onehot = torch.zeros(len(cand_p), C)
            onehot[torch.arange(len(cand_p)), self._prompt_class[cand_p]] = scores[cand_p, cand_q]
            if self.merge == "agnostic":
                keep, _ = merge_agnostic(cand_boxes, onehot, self.nms_iou)
            else:
                keep, _ = merge_class_aware(cand_boxes, onehot, cand_p, self.nms_iou)
            keep = keep[: self.max_detections]
            kb, kp, kq = cand_boxes[keep], cand_p[keep], cand_q[keep]
            near = box_iou(kb, boxes.reshape(-1, 4)).reshape(len(kb), P, Q) >= self.nms_iou
            per_prompt = torch.where(near, scores[None], torch.zeros(())).amax(dim=2)  # (K, P)
            soft = torch.zeros(len(kb), C).scatter_reduce_(1, self._prompt_class.expand(len(kb), -1), per_prompt,
                                                            reduce="amax")
            # the candidate's row among its prompt's kept masks: candidates before it in query order
            rank = [int(outputs[p].candidate[i, :q].sum()) for p, q in zip(kp.tolist(), kq.tolist())]
            low = [outputs[p].masks[i][r] for p, r in zip(kp.tolist(), rank)]
            rles = self.masks(low, (h, w))
            results.append((Detections(kb.numpy().astype(np.float32).reshape(-1, 4), soft.numpy().astype(np.float32)),
                            rles, scores[kp, kq].numpy().astype(np.float32)))
        return results

    def masks(self, low_res: list[torch.Tensor], size: tuple[int, int]) -> list[dict]:
        """Mask logits ``(h, w)`` each -> compressed RLEs of the ``size`` ``(H, W)`` frame: the
        processor's ``post_process_instance_segmentation`` (sigmoid, bilinear to ``size``, > 0.5),
        ``masks_per_call`` at a time, then SAM's small-region clean-up."""
        from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

        rles = []
        for s in range(0, len(low_res), self.masks_per_call):
            low = torch.stack(low_res[s : s + self.masks_per_call]).to(self.device)
            n = len(low)
            sub = Sam3ImageSegmentationOutput(pred_masks=low[None], pred_logits=torch.zeros(1, n, device=self.device),
                                              pred_boxes=torch.zeros(1, n, 4, device=self.device))
            out = self.processor.post_process_instance_segmentation(sub, threshold=-1.0, mask_threshold=0.5,
                                                                    target_sizes=[size])[0]["masks"]
            masks = out.bool().cpu().numpy()
            if self.min_region_area > 0:
                masks = np.stack([remove_small_regions(m, self.min_region_area) for m in masks])
            rles.extend(encode_masks(masks))
        return rles

    def __call__(self, images: list[np.ndarray]) -> list[tuple[Detections, list[dict], np.ndarray]]:
        """Label RGB uint8 ``(H, W, 3)`` images; per image ``(Detections, rles, mask_score)`` (see
        :meth:`postprocess`)."""
        if not len(images):
            return []
        sizes = [tuple(int(v) for v in im.shape[:2]) for im in images]
        inputs = self.preprocess(images)
        outputs = [self.select(self.forward(inputs, p), sizes) for p in range(len(self.ontology.prompts))]
        return self.postprocess(outputs, sizes)
