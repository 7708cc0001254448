"""Mask-decoder fine-tuning data (every SAM kind): box -> mask samples, SAM's box jitter,
low-resolution targets.

Conventions as in the label record (:mod:`distillery.engine.record`): boxes xyxy in
absolute pixels of the EXIF-corrected frame, sizes ``(height, width)``, masks compressed
COCO RLE over the full frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

#: Box noise: std 10% of the box side, at most 20 px (Kirillov et al., "Segment Anything",
#: ICCV 2023, Appendix A, "Training algorithm"), applied in the model's 1024-pixel input frame.
JITTER_FRACTION, JITTER_MAX_STD = 0.1, 20.0


class SamFinetuneError(ValueError):
    """Bad training input (samples, images, resume state) for SAM fine-tuning."""


@dataclass
class SamSample:
    """One image's box -> mask training pairs.

    Attributes:
        path: image file, decoded with :func:`distillery.engine.images.decode` (EXIF applied).
        height, width: pixels of the EXIF-corrected frame.
        boxes: float32 ``(N, 4)`` xyxy, absolute pixels in that frame.
        masks: ``N`` COCO RLE dicts over the full frame (``size == [height, width]``).
        image_id: sha256 of the file's bytes (the label record's ``image_id``); empty:
            computed from the file when its embedding is looked up.

    Raises:
        SamFinetuneError: boxes not ``(N, 4)``, mask count or size disagreeing with them.
    """

    path: str
    height: int
    width: int
    boxes: np.ndarray
    masks: list
    image_id: str = ""

    def __post_init__(self) -> None:
        b = np.asarray(self.boxes, np.float32)
        b = b.reshape(0, 4) if b.size == 0 else b
        if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
            raise SamFinetuneError(f"{self.path}: boxes must be finite float (N, 4) xyxy pixels, got shape {b.shape}")
        self.boxes = b
        if len(self.masks) != len(self.boxes):
            raise SamFinetuneError(f"{self.path}: {len(self.boxes)} boxes but {len(self.masks)} masks")
        for m in self.masks:
            if list(m["size"]) != [self.height, self.width]:
                raise SamFinetuneError(f"{self.path}: mask size {list(m['size'])} != [height, width] {[self.height, self.width]}")


def samples_from_records(records, instance_filter: Callable | None = None) -> list[SamSample]:
    """:class:`~distillery.engine.record.LabelRecord` objects -> :class:`SamSample` list.

    Error records, crowd instances and instances with an empty mask or a zero-area box
    are skipped, as are images left with no instance.

    Args:
        instance_filter: ``record -> bool (N,)`` array choosing the record's instances
            to train on (e.g. curated or above a score floor); ``None`` keeps all.

    Raises:
        SamFinetuneError: the filter returns an array that is not bool-like ``(N,)``.
    """
    out = []
    for r in records:
        if r.error is not None or r.num_instances == 0:
            continue
        keep = ~np.asarray(r.iscrowd, bool)
        if instance_filter is not None:
            chosen = np.asarray(instance_filter(r))
            if chosen.shape != (r.num_instances,):
                raise SamFinetuneError(f"{r.path}: instance_filter returned shape {chosen.shape}, expected ({r.num_instances},)")
            keep &= chosen.astype(bool)
        b = r.boxes
        keep &= (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        keep &= np.asarray([mask_utils.area(m) > 0 for m in r.masks], bool)
        idx = np.flatnonzero(keep)
        if len(idx):
            out.append(SamSample(r.path, r.height, r.width, b[idx], [r.masks[i] for i in idx], r.image_id))
    return out


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, frame_hw: tuple[int, int], *,
                 fraction: float = JITTER_FRACTION, max_std: float = JITTER_MAX_STD) -> np.ndarray:
    """SAM's training box noise: each coordinate gets N(0, sigma^2) added, sigma = ``fraction``
    of the box side along that axis (width for x1/x2, height for y1/y2), capped at ``max_std``
    pixels (Kirillov et al. 2023, Appendix A, "Training algorithm": "standard deviation equal to
    10% of the box sidelength, to a maximum of 20 pixels").

    Args:
        boxes: float ``(N, 4)`` xyxy, absolute pixels.
        rng: the noise source (draws ``N * 4`` standard normals).
        frame_hw: ``(height, width)`` the result is clipped to.

    Returns:
        float32 ``(N, 4)`` xyxy, corners re-ordered so ``x1 <= x2`` and ``y1 <= y2``.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    std = np.minimum(fraction * np.stack([w, h, w, h], 1), max_std)
    j = b + rng.standard_normal(b.shape) * std
    x = np.clip(np.sort(j[:, [0, 2]], 1), 0, frame_hw[1])
    y = np.clip(np.sort(j[:, [1, 3]], 1), 0, frame_hw[0])
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1).astype(np.float32)


def low_res_targets(s: SamSample, input_size: tuple[int, int], pad_size: int | tuple[int, int],
                    out_hw: tuple[int, int]) -> torch.Tensor:
    """Ground-truth masks in the frame of a SAM-family model's low-resolution logits.

    The full-frame mask is resized to ``input_size`` (bilinear, antialiased, as the model's
    preprocessing resizes the image: ``ResizeLongestSide`` with Pillow for SAM, the processor's
    bilinear resize for SAM 2 / SAM-HQ), zero-padded at the bottom and right to ``pad_size``
    (``Sam.preprocess``; SAM 2 stretches to 1024x1024, so ``input_size == pad_size`` and nothing
    is padded), area-averaged to ``out_hw`` (256x256 for every kind) and thresholded at 0.5.

    Args:
        input_size: ``(height, width)`` of the resized image inside the model input.
        pad_size: side, or ``(height, width)``, of the model input (1024).

    Returns:
        bool ``(N, 1, *out_hw)``.
    """
    ph, pw = (pad_size, pad_size) if isinstance(pad_size, int) else pad_size
    out = []
    for i in range(0, len(s.masks), 16):
        m = mask_utils.decode(s.masks[i : i + 16])  # (H, W, n) uint8
        t = torch.from_numpy(np.ascontiguousarray(m.transpose(2, 0, 1))).float()[:, None]
        t = F.interpolate(t, input_size, mode="bilinear", align_corners=False, antialias=True)
        t = F.pad(t, (0, pw - input_size[1], 0, ph - input_size[0]))
        out.append(F.interpolate(t, out_hw, mode="area") >= 0.5)
    return torch.cat(out) if out else torch.zeros((0, 1, *out_hw), dtype=torch.bool)
