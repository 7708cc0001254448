"""Teachers whose *raw model outputs* are derived from COCO ground truth.

Everything else -- decoding, the processors, token spans, post-processing, the merge,
SAM's input transform of image and boxes, SAM's mask post-processing, RLE, the store
and the export -- is the real code, so a COCO eval of the exported file against the
same ground truth measures the geometry of the whole pipeline. Images are recognised by
a hash of their decoded pixels.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou
from pycocotools import mask as mask_utils
from segment_anything.utils.transforms import ResizeLongestSide

from distillery.labeling.detector import GroundingDinoTeacher
from distillery.labeling.segmenter import SamTeacher

LOGIT = 10.0


def pixel_key(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


class GroundTruth:
    """GT instances per decoded image: ``add(pixels, boxes_xyxy, class_ids, masks_bool)``."""

    def __init__(self) -> None:
        self.by_key: dict[str, dict] = {}

    def add(self, pixels, boxes, classes, masks) -> None:
        self.by_key[pixel_key(pixels)] = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                                          "classes": list(classes), "masks": masks}

    def boxes_of(self, pixels):
        return self.by_key[pixel_key(pixels)]


class OracleDetector(GroundingDinoTeacher):
    """Grounding DINO whose forward returns GT boxes (normalised cxcywh) and logits peaked
    (+10) on the tokens of the GT class's prompt span, -10 elsewhere."""

    gt: GroundTruth
    num_queries = 120

    def __call__(self, images):
        self._current = [self.gt.boxes_of(im) for im in images]
        self._sizes = [im.shape[:2] for im in images]
        return super().__call__(images)

    def forward(self, inputs, chunk):
        B, Q, L = len(self._current), self.num_queries, self.max_text_len
        logits = torch.full((B, Q, L), -LOGIT)
        boxes = torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(B, Q, 1)
        prompt_rows = {p: r for r, p in enumerate(self.chunks[chunk].prompt_ids)}
        for b, (gt, (h, w)) in enumerate(zip(self._current, self._sizes)):
            assert len(gt["boxes"]) <= Q
            for q, (box, c) in enumerate(zip(gt["boxes"], gt["classes"])):
                x1, y1, x2, y2 = box
                boxes[b, q] = torch.tensor([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
                prompt = self.ontology.prompt_class.index(c)
                if prompt in prompt_rows:
                    tokens = self.chunks[chunk].positive_map[prompt_rows[prompt]] > 0
                    logits[b, q, torch.from_numpy(tokens)] = LOGIT
        return logits, boxes


class _NoImageEncoder(torch.nn.Module):
    """Stands in for SAM's image encoder: the oracle's masks come from GT, not the embedding."""

    def __init__(self, dim: int, grid: int, img_size: int) -> None:
        super().__init__()
        self.dim, self.grid, self.img_size = dim, grid, img_size

    def forward(self, x):
        return torch.zeros(x.shape[0], self.dim, self.grid, self.grid)


class OracleSegmenter(SamTeacher):
    """SAM whose mask decoder returns low-res logits made from the GT mask of the box that
    prompted it, and IoU 1.

    The boxes it receives are read in SAM's input frame (longest side 1024): each is
    matched to a GT box scaled by (new_w / W, new_h / H), the input image's size over the
    original's (computed here, not by the code under test), and must overlap it at IoU >=
    ``MATCH_IOU``, else it raises; the GT mask, letterboxed like SAM's input, is cut to the
    received box (plus ``MARGIN`` input pixels) and area-downsampled to 256x256. So a wrong
    box transform raises or cuts the masks, and the geometry tests fail. The image encoder
    is skipped (its embedding is unused here; it is most of a tiny SAM's CPU time).
    """

    gt: GroundTruth
    MATCH_IOU = 0.98
    MARGIN = 2.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pe = self.sam.prompt_encoder
        self.sam.image_encoder = _NoImageEncoder(pe.embed_dim, pe.image_embedding_size[0], pe.input_image_size[0])

    def embed(self, image):
        self._gt = self.gt.boxes_of(image)
        super().embed(image)

    def decode(self, input_boxes):
        h, w = self.predictor.original_size
        nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, 1024)
        gt_in = torch.from_numpy(self._gt["boxes"]) * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        received = torch.as_tensor(input_boxes, dtype=torch.float32).cpu()
        iou = box_iou(received, gt_in)
        out = []
        for b, box in enumerate(received):
            best, k = iou[b].max(dim=0)
            if best < self.MATCH_IOU:
                raise AssertionError(
                    f"SAM got box {box.tolist()} in its 1024 input frame of a {w}x{h} image: it matches no GT "
                    f"box (best IoU {best:.3f}, GT there {gt_in[k].tolist()}): wrong original -> input transform"
                )
            m = torch.from_numpy(mask_utils.decode(self._gt["masks"][int(k)]).astype(np.float32))[None, None]
            m = F.interpolate(m, size=(nh, nw), mode="area")[0, 0]
            # keep the input pixels whose centres (i + 0.5) lie in the received box +- MARGIN
            x1, y1, x2, y2 = box.tolist()
            e = self.MARGIN
            c1, r1 = max(math.ceil(x1 - e - 0.5), 0), max(math.ceil(y1 - e - 0.5), 0)
            c2, r2 = min(math.floor(x2 + e - 0.5) + 1, nw), min(math.floor(y2 + e - 0.5) + 1, nh)
            letterbox = torch.zeros(1, 1, 1024, 1024)
            if c2 > c1 and r2 > r1:
                letterbox[0, 0, r1:r2, c1:c2] = m[r1:r2, c1:c2]
            frac = F.avg_pool2d(letterbox, 4)  # 1024 -> 256: each low-res logit covers 4x4 input pixels
            out.append((frac - 0.5) * 2 * LOGIT)
        return torch.cat(out), torch.ones(len(out), 1)


# -- other detector kinds (labeling.kinds.DETECTORS) ---------------------------------------------
from distillery.labeling.mm_grounding_dino import MMGroundingDinoTeacher  # noqa: E402
from distillery.labeling.owlv2 import Owlv2Teacher  # noqa: E402


class OracleMMDetector(OracleDetector, MMGroundingDinoTeacher):
    """MM-Grounding-DINO (its model class, processor and token spans) with :class:`OracleDetector`'s
    GT-derived raw output."""


class OracleOwlv2(Owlv2Teacher):
    """OWLv2 whose forward returns, per image, one patch query per GT instance: its box in
    normalised cxcywh of the *padded square* the OWLv2 processor makes (the image at the top-left
    of a ``max(H, W)`` square; computed here from GT, not by the code under test), logit +10 for
    the prompts of the GT class in this query batch and -10 elsewhere; the other patches get
    -10 everywhere."""

    gt: GroundTruth
    num_patches = 120

    def __call__(self, images):
        self._current = [self.gt.boxes_of(im) for im in images]
        self._sizes = [im.shape[:2] for im in images]
        return super().__call__(images)

    def forward(self, inputs, batch):
        prompts = self.query_batches[batch]
        B, P = len(self._current), self.num_patches
        logits = torch.full((B, P, len(prompts)), -LOGIT)
        boxes = torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(B, P, 1)
        for b, (gt, (h, w)) in enumerate(zip(self._current, self._sizes)):
            assert len(gt["boxes"]) <= P
            side = max(h, w)
            for q, (box, c) in enumerate(zip(gt["boxes"], gt["classes"])):
                x1, y1, x2, y2 = box
                boxes[b, q] = torch.tensor([(x1 + x2) / 2 / side, (y1 + y2) / 2 / side, (x2 - x1) / side,
                                            (y2 - y1) / side])
                for col, p in enumerate(prompts):
                    if self.ontology.prompt_class[p] == c:
                        logits[b, q, col] = LOGIT
        return logits, boxes


# --- transformers segmenter kinds (labeling.segmenter_hf): sam2, sam-hq -------------------

from distillery.labeling.segmenter_hf import Sam2Teacher, SamHQTeacher  # noqa: E402


def gt_low_res_logits(gt: dict, received: torch.Tensor, h: int, w: int, nh: int, nw: int,
                      match_iou: float, margin: float) -> torch.Tensor:
    """Low-res logits ``(N, 1, 256, 256)`` of the GT masks of ``gt`` for boxes ``received`` in a
    1024x1024 input frame whose top-left ``(nh, nw)`` holds the ``(h, w)`` image (the rest
    padding): each box is matched to a GT box scaled by (nw / w, nh / h) at IoU >= ``match_iou``
    (else AssertionError: a wrong original -> input transform), the GT mask resized to
    ``(nh, nw)`` (area) is cut to the box +- ``margin`` input pixels and area-pooled to 256x256
    (4x4 input pixels per logit), +-LOGIT at mask fraction 1 / 0."""
    gt_in = torch.from_numpy(gt["boxes"]) * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    received = torch.as_tensor(received, dtype=torch.float32).cpu()
    iou = box_iou(received, gt_in)
    out = []
    for b, box in enumerate(received):
        best, k = iou[b].max(dim=0)
        if best < match_iou:
            raise AssertionError(
                f"segmenter got box {box.tolist()} in its {nw}x{nh} input frame of a {w}x{h} image: it matches no "
                f"GT box (best IoU {best:.3f}, GT there {gt_in[k].tolist()}): wrong original -> input transform"
            )
        m = torch.from_numpy(mask_utils.decode(gt["masks"][int(k)]).astype(np.float32))[None, None]
        m = F.interpolate(m, size=(nh, nw), mode="area")[0, 0]
        x1, y1, x2, y2 = box.tolist()
        c1, r1 = max(math.ceil(x1 - margin - 0.5), 0), max(math.ceil(y1 - margin - 0.5), 0)
        c2, r2 = min(math.floor(x2 + margin - 0.5) + 1, nw), min(math.floor(y2 + margin - 0.5) + 1, nh)
        frame = torch.zeros(1, 1, 1024, 1024)
        if c2 > c1 and r2 > r1:
            frame[0, 0, r1:r2, c1:c2] = m[r1:r2, c1:c2]
        out.append((F.avg_pool2d(frame, 4) - 0.5) * 2 * LOGIT)
    return torch.cat(out)


class _OracleHF:
    """Mixin for :class:`~distillery.labeling.segmenter_hf.HFSegmenter` kinds: ``decode`` returns
    :func:`gt_low_res_logits` in the kind's input frame (:meth:`input_shape`, computed here from
    the model's published preprocessing, not by the code under test) and IoU 1; the image
    encoder is skipped (its features are unused here). The processor's image preprocessing,
    :meth:`input_boxes` and :meth:`postprocess` are the real code."""

    gt: GroundTruth
    MATCH_IOU = 0.98
    MARGIN = 2.0

    def input_shape(self, h: int, w: int) -> tuple[int, int]:
        raise NotImplementedError

    def encode(self, pixel_values):
        return None

    def embed(self, image):
        self._gt = self.gt.boxes_of(image)
        super().embed(image)

    def decode(self, input_boxes):
        h, w = self.original_size
        nh, nw = self.input_shape(h, w)
        logits = gt_low_res_logits(self._gt, input_boxes, h, w, nh, nw, self.MATCH_IOU, self.MARGIN)
        return logits, torch.ones(len(logits), 1)


class OracleSam2(_OracleHF, Sam2Teacher):
    """SAM 2 oracle: SAM 2 resizes every image to 1024x1024, aspect ratio not kept
    (``Sam2ImageProcessor.size``; ``SAM2Transforms`` in facebookresearch/sam2)."""

    def input_shape(self, h, w):
        return 1024, 1024


class OracleSamHQ(_OracleHF, SamHQTeacher):
    """SAM-HQ oracle: longest side to 1024, padded to 1024x1024 (SAM's ``ResizeLongestSide``)."""

    def input_shape(self, h, w):
        return ResizeLongestSide.get_preprocess_shape(h, w, 1024)


# --- grounded segmenter kinds (labeling.kinds.GROUNDED): sam3 -----------------------------

from distillery.labeling.sam3 import Sam3Teacher  # noqa: E402


class OracleSam3(Sam3Teacher):
    """SAM 3 whose forward returns, for every prompt, one query per GT instance of the image:

    * ``pred_boxes``: the GT box in normalised xyxy of the frame (x / W, y / H): SAM 3's processor
      stretches the whole frame onto its square input, so the model's normalised coordinates are
      the frame's (``Sam3ImageProcessor``: 1008x1008, aspect ratio not kept; computed here from GT);
    * ``pred_logits``: +10 when the GT class is the prompt's class, -10 otherwise;
      ``presence_logits``: +10 when the image holds the prompt's class, -10 otherwise;
    * ``pred_masks``: on the model's mask grid (the config's first ``backbone_feature_sizes``,
      288x288 over the whole frame), ``logit(f)`` clamped to +-10, ``f`` the GT mask's area
      fraction of each cell (``F.interpolate(mode="area")``): the processor's sigmoid gives ``f``
      back, which it upsamples bilinearly and thresholds at 0.5.

    One spare query per image has a zero-area box at the origin and -10 everywhere. The image
    encoder never runs (only :meth:`forward` is replaced); preprocessing, the processor's
    post-processing, the merge, soft vectors, masks and RLE are the real code."""

    gt: GroundTruth

    def __call__(self, images):
        gts = [self.gt.boxes_of(im) for im in images]
        grid = tuple(self.model.config.vision_config.backbone_feature_sizes[0])
        Q = max(len(g["boxes"]) for g in gts) + 1
        self._boxes = torch.zeros(len(gts), Q, 4)
        self._classes = torch.full((len(gts), Q), -1)
        self._masks = torch.full((len(gts), Q) + grid, -LOGIT)
        for b, (g, im) in enumerate(zip(gts, images)):
            h, w = im.shape[:2]
            for q, (box, c, rle) in enumerate(zip(g["boxes"], g["classes"], g["masks"])):
                self._boxes[b, q] = torch.from_numpy(box) / torch.tensor([w, h, w, h], dtype=torch.float32)
                self._classes[b, q] = c
                m = torch.from_numpy(mask_utils.decode(rle).astype(np.float32))[None, None]
                frac = F.interpolate(m, size=grid, mode="area")[0, 0]
                self._masks[b, q] = frac.clamp(1e-6, 1 - 1e-6).logit().clamp(-LOGIT, LOGIT)
        self._present = [set(g["classes"]) for g in gts]
        return super().__call__(images)

    def forward(self, inputs, prompt):
        from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

        c = self.ontology.prompt_class[prompt]
        logits = torch.where(self._classes == c, LOGIT, -LOGIT)
        presence = torch.tensor([[LOGIT if c in present else -LOGIT] for present in self._present])
        return Sam3ImageSegmentationOutput(pred_logits=logits, presence_logits=presence, pred_boxes=self._boxes,
                                           pred_masks=self._masks)
