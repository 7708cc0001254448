"""SAM mask teacher (``segment-anything``): one image embedding, all its boxes decoded in batches.

Steps, as separate methods:

* :meth:`SamTeacher.embed` -- ``SamPredictor.set_image``: resize the longest side to 1024
  (``ResizeLongestSide``), normalise, pad to 1024x1024, run the image encoder once;
* :meth:`SamTeacher.input_boxes` -- boxes from the original frame to SAM's input frame
  (``ResizeLongestSide.apply_boxes_torch``: x times new_w / w, y times new_h / h);
* :meth:`SamTeacher.decode` -- prompt encoder + mask decoder for a batch of input-frame
  boxes, returning SAM's raw low-resolution mask logits ``(N, 1, 256, 256)`` and predicted IoU
  ``(N, 1)`` (``SamPredictor.predict_torch`` with ``multimask_output=False``);
* :meth:`SamTeacher.postprocess` -- ``Sam.postprocess_masks`` (upsample, crop the
  padding, resize to the original frame) and threshold at ``mask_threshold`` (SAM: 0.0);
* :func:`remove_small_regions` -- SAM's own clean-up of specks and pinholes
  (``segment_anything.utils.amg.remove_small_regions``: holes, then islands, smaller than
  ``min_region_area`` px), as its automatic mask generator does with ``min_mask_region_area``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from pycocotools import mask as mask_utils

from distillery.labeling.detector import DTYPES, resolve_device

#: Default ``min_region_area`` (px): islands and holes smaller than this are removed.
#: segment-anything's ``SamAutomaticMaskGenerator`` has the same clean-up
#: (``min_mask_region_area``), off (0) by default; its example notebook
#: (``notebooks/automatic_mask_generator_example.ipynb``) turns it on with 100, the value taken
#: here: 0.03% of a 640x480 photo, a 10x10 px speck, a tenth of the COCO "small" object area
#: (32**2 = 1024 px); no instance is removed whole (one with only small parts keeps its largest,
#: as SAM does). Its cost on human masks, measured on the 929 non-crowd coco128 GT masks: 60
#: change (real fragments of occluded objects), mean IoU with the original 0.9936, 4 masks of
#: >= 400 px under 0.95 (at 25 px: 41 change, mean 0.9976). Set 0 for masks that are meant
#: to keep every fragment.
MIN_REGION_AREA = 100


def build_sam_vit_tiny(checkpoint: str | None = None):
    """SAM of reduced width for offline tests and ``distillery teachers tiny``.

    Same components, 1024 input, 16-pixel patches and 64x64 embedding grid as
    ``segment_anything.build_sam._build_sam``, but a 2-block width-32 ViT encoder and a
    prompt encoder / mask decoder of width 32 (SAM: 256), so that a box costs
    milliseconds on a CPU. Random weights unless ``checkpoint`` is given.
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, image_size, patch = 32, 1024, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=32, img_size=image_size, mlp_ratio=4,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=14, out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(image_size // patch,) * 2,
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam


def _sam_builders() -> dict:
    from segment_anything import sam_model_registry

    builders = dict(sam_model_registry)
    builders.pop("default", None)
    builders["vit_tiny"] = build_sam_vit_tiny
    return builders


SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_tiny")


def load_sam(model_type: str, checkpoint: str | None):
    """Build a SAM model of ``model_type`` and load ``checkpoint`` (a ``.pth`` state dict).

    Args:
        model_type: ``vit_h``, ``vit_l``, ``vit_b`` (``segment_anything.sam_model_registry``)
            or ``vit_tiny`` (reduced encoder, random weights, for tests).
        checkpoint: path to the state dict, e.g. ``sam_vit_b_01ec64.pth`` from the
            segment-anything release; ``None`` leaves random weights.

    Raises:
        ValueError: unknown model type.
        FileNotFoundError: the checkpoint path does not exist (says where to get one).
    """
    builders = _sam_builders()
    if model_type not in builders:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(SAM_MODEL_TYPES)}")
    if checkpoint is not None:
        import os

        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"SAM checkpoint {checkpoint!r} not found: download the {model_type} checkpoint from the "
                "segment-anything release (e.g. sam_vit_b_01ec64.pth) and set sam.checkpoint in the teachers preset"
            )
    return builders[model_type](checkpoint=checkpoint)


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` to ``dtype`` on ``device`` (fp16/bf16 on a GPU); off for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class SamTeacher:
    """Masks for given boxes with SAM.

    Args:
        model_type, checkpoint: see :func:`load_sam`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        precision: ``"fp32"``, ``"fp16"``, ``"bf16"`` (autocast, GPU only).
        boxes_per_call: boxes decoded per mask-decoder call (memory: each box holds a copy
            of the 256x64x64 image embedding).
        min_region_area: px; islands and holes smaller than this are removed from every mask
            (:func:`remove_small_regions`; default :data:`MIN_REGION_AREA`, 0 turns it off).
    """

    def __init__(
        self,
        model_type: str,
        checkpoint: str | None,
        *,
        device: str = "auto",
        precision: str = "fp32",
        boxes_per_call: int = 32,
        min_region_area: int = MIN_REGION_AREA,
    ) -> None:
        from segment_anything import SamPredictor

        self.device = resolve_device(device)
        self.sam = load_sam(model_type, checkpoint).to(self.device).eval()
        self.predictor = SamPredictor(self.sam)
        self.dtype = DTYPES[precision] if self.device.type == "cuda" else torch.float32
        self.boxes_per_call = int(boxes_per_call)
        self.mask_threshold = float(self.sam.mask_threshold)
        if int(min_region_area) < 0:
            raise ValueError(f"min_region_area must be >= 0 px, got {min_region_area}")
        self.min_region_area = int(min_region_area)

    def _autocast(self):
        return autocast(self.device, self.dtype)

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> None:
        """Embed one RGB uint8 ``(H, W, 3)`` image (kept in the predictor for :meth:`decode`)."""
        with self._autocast():
            self.predictor.set_image(image, image_format="RGB")

    def input_boxes(self, boxes: np.ndarray) -> torch.Tensor:
        """Boxes of the embedded image from its original frame to SAM's input frame.

        Args:
            boxes: float32 ``(N, 4)`` xyxy, absolute pixels of the original ``(H, W)`` frame.

        Returns:
            float32 ``(N, 4)`` xyxy pixels of the resized image whose longest side is 1024
            (``ResizeLongestSide.apply_boxes_torch``), on the teacher's device.
        """
        return self.predictor.transform.apply_boxes_torch(
            torch.as_tensor(boxes, dtype=torch.float32, device=self.device), self.predictor.original_size
        )

    @torch.inference_mode()
    def decode(self, input_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw SAM output for boxes of the embedded image.

        Args:
            input_boxes: float32 ``(N, 4)`` xyxy pixels of SAM's input frame (:meth:`input_boxes`).

        Returns:
            ``low_res_logits`` float32 ``(N, 1, 256, 256)`` over the padded 1024x1024 input,
            and ``iou_pred`` float32 ``(N, 1)``, both on CPU.
        """
        with self._autocast():
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=input_boxes, masks=None)
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=self.predictor.features,
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return low_res.float().cpu(), iou.float().cpu()

    @torch.inference_mode()
    def postprocess(self, low_res_logits: torch.Tensor) -> np.ndarray:
        """Low-res logits ``(N, 1, 256, 256)`` -> bool masks ``(N, H, W)`` of the original frame."""
        up = self.sam.postprocess_masks(
            low_res_logits.to(self.device), self.predictor.input_size, self.predictor.original_size
        )
        return (up[:, 0] > self.mask_threshold).cpu().numpy()

    def reset(self) -> None:
        """Forget the embedded image."""
        self.predictor.reset_image()

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[list[dict], np.ndarray]:
        """:func:`masks_for_boxes` of this teacher."""
        return masks_for_boxes(self, image, boxes)


def masks_for_boxes(teacher, image: np.ndarray, boxes: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Masks for ``boxes`` (float32 ``(N, 4)`` xyxy pixels) on RGB uint8 ``image`` ``(H, W, 3)``
    by a segmenter with SAM's steps (``embed``, ``input_boxes``, ``decode``, ``postprocess``,
    ``reset``; attributes ``boxes_per_call``, ``min_region_area``): every SAM kind's ``__call__``.

    Returns:
        ``N`` compressed COCO RLE dicts (``size == [H, W]``, ``counts`` bytes), cleaned by
        :func:`remove_small_regions` at ``min_region_area``, and float32 ``(N,)`` predicted IoU
        (of the raw mask) clipped to [0, 1]. No boxes, no encoder run.
    """
    n = len(boxes)
    if n == 0:
        return [], np.zeros(0, np.float32)
    teacher.embed(image)
    rles, ious = [], []
    try:
        for s in range(0, n, teacher.boxes_per_call):
            low_res, iou = teacher.decode(teacher.input_boxes(boxes[s : s + teacher.boxes_per_call]))
            masks = teacher.postprocess(low_res)
            if teacher.min_region_area > 0:
                masks = np.stack([remove_small_regions(m, teacher.min_region_area) for m in masks])
            rles.extend(encode_masks(masks))
            ious.append(iou[:, 0].numpy())
    finally:
        teacher.reset()
    return rles, np.clip(np.concatenate(ious), 0.0, 1.0).astype(np.float32)


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """SAM's clean-up of one mask: holes, then islands, of fewer than ``min_area`` px removed
    (``segment_anything.utils.amg.remove_small_regions``, 8-connectivity, in the order of
    ``SamAutomaticMaskGenerator.postprocess_small_regions``); a mask whose islands are all small
    keeps its largest one.

    The library labels components over the whole frame; here it runs on the mask's bounding box
    grown by ``min_area`` px on every side (clipped to the frame), which gives the same result
    at a cost set by the mask, not the frame: every pixel outside the box is background, so a
    background region that leaves the grown box is connected exactly as in the full frame, and
    its part inside crosses the ``min_area`` px margin, so it is small in neither frame
    (checked against the library on the full frame in ``tests/labeling/test_segmenter_cleanup.py``).

    Args:
        mask: bool ``(H, W)``.
        min_area: px, ``>= 1``.

    Returns:
        bool ``(H, W)``, a new array (``mask`` is not modified).
    """
    from segment_anything.utils.amg import remove_small_regions as sam_remove_small_regions

    mask = np.asarray(mask, bool)
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if not len(ys):
        return mask.copy()
    y0, y1 = max(ys[0] - min_area, 0), min(ys[-1] + 1 + min_area, mask.shape[0])
    x0, x1 = max(xs[0] - min_area, 0), min(xs[-1] + 1 + min_area, mask.shape[1])
    crop, _ = sam_remove_small_regions(mask[y0:y1, x0:x1], min_area, "holes")
    crop, _ = sam_remove_small_regions(crop, min_area, "islands")
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = crop
    return out


def encode_masks(masks: np.ndarray) -> list[dict]:
    """bool ``(N, H, W)`` masks -> N compressed RLE dicts (``pycocotools.mask.encode``)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"]} for r in rles]
