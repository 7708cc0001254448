"""Box-prompted mask teachers from transformers: SAM 2 (``segmenter.kind: sam2``) and SAM-HQ
(``segmenter.kind: sam-hq``), with the steps and return types of
:class:`distillery.labeling.segmenter.SamTeacher`.

Steps, as separate methods (the model's own processor does every change of frame):

* :meth:`HFSegmenter.embed` -- the processor's image preprocessing and the image encoder,
  once per image (``get_image_embeddings``). SAM 2 (``Sam2ImageProcessor``) resizes the image
  to 1024x1024 *without* keeping its aspect ratio; SAM-HQ (``SamImageProcessor``, as SAM)
  resizes its longest side to 1024 and pads to 1024x1024;
* :meth:`HFSegmenter.input_boxes` -- boxes from the original frame to the model's input frame
  (the processor's ``_normalize_coordinates``: x times new_w / w, y times new_h / h, with
  (new_h, new_w) = (1024, 1024) for SAM 2, the longest-side-1024 resize for SAM-HQ);
* :meth:`HFSegmenter.decode` -- prompt encoder + mask decoder for a batch of input-frame boxes
  of the embedded image, ``multimask_output=False``: raw low-resolution mask logits
  ``(N, 1, 256, 256)`` over the 1024x1024 input and the predicted IoU ``(N, 1)``;
* :meth:`HFSegmenter.postprocess` -- the processor's ``post_process_masks`` (SAM 2: bilinear
  upsampling straight to the original frame; SAM-HQ: upsample to 1024, crop the padding,
  resize to the original frame), thresholded at 0.0 (both processors' ``mask_threshold``).

The same steps, without the per-image state, serve the fine-tuning of the mask decoder
(:mod:`distillery.labeling.finetune.sam_kinds`): :meth:`HFSegmenter.image_features` (the
embedding, for a cache), :meth:`HFSegmenter.forward_masks` (the decoder with autograd),
``input_boxes`` / ``postprocess`` with an explicit ``original_size``, and the frames
(:meth:`HFSegmenter.input_size`, :attr:`HFSegmenter.pad_size`, :attr:`HFSegmenter.low_res_size`).

The mask score is the predicted IoU clipped to [0, 1], as for SAM. SAM 2's object-score
logit is not applied, as in ``SAM2ImagePredictor`` (facebookresearch/sam2), which returns
the decoder's masks and IoU only. SAM-HQ runs with ``hq_token_only=False`` (the transformers
default and the sam-hq predictor's: the HQ mask is added to SAM's).
"""

from __future__ import annotations

import numpy as np
import torch

from distillery.labeling.detector import DTYPES, resolve_device
from distillery.labeling.segmenter import MIN_REGION_AREA, autocast, masks_for_boxes


class HFSegmenter:
    """Masks for given boxes with a transformers SAM-family model (see the module docstring).

    Args:
        model: a local folder or hub id that ``model_class.from_pretrained`` loads (weights
            and the processor's ``preprocessor_config.json``).
        revision: hub revision (branch, tag or commit); None: ``main``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        precision: ``"fp32"``, ``"fp16"``, ``"bf16"`` (autocast, GPU only).
        boxes_per_call: boxes decoded per mask-decoder call.
        min_region_area: px; SAM's small-region clean-up of every mask, as ``SamTeacher``'s
            (:func:`~distillery.labeling.segmenter.remove_small_regions`; 0 turns it off).

    Raises:
        ValueError: the model or its processor cannot be loaded, or its ``config.model_type``
            is not this kind's (one line naming ``segmenter.model``).
    """

    #: transformers class names of the model and its processor (set by each kind)
    model_class: str = ""
    processor_class: str = ""
    #: ``segmenter.kind`` this class serves, for error messages
    kind: str = ""
    #: the transformers ``config.model_type`` the weights must have
    model_type: str = ""

    def __init__(self, model: str, *, revision: str | None = None, device: str = "auto",
                 precision: str = "fp32", boxes_per_call: int = 32, min_region_area: int = MIN_REGION_AREA) -> None:
        import transformers

        if int(min_region_area) < 0:
            raise ValueError(f"min_region_area must be >= 0 px, got {min_region_area}")
        self.min_region_area = int(min_region_area)
        self.device = resolve_device(device)
        try:
            config = transformers.AutoConfig.from_pretrained(model, revision=revision)
        except (OSError, ValueError) as e:
            raise self._load_error(model, e) from e
        if config.model_type != self.model_type:
            raise ValueError(f"segmenter.model {model!r} is a {config.model_type!r} model, not the "
                             f"{self.model_type!r} that segmenter.kind {self.kind} loads; set the kind that matches it")
        try:
            self.model = getattr(transformers, self.model_class).from_pretrained(model, revision=revision)
            self.processor = getattr(transformers, self.processor_class).from_pretrained(model, revision=revision)
        except (OSError, ValueError) as e:
            raise self._load_error(model, e) from e
        self.model = self.model.to(self.device).eval()
        self.dtype = DTYPES[precision] if self.device.type == "cuda" else torch.float32
        self.boxes_per_call = int(boxes_per_call)
        self.mask_threshold = 0.0
        self.features = None
        self.original_size: tuple[int, int] | None = None

    def _load_error(self, model: str, e: Exception) -> ValueError:
        first = str(e).splitlines()[0] if str(e) else ""
        return ValueError(
            f"segmenter.model {model!r} (kind {self.kind}) cannot be loaded as a {self.model_class}: not a local "
            "folder with its weights and preprocessor_config.json (relative paths are relative to the preset), "
            f"nor a hub id in the cache. {type(e).__name__}: {first}")

    def _autocast(self):
        return autocast(self.device, self.dtype)

    # --- per-kind differences --------------------------------------------------------------

    #: prefixes of the ``state_dict`` names that :meth:`encode` reads: the weights an image
    #: embedding depends on (with the processor's configuration)
    encoder_weights: tuple[str, ...] = ()

    def encode(self, pixel_values: torch.Tensor):
        """Image encoder output for ``pixel_values`` ``(1, 3, 1024, 1024)``, kept for :meth:`decode`."""
        raise NotImplementedError

    def _decoder_inputs(self, features) -> dict:
        """Keyword arguments of the model's forward that carry the image features ``features``."""
        raise NotImplementedError

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` of an ``original_size`` image resized by the processor (module docstring)."""
        raise NotImplementedError

    @property
    def pad_size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input that holds the resized image at its top left."""
        raise NotImplementedError

    @property
    def low_res_size(self) -> tuple[int, int]:
        """``(height, width)`` of :meth:`decode`'s logits: 4x the image-embedding grid, over :attr:`pad_size`."""
        raise NotImplementedError

    def _to_input_frame(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def _upsample(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    # --- the steps -------------------------------------------------------------------------

    def image_features(self, image: np.ndarray):
        """The processor's preprocessing and :meth:`encode` of one RGB uint8 ``(H, W, 3)`` image,
        without autograd and without keeping anything: the embedding :meth:`decode` reads
        (SAM 2: a list of 3 FPN levels, high resolution first; SAM-HQ: (embedding, [first
        global-attention ViT output])), on the teacher's device."""
        inputs = self.processor(images=image, return_tensors="pt")
        with torch.no_grad(), self._autocast():
            return self.encode(inputs["pixel_values"].to(self.device))

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> None:
        """Preprocess and encode one RGB uint8 ``(H, W, 3)`` image (kept for :meth:`decode`)."""
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.features = self.image_features(image)

    def input_boxes(self, boxes: np.ndarray, original_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Boxes from the original frame to the model's input frame.

        Args:
            boxes: float32 ``(N, 4)`` xyxy, absolute pixels of the original ``(H, W)`` frame.
            original_size: ``(H, W)``; default: the embedded image's.

        Returns:
            float32 ``(N, 4)`` xyxy pixels of the model's input frame (module docstring), on
            the teacher's device.
        """
        size = self.original_size if original_size is None else tuple(original_size)
        out = self._to_input_frame(np.asarray(boxes, np.float64).reshape(-1, 4), size)
        return torch.as_tensor(np.asarray(out), dtype=torch.float32, device=self.device).reshape(-1, 4)

    def forward_masks(self, features, input_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder (``multimask_output=False``) on image ``features``
        (:meth:`image_features`), with autograd wherever it is enabled and parameters require it.

        Args:
            input_boxes: float32 ``(N, 4)`` xyxy pixels of the input frame (:meth:`input_boxes`).

        Returns:
            ``low_res_logits`` ``(N, 1, *low_res_size)`` over :attr:`pad_size` and ``iou_pred``
            ``(N, 1)``, on the teacher's device. In training mode SAM 2's decoder returns its
            single-mask token's output; in eval mode it falls back to the best multimask output
            when that one is unstable (``Sam2MaskDecoder._dynamic_multimask_via_stability``).
        """
        out = self.model(input_boxes=input_boxes[None].to(self.device), multimask_output=False,
                         **self._decoder_inputs(features))
        return out.pred_masks[0], out.iou_scores[0]

    @torch.inference_mode()
    def decode(self, input_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw model output for boxes of the embedded image.

        Args:
            input_boxes: float32 ``(N, 4)`` xyxy pixels of the input frame (:meth:`input_boxes`).

        Returns:
            ``low_res_logits`` float32 ``(N, 1, 256, 256)`` over the 1024x1024 input, and
            ``iou_pred`` float32 ``(N, 1)``, both on CPU.
        """
        with self._autocast():
            low_res, iou = self.forward_masks(self.features, input_boxes)
        return low_res.float().cpu(), iou.float().cpu()

    @torch.inference_mode()
    def postprocess(self, low_res_logits: torch.Tensor, original_size: tuple[int, int] | None = None) -> np.ndarray:
        """Low-res logits ``(N, 1, 256, 256)`` -> bool masks ``(N, H, W)`` of the original frame
        (``original_size``; default: the embedded image's)."""
        size = self.original_size if original_size is None else tuple(original_size)
        up = self._upsample(low_res_logits.to(self.device).float(), size)
        return (up[:, 0] > self.mask_threshold).cpu().numpy()

    def reset(self) -> None:
        self.features = None

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[list[dict], np.ndarray]:
        """:func:`~distillery.labeling.segmenter.masks_for_boxes` of this teacher (SAM's loop and
        small-region clean-up)."""
        return masks_for_boxes(self, image, boxes)


class Sam2Teacher(HFSegmenter):
    """SAM 2 (transformers ``Sam2Model`` + ``Sam2Processor``); e.g. ``facebook/sam2.1-hiera-tiny``."""

    model_class, processor_class, kind, model_type = "Sam2Model", "Sam2Processor", "sam2", "sam2"
    # Sam2Model.get_image_features applies the decoder's conv_s0 / conv_s1 to the two high-resolution
    # FPN levels, and get_image_embeddings adds no_memory_embedding to the last one
    encoder_weights = ("vision_encoder.", "mask_decoder.conv_s0.", "mask_decoder.conv_s1.", "no_memory_embedding")

    def encode(self, pixel_values):
        return self.model.get_image_embeddings(pixel_values)  # FPN levels, high resolution first

    def _decoder_inputs(self, features):
        return {"image_embeddings": features}

    def input_size(self, original_size):
        size = self.processor.image_processor.size  # 1024x1024 whatever the aspect ratio
        return int(size["height"]), int(size["width"])

    @property
    def pad_size(self):
        return self.input_size((1, 1))

    @property
    def low_res_size(self):
        return tuple(self.model.prompt_encoder.mask_input_size)

    def _to_input_frame(self, boxes, original_size):
        p = self.processor
        return p._normalize_coordinates(p.target_size, torch.from_numpy(boxes), original_size,
                                        is_bounding_box=True).numpy()

    def _upsample(self, low_res_logits, original_size):
        return self.processor.post_process_masks([low_res_logits], [original_size], binarize=False)[0]


class SamHQTeacher(HFSegmenter):
    """SAM-HQ (transformers ``SamHQModel`` + ``SamHQProcessor``); e.g. ``syscv-community/sam-hq-vit-base``."""

    model_class, processor_class, kind, model_type = "SamHQModel", "SamHQProcessor", "sam-hq", "sam_hq"
    encoder_weights = ("vision_encoder.",)

    def encode(self, pixel_values):
        embeddings, intermediate = self.model.get_image_embeddings(pixel_values)
        # the HQ decoder reads only the first global-attention block's output
        # (SamHQMaskDecoder.forward: intermediate_embeddings[0]); the others are not kept
        return embeddings, list(intermediate[:1])

    def _decoder_inputs(self, features):
        embeddings, intermediate = features
        return {"image_embeddings": embeddings, "intermediate_embeddings": intermediate, "hq_token_only": False}

    def input_size(self, original_size):
        ip = self.processor.image_processor  # longest side to 1024 (SamImageProcessor.resize)
        return tuple(int(v) for v in ip._get_preprocess_shape(tuple(original_size), ip.size["longest_edge"]))

    @property
    def pad_size(self):
        pad = self.processor.image_processor.pad_size
        return int(pad["height"]), int(pad["width"])

    @property
    def low_res_size(self):
        n = 4 * int(self.model.config.prompt_encoder_config.image_embedding_size)
        return n, n

    def _to_input_frame(self, boxes, original_size):
        p = self.processor
        return p._normalize_coordinates(p.target_size, boxes, original_size, is_bounding_box=True)

    def _upsample(self, low_res_logits, original_size):
        return self.processor.post_process_masks([low_res_logits], [original_size], [self.input_size(original_size)],
                                                 binarize=False)[0]


#: ``segmenter.kind`` -> its class
HF_TEACHERS = {cls.kind: cls for cls in (Sam2Teacher, SamHQTeacher)}
