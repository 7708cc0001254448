"""One adapter per segmenter kind: what the mask-decoder fine-tuning loop
(:func:`distillery.labeling.finetune.sam.finetune_mask_decoder`) needs from a SAM-family model.

The loop, data, box jitter, low-resolution targets, loss, embedding cache, validation, resume
and provenance are the same for every kind; an adapter only says how the kind embeds an image,
moves boxes into its input frame, decodes boxes into low-resolution logits, upsamples them to
the original frame, which weights the embedding depends on, what trains, and how the weights
are written:

========  ===============================  ==============================  ==================
kind      model (library)                  input frame (resized image)     written as
========  ===============================  ==============================  ==================
sam       ``Sam`` (segment-anything)       longest side 1024, padded       ``state_dict`` file
sam2      ``Sam2Model`` (transformers)     1024x1024, aspect not kept      ``save_pretrained``
sam-hq    ``SamHQModel`` (transformers)    longest side 1024, padded       ``save_pretrained``
========  ===============================  ==============================  ==================

Every kind's low-resolution logits are ``(N, 1, 256, 256)`` over its padded 1024x1024 input, so
the targets (:func:`~distillery.labeling.finetune.sam_data.low_res_targets`) are the full-frame
masks resized to :meth:`MaskKind.input_size`, padded to :attr:`MaskKind.pad_size` and
area-pooled to :attr:`MaskKind.low_res_size`.

The transformers kinds reuse the labelling teacher's own steps
(:class:`~distillery.labeling.segmenter_hf.HFSegmenter`: ``image_features``, ``input_boxes``,
``forward_masks``, ``postprocess``), so training, validation and labelling see one preprocessing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch

#: ``segmenter.kind`` values ``teachers finetune --component segmenter`` trains.
FINETUNE_SEGMENTERS = ("sam", "sam2", "sam-hq")
#: Name of each kind in log lines.
KIND_NAMES = {"sam": "SAM", "sam2": "SAM 2", "sam-hq": "SAM-HQ"}


def state_hash(model: torch.nn.Module, prefixes: tuple[str, ...], extra: bytes = b"", exclude=frozenset()) -> str:
    """blake2b (16 hex) over the names, dtypes, shapes and bytes of ``model.state_dict()`` entries
    whose name starts with one of ``prefixes`` (all entries when ``prefixes`` is empty) and is not
    in ``exclude``, then ``extra``."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in model.state_dict().items():
        if (prefixes and not name.startswith(prefixes)) or name in exclude:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(extra)
    return h.hexdigest()


def features_to(features, device: torch.device):
    """An embedding (a tensor, or lists / tuples of them) moved to ``device``."""
    if isinstance(features, torch.Tensor):
        return features.to(device)
    return type(features)(features_to(f, device) for f in features)


class MaskKind:
    """What one segmenter kind gives the fine-tuning loop (module docstring). Frames as in the
    label record: sizes ``(height, width)``, boxes xyxy pixels."""

    kind: str = ""
    model: torch.nn.Module
    device: torch.device
    mask_threshold: float = 0.0
    #: prefixes of the state-dict names the image embedding depends on
    encoder_weights: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return KIND_NAMES[self.kind]

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` of the resized image inside the model input."""
        raise NotImplementedError

    pad_size: tuple[int, int]
    low_res_size: tuple[int, int]

    def embed(self, pixels: np.ndarray):
        """The frozen image encoder's output for RGB uint8 ``(H, W, 3)`` ``pixels``, float32, no autograd."""
        raise NotImplementedError

    def input_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> torch.Tensor:
        """float ``(N, 4)`` xyxy original-frame pixels -> float32 ``(N, 4)`` xyxy input-frame pixels
        on the device, computed as the labelling teacher's ``input_boxes`` does."""
        raise NotImplementedError

    def decode(self, features, input_boxes: torch.Tensor, *, grad_prompt: bool = False):
        """``(low_res_logits (N, 1, *low_res_size), iou_pred (N, 1))`` on the device, with autograd
        through the decoder (and the prompt encoder when ``grad_prompt``) where enabled."""
        raise NotImplementedError

    def postprocess(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]) -> np.ndarray:
        """Low-res logits -> bool ``(N, H, W)`` masks of the original frame, thresholded as labelling does."""
        raise NotImplementedError

    def encoder_key(self) -> str:
        """Hash of what an embedding depends on: :attr:`encoder_weights` (and preprocessing settings)."""
        return state_hash(self.model, self.encoder_weights, self._preprocessing())

    def _preprocessing(self) -> bytes:
        return b""

    def trainable(self, prompt_encoder: bool = False) -> tuple[dict[str, torch.nn.Module], list[torch.nn.Parameter]]:
        """The trained modules by name (``mask_decoder``, with ``prompt_encoder`` when asked) and
        their parameters the loop optimises: all of them except those the embedding reads
        (SAM 2's ``conv_s0`` / ``conv_s1``, applied once per image by ``get_image_features``; the
        cached embeddings hold their output, so they stay as they are)."""
        modules = {"mask_decoder": self.model.mask_decoder}
        if prompt_encoder:
            modules["prompt_encoder"] = self.model.prompt_encoder
        params = []
        for name, m in modules.items():
            params += [p for n, p in m.named_parameters() if not f"{name}.{n}".startswith(self.encoder_weights)]
        return modules, params

    def to(self, device: torch.device) -> "MaskKind":
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def save(self, out: Path) -> None:
        """Write the whole model (trained modules included) to ``out``, whole or not at all."""
        raise NotImplementedError


class SamKind(MaskKind):
    """segment-anything's ``Sam``: the steps of ``SamPredictor`` (``ResizeLongestSide``,
    ``Sam.preprocess``, ``image_encoder``; ``prompt_encoder`` + ``mask_decoder``;
    ``Sam.postprocess_masks``). Written as a ``state_dict`` file that
    :func:`~distillery.labeling.segmenter.load_sam` reads."""

    kind = "sam"
    encoder_weights = ("image_encoder.", "pixel_mean", "pixel_std")

    def __init__(self, model) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.mask_threshold = float(model.mask_threshold)
        self.pad_size = (model.image_encoder.img_size,) * 2
        self.low_res_size = tuple(model.prompt_encoder.mask_input_size)

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    def to(self, device):
        self.model.to(device)
        return self

    def input_size(self, original_size):
        return self.transform.get_preprocess_shape(original_size[0], original_size[1], self.transform.target_length)

    @torch.no_grad()
    def embed(self, pixels):
        x = torch.as_tensor(self.transform.apply_image(pixels), device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.model.image_encoder(self.model.preprocess(x)).float()

    def input_boxes(self, boxes, original_size):
        # SamTeacher.input_boxes: ResizeLongestSide.apply_boxes_torch on float32
        return self.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32, device=self.device),
                                                tuple(original_size))

    def decode(self, features, input_boxes, *, grad_prompt=False):
        with torch.set_grad_enabled(grad_prompt and torch.is_grad_enabled()):
            sparse, dense = self.model.prompt_encoder(points=None, boxes=input_boxes, masks=None)
            image_pe = self.model.prompt_encoder.get_dense_pe()
        return self.model.mask_decoder(image_embeddings=features, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                                       dense_prompt_embeddings=dense, multimask_output=False)

    @torch.no_grad()
    def postprocess(self, low_res_logits, original_size):
        up = self.model.postprocess_masks(low_res_logits, self.input_size(original_size), tuple(original_size))
        return (up[:, 0] > self.mask_threshold).cpu().numpy()

    def save(self, out):
        _atomic_file({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, Path(out))


class HFKind(MaskKind):
    """A transformers SAM-family teacher (:class:`~distillery.labeling.segmenter_hf.HFSegmenter`,
    loaded at fp32): its own steps, written with ``save_pretrained`` (model and processor) to a
    folder that ``from_pretrained`` -- and so ``segmenter.model`` of a preset -- loads."""

    def __init__(self, teacher) -> None:
        self.teacher, self.kind, self.model = teacher, teacher.kind, teacher.model
        self.device = teacher.device
        self.mask_threshold = float(teacher.mask_threshold)
        self.encoder_weights = tuple(teacher.encoder_weights)
        self.pad_size, self.low_res_size = tuple(teacher.pad_size), tuple(teacher.low_res_size)

    def input_size(self, original_size):
        return self.teacher.input_size(tuple(original_size))

    def _preprocessing(self):
        return self.teacher.processor.image_processor.to_json_string().encode()

    def embed(self, pixels):
        return features_to(self.teacher.image_features(pixels), self.device)

    def input_boxes(self, boxes, original_size):
        return self.teacher.input_boxes(boxes, tuple(original_size))

    def decode(self, features, input_boxes, *, grad_prompt=False):
        return self.teacher.forward_masks(features, input_boxes)

    def postprocess(self, low_res_logits, original_size):
        return self.teacher.postprocess(low_res_logits, tuple(original_size))

    def to(self, device):
        super().to(device)
        self.teacher.device = self.device
        return self

    def save(self, out):
        out = Path(out)
        tmp, old = out.with_name(f".{out.name}.tmp{os.getpid()}"), out.with_name(f".{out.name}.old{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.teacher.processor.save_pretrained(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


def as_kind(model) -> MaskKind:
    """A :class:`MaskKind` for ``model``: itself, a segment-anything ``Sam``, a
    :class:`~distillery.labeling.segmenter.SamTeacher` or an
    :class:`~distillery.labeling.segmenter_hf.HFSegmenter` (SAM 2, SAM-HQ).

    Raises:
        TypeError: anything else.
    """
    from distillery.labeling.segmenter import SamTeacher
    from distillery.labeling.segmenter_hf import HFSegmenter

    if isinstance(model, MaskKind):
        return model
    if isinstance(model, SamTeacher):
        return SamKind(model.sam)
    if isinstance(model, HFSegmenter):
        return HFKind(model)
    from segment_anything.modeling import Sam

    if isinstance(model, Sam):
        return SamKind(model)
    raise TypeError(f"no mask-decoder fine-tuning for a {type(model).__name__}: give a segment-anything Sam, "
                    "a SamTeacher, or a Sam2Teacher / SamHQTeacher")


def load_kind(segmenter, device: str = "auto") -> MaskKind:
    """The base model of a preset's ``segmenter`` section (:class:`~distillery.labeling.teachers.SegmenterConfig`)
    at fp32 on ``device``: ``sam`` from ``model_type`` + ``checkpoint``, the transformers kinds
    from ``model`` + ``revision``.

    Raises:
        ValueError: a kind not in :data:`FINETUNE_SEGMENTERS`, or weights that cannot be loaded
            (one line naming ``segmenter.model``); FileNotFoundError: no SAM checkpoint file.
    """
    from distillery.labeling.detector import resolve_device

    if segmenter.kind not in FINETUNE_SEGMENTERS:
        raise ValueError(f"fine-tuning covers segmenter kinds {', '.join(FINETUNE_SEGMENTERS)}, not {segmenter.kind}")
    if segmenter.kind == "sam":
        from distillery.labeling.segmenter import load_sam

        return SamKind(load_sam(segmenter.model_type, segmenter.checkpoint).to(resolve_device(device)).eval())
    from distillery.labeling.segmenter_hf import HF_TEACHERS

    teacher = HF_TEACHERS[segmenter.kind](segmenter.model, revision=segmenter.revision, device=device,
                                          precision="fp32", min_region_area=0)
    return HFKind(teacher)


def _atomic_file(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
