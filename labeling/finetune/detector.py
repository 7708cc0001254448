"""Grounding DINO fine-tuning: training targets, the loss, which parameters train, one epoch.

Targets. Each training image gets its own caption (Open-GroundingDino's ODVG recipe,
``datasets/odvg.py``): the prompts of the classes present in it, plus negative classes
sampled from the rest of the ontology up to ``max_classes`` (80 there) and as many as fit the
text encoder's 256 tokens, in shuffled order. Caption layout and token spans come from
:func:`distillery.labeling.ontology.caption_chunk`, the code labelling uses, so a class
maps to the same tokens at training and at labelling time. Boxes are normalised cxcywh of
the unpadded frame, the convention of the model's ``pred_boxes`` and of labelling's
post-processing.

Loss: :mod:`.loss` (transformers' own, with labelling's token map, ignore regions and
mmdetection's encoder-proposal loss).

Parameters (``method``): ``lora`` trains peft LoRA adapters (rank r, alpha = r, no dropout)
on the linears of the encoder and decoder layers: attention (``query``, ``key``, ``value``,
``out_proj``), deformable attention (``value_proj``, ``output_proj``, ``sampling_offsets``),
the image-text fusion (``vision_proj``, ``text_proj``, ``values_*_proj``, ``out_*_proj``) and
the feed-forward ``fc1``/``fc2``; never the box MLP ``bbox_embed`` that the heads and the
decoder share, nor the frozen Swin and BERT. ``heads`` trains only the heads' own
parameters: the box MLPs ``bbox_embed`` (tied to ``model.decoder.bbox_embed``) and
``model.encoder_output_bbox_embed``; the class heads (``class_embed``,
``model.encoder_output_class_embed``) are parameter-free dot products with the text features
in transformers. ``full`` trains everything but the Swin backbone and BERT, which every
method freezes (mmdetection's Grounding DINO fine-tune recipe).
"""

from __future__ import annotations

import contextlib
import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_convert

from distillery.labeling.finetune.loss import grounding_dino_loss, proposal_loss  # noqa: F401 - re-exported
from distillery.labeling.ontology import Ontology, PromptChunk, caption_chunk

#: Leaf names of the linears LoRA adapts (transformers' Grounding DINO layer names).
LORA_LEAVES = ("query", "key", "value", "out_proj", "fc1", "fc2", "value_proj", "output_proj", "sampling_offsets",
               "vision_proj", "text_proj", "values_vision_proj", "values_text_proj", "out_vision_proj", "out_text_proj")
#: peft ``target_modules`` (a regex, full match): those leaves inside encoder and decoder layers only.
LORA_TARGET_MODULES = r"model\.(encoder|decoder)\.layers\.\d+\.(.+\.)?(" + "|".join(LORA_LEAVES) + ")"
#: Frozen by every method: the Swin image backbone and the BERT text encoder.
FROZEN_PREFIXES = ("model.backbone.", "model.text_backbone.")
#: ``heads``: the box MLPs (the class heads have no parameters).
HEAD_PREFIXES = ("bbox_embed.", "model.decoder.bbox_embed.", "model.encoder_output_bbox_embed.")
METHODS = ("lora", "heads", "full")


class CaptionError(ValueError):
    """An image's positive classes do not fit in one caption."""


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite."""


# -- parameters ---------------------------------------------------------------------------

def peft_ready(model):
    """Make a ``GroundingDinoForObjectDetection`` answer ``get_input_embeddings()`` (BERT's word
    embeddings), which peft asks for when it adds or loads an adapter (to find weights tied to
    them) and which transformers' Grounding DINO leaves unimplemented (NotImplementedError).
    Returns ``model``."""
    model.get_input_embeddings = model.model.text_backbone.get_input_embeddings
    return model


def make_trainable(model, method: str, rank: int = 16):
    """Freeze ``model`` (a ``GroundingDinoForObjectDetection``) but what ``method`` trains (see the
    module docstring). Returns the model to train: a peft ``PeftModel`` for ``lora``, else ``model``.

    Raises:
        ValueError: an unknown method or a rank below 1.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    model.requires_grad_(False)
    if method == "lora":
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=int(rank), lora_alpha=int(rank), lora_dropout=0.0, bias="none",
                         target_modules=LORA_TARGET_MODULES)
        return get_peft_model(peft_ready(model), cfg)
    for name, p in model.named_parameters(remove_duplicate=False):
        if method == "heads":
            p.requires_grad_(p.requires_grad or name.startswith(HEAD_PREFIXES))
        else:
            p.requires_grad_(not name.startswith(FROZEN_PREFIXES))
    return model


def parameter_counts(model) -> dict:
    """``{"trainable", "total", "fraction"}``: parameters (tied ones once) that train, all of them."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


def detection_model(model):
    """The ``GroundingDinoForObjectDetection`` inside ``model`` (a DDP and/or peft wrapper, or itself)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# -- targets ------------------------------------------------------------------------------

@dataclass
class DetectionTarget:
    """One image's caption and targets.

    Attributes:
        chunk: the caption and its token spans (:class:`PromptChunk`).
        class_of_row: int64 ``(K,)`` ontology class of each label-map row (one per class in the caption).
        label_map: float32 ``(K, max_text_len)``: 1 on the tokens of every prompt of that class.
        class_labels: int64 ``(N,)`` label-map row of each positive.
        boxes: float32 ``(N, 4)`` positives, cxcywh normalised by the frame's width and height.
        ignore_boxes: float32 ``(M, 4)`` ignore regions, same convention.
    """

    chunk: PromptChunk
    class_of_row: np.ndarray
    label_map: np.ndarray
    class_labels: np.ndarray
    boxes: np.ndarray
    ignore_boxes: np.ndarray

    def labels(self, device=None) -> dict:
        """The dict transformers' loss takes (``class_labels``, ``boxes``) plus ``label_map`` and
        ``ignore_boxes`` for :func:`grounding_dino_loss`."""
        t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
        return {"class_labels": t(self.class_labels, torch.long), "boxes": t(self.boxes, torch.float32),
                "label_map": t(self.label_map, torch.float32), "ignore_boxes": t(self.ignore_boxes, torch.float32)}


def normalized_cxcywh(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """xyxy absolute pixels ``(N, 4)`` -> cxcywh normalised by ``width``/``height``, float32."""
    b = torch.as_tensor(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4))
    return (box_convert(b, "xyxy", "cxcywh") / torch.tensor([width, height, width, height])).numpy()


class CaptionSampler:
    """Per-image captions: positive classes plus sampled negatives (see the module docstring).

    Args:
        ontology: the label set's ontology; tokenizer: the detector's fast tokenizer.
        max_text_len: the text encoder's limit (256); max_classes: classes per caption at most
            (Open-GroundingDino's ``max_labels``, 80).
    """

    def __init__(self, ontology: Ontology, tokenizer, max_text_len: int = 256, max_classes: int = 80) -> None:
        self.ontology, self.tokenizer = ontology, tokenizer
        self.max_text_len, self.max_classes = int(max_text_len), int(max_classes)
        self.prompts_of = [[p for p, c in enumerate(ontology.prompt_class) if c == k] for k in range(len(ontology.classes))]
        ntok = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ontology.prompts]
        # " . " after each prompt is one more token; [CLS] and [SEP] are two per caption
        self.cost = [sum(ntok[p] + 1 for p in ps) for ps in self.prompts_of]

    def check(self, classes) -> None:
        """Raises :class:`CaptionError` when these classes' prompts alone exceed one caption."""
        need = 2 + sum(self.cost[k] for k in set(int(c) for c in classes))
        if need > self.max_text_len:
            raise CaptionError(f"{len(set(classes))} positive classes take {need} tokens; at most "
                               f"{self.max_text_len} fit in a caption")

    def caption(self, positives, rng: random.Random) -> tuple[PromptChunk, list[int]]:
        """``(chunk, classes in caption order)`` for an image whose positive classes are ``positives``."""
        self.check(positives)
        pos = sorted(set(int(c) for c in positives))
        budget = self.max_text_len - 2 - sum(self.cost[k] for k in pos)
        others = [k for k in range(len(self.cost)) if k not in set(pos)]
        negs = []
        for k in rng.sample(others, min(len(others), max(self.max_classes - len(pos), 0))):
            if self.cost[k] <= budget:
                negs.append(k)
                budget -= self.cost[k]
        classes = pos + negs
        rng.shuffle(classes)
        prompt_ids = [p for k in classes for p in self.prompts_of[k]]
        return caption_chunk(self.ontology, self.tokenizer, prompt_ids, self.max_text_len), classes

    def target(self, image, rng: random.Random, flip: bool = False) -> DetectionTarget:
        """The target of a :class:`~distillery.labeling.finetune.data.TrainImage` (mirrored
        left-right when ``flip``, as the pixels must be)."""
        chunk, classes = self.caption(image.classes, rng)
        row_of = {k: r for r, k in enumerate(classes)}
        label_map = np.zeros((len(classes), self.max_text_len), np.float32)
        start = 0
        for r, k in enumerate(classes):  # prompts appear class by class, in caption order
            n = len(self.prompts_of[k])
            label_map[r] = (chunk.positive_map[start:start + n] > 0).any(axis=0)
            start += n
        boxes, ignore = image.boxes.copy(), image.ignore_boxes.copy()
        if flip:
            for b in (boxes, ignore):
                b[:, [0, 2]] = image.width - b[:, [2, 0]]
        return DetectionTarget(
            chunk=chunk, class_of_row=np.asarray(classes, np.int64), label_map=label_map,
            class_labels=np.asarray([row_of[int(c)] for c in image.classes], np.int64),
            boxes=normalized_cxcywh(boxes, image.height, image.width),
            ignore_boxes=normalized_cxcywh(ignore, image.height, image.width),
        )


# -- loss ---------------------------------------------------------------------------------

def training_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The whole training loss of a batch of :class:`Collate`: the decoder layers'
    (:func:`grounding_dino_loss`, through the model's own forward) plus :func:`proposal_loss`.
    ``model`` may be wrapped (peft, DDP). Returns ``(loss, loss_dict)``."""
    out = model(**batch)
    enc, enc_dict = proposal_loss(out, batch["labels"], batch["attention_mask"], detection_model(model).config)
    return out.loss + enc, {**out.loss_dict, **enc_dict}


# -- batches ------------------------------------------------------------------------------

class DetectionDataset(torch.utils.data.Dataset):
    """Decoded images and their :class:`DetectionTarget`; captions, negatives and flips are drawn
    from ``random.Random`` seeded by (seed, epoch, image id), so a run resumed at an epoch
    draws what the uninterrupted run drew, whatever the number of workers."""

    def __init__(self, images: list, sampler: CaptionSampler, seed: int = 0, flip: float = 0.0) -> None:
        self.images, self.sampler, self.seed, self.flip, self.epoch = list(images), sampler, int(seed), float(flip), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, DetectionTarget]:
        from distillery.engine.images import decode

        im = self.images[i]
        d = decode(im.path)
        if d.error is not None or (d.height, d.width) != (im.height, im.width):
            raise ValueError(f"{im.path}: {d.error or f'decoded as {d.width}x{d.height}'}, but labeled as "
                             f"{im.width}x{im.height} (file changed since labeling?); relabel it or restore the file")
        rng = random.Random(f"{self.seed}:{self.epoch}:{im.image_id}")
        flip = rng.random() < self.flip
        pixels = d.pixels[:, ::-1] if flip else d.pixels
        return np.ascontiguousarray(pixels), self.sampler.target(im, rng, flip)


class Collate:
    """A list of ``(pixels, target)`` -> model inputs: the processor's resize, normalisation and
    padding (``pixel_values``, ``pixel_mask``), captions tokenised and right-padded
    (``input_ids``, ``token_type_ids``, ``attention_mask``), and ``labels``."""

    def __init__(self, processor, image_size: dict | None = None) -> None:
        self.processor, self.image_size = processor, image_size

    def __call__(self, batch: list) -> dict:
        kwargs = {"size": self.image_size} if self.image_size else {}
        px = self.processor.image_processor(images=[b[0] for b in batch], return_tensors="pt", **kwargs)
        text = self.processor.tokenizer([b[1].chunk.text for b in batch], padding="longest", return_tensors="pt",
                                        return_token_type_ids=True)
        return {"pixel_values": px["pixel_values"], "pixel_mask": px["pixel_mask"], **text,
                "labels": [b[1].labels() for b in batch]}


def to_device(inputs: dict, device) -> dict:
    out = {k: v.to(device) for k, v in inputs.items() if k != "labels"}
    out["labels"] = [{k: v.to(device) for k, v in t.items()} for t in inputs["labels"]]
    return out


def train_epoch(model, loader, optimizer, device, clip: float = 0.1, on_step=None) -> float:
    """One pass over ``loader`` (batches of :class:`Collate`); gradients clipped to norm ``clip``
    (mmdetection's recipe: 0.1). ``on_step(step, loss)`` is called after each step.
    Returns the mean training loss.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (lower the learning rate).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total, steps = 0.0, 0
    for batch in loader:
        loss, _ = training_loss(model, to_device(batch, device))
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training loss is {loss.item()} at step {steps + 1}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        total += float(loss.detach())
        steps += 1
        if on_step is not None:
            on_step(steps, float(loss.detach()))
    return total / max(steps, 1)


# -- validation ---------------------------------------------------------------------------

def box_ap(images: list, detections: list, num_classes: int) -> dict:
    """COCO box AP (``pycocotools`` COCOeval, stats[0]) and AP50 (stats[1]) of ``detections``
    (:class:`distillery.labeling.detector.Detections`, one per image) against the images'
    positives; ignore regions count as crowd (never a false positive). None when no positive."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}
    res = []
    for i, (im, det) in enumerate(zip(images, detections), 1):
        gt["images"].append({"id": i, "width": im.width, "height": im.height})
        for boxes, classes, crowd in ((im.boxes, im.classes, 0), (im.ignore_boxes, [0] * len(im.ignore_boxes), 1)):
            for b, c in zip(boxes, classes):
                w, h = float(b[2] - b[0]), float(b[3] - b[1])
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": int(c) + 1,
                                          "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": crowd})
        for b, s in zip(det.boxes, det.scores):
            res.append({"image_id": i, "category_id": int(s.argmax()) + 1, "score": float(s.max()),
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    if not any(im.classes.size for im in images):
        return {"ap": None, "ap50": None}
    if not res:
        return {"ap": 0.0, "ap50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return {"ap": max(float(ev.stats[0]), 0.0), "ap50": max(float(ev.stats[1]), 0.0)}


def validate(model, processor, images: list, ontology: Ontology, preset: dict, device) -> dict:
    """``{"val_ap", "val_ap50"}`` (:func:`box_ap`) on ``images`` (:class:`TrainImage`), labelled as
    ``distillery label`` would: the whole ontology in labelling's prompt chunks, the preset's
    (a ``TeacherPreset.to_dict()``) thresholds and post-processing. None without images.
    Leaves ``model`` in training mode."""
    from distillery.engine.images import decode
    from distillery.labeling.detector import GroundingDinoTeacher

    if not images:
        return {"val_ap": None, "val_ap50": None}
    net = getattr(model, "module", model)

    class Loaded(GroundingDinoTeacher):
        def load(self, *args):
            return processor, net

    d = preset["detector"]
    teacher = Loaded("", ontology, device=str(device), box_floor=d["box_floor"], nms_iou=d["nms_iou"],
                     image_size=d["image_size"], max_detections=d["max_detections"],
                     reuse_image_features=False)  # the model in training may be peft-wrapped: no feature cache
    dets = []
    for i in range(0, len(images), d["batch_size"]):
        dets += teacher([decode(im.path).pixels for im in images[i:i + d["batch_size"]]])
    model.train()
    m = box_ap(images, dets, len(ontology.classes))
    return {"val_ap": m["ap"], "val_ap50": m["ap50"]}
