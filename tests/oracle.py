"""Teachers whose *raw model outputs* are derived from COCO ground truth.

Everything else -- decoding, the processors, token spans, post-processing, NMS, SAM's
mask post-processing, RLE, the store and the export -- is the real code, so a COCO eval
of the exported file against the same ground truth measures the geometry of the whole
pipeline. Images are recognised by a hash of their decoded pixels.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
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


class OracleSegmenter(SamTeacher):
    """SAM whose mask decoder returns low-res logits made from the GT mask of the box that
    prompted it (SAM's 1024 letterbox, area-downsampled to 256x256), and IoU 1."""

    gt: GroundTruth

    def embed(self, image):
        self._gt = self.gt.boxes_of(image)
        super().embed(image)

    def decode(self, boxes):
        h, w = self.predictor.original_size
        nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, 1024)
        out = []
        for box in np.asarray(boxes):
            k = int(np.argmin(np.abs(self._gt["boxes"] - box).sum(axis=1)))
            m = torch.from_numpy(mask_utils.decode(self._gt["masks"][k]).astype(np.float32))[None, None]
            m = F.interpolate(m, size=(nh, nw), mode="area")
            m = F.pad(m, (0, 1024 - nw, 0, 1024 - nh))
            frac = F.interpolate(m, size=(256, 256), mode="area")
            out.append((frac - 0.5) * 2 * LOGIT)
        return torch.cat(out), torch.ones(len(out), 1)
