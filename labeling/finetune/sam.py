"""Fine-tune SAM's mask decoder (optionally its prompt encoder) on box -> mask pairs.

The recipe follows the SAM paper (Kirillov et al., "Segment Anything", ICCV 2023,
Appendix A, "Training algorithm" and "Losses") and MedSAM (Ma et al., Nature
Communications 2024): the image encoder is frozen and runs once per image; box prompts
are the ground-truth boxes with Gaussian noise; the loss is ``20 * focal + dice`` on the
mask logits plus the mean-square error of the IoU head. A box yields one mask
(``multimask_output=False``: the extra output token SAM trains for unambiguous prompts,
Appendix A, "Resolving ambiguity"; the output
:class:`~distillery.labeling.segmenter.SamTeacher` labels with).

Image embeddings are cached **on disk**, one ``<image sha256>.pt`` file per image under
``<out_checkpoint folder>/sam-embeddings/<encoder weights hash>/`` (MedSAM precomputes
them to ``.npy`` files the same way). Disk, not memory, because an embedding of ViT-B/L/H
is 256x64x64 float32 = 4 MiB: ten thousand images would not fit in memory, while on disk
they survive a resume or a rerun with other hyper-parameters, which then skip the
encoder (the dominant cost: seconds per image for ViT-H on a CPU). The hash of the
encoder weights in the path keeps embeddings of another base checkpoint apart.

Training never goes through ``SamPredictor`` (its ``predict_torch`` runs under
``torch.no_grad``); evaluation (:func:`mask_miou`) reproduces its preprocessing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from distillery.labeling.finetune.sam_data import (
    JITTER_FRACTION,
    JITTER_MAX_STD,
    SamFinetuneError,
    SamSample,
    jitter_boxes,
    low_res_targets,
    samples_from_records,
)

#: SAM's mask loss: focal and dice in a 20:1 ratio, IoU-head MSE added with weight 1.0
#: (Kirillov et al. 2023, Appendix A, "Losses"); focal alpha 0.25, gamma 2 as in DETR's
#: ``sigmoid_focal_loss`` which SAM follows.
FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT = 20.0, 1.0, 1.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
#: Version of the training-state file (``state_path``).
STATE_VERSION = 1


def sam_loss(logits: torch.Tensor, targets: torch.Tensor, iou_pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAM's training loss per mask: ``20 * focal + dice + (iou_pred - IoU)^2``.

    Args:
        logits: float ``(N, 1, h, w)`` mask logits.
        targets: ``(N, 1, h, w)`` ground-truth masks (0/1).
        iou_pred: float ``(N, 1)`` the IoU head's output.

    Returns:
        float ``(N,)`` tensors ``loss``, ``focal`` (``torchvision.ops.sigmoid_focal_loss``,
        alpha 0.25, gamma 2, mean over pixels), ``dice`` (DETR's ``1 - (2|p t| + 1) / (|p| + |t| + 1)``
        on sigmoid probabilities), ``iou_mse`` (against the IoU of ``logits > 0`` with the
        target, not back-propagated; 1 when both are empty).
    """
    from torchvision.ops import sigmoid_focal_loss

    t = targets.float().flatten(1)
    x = logits.flatten(1)
    focal = sigmoid_focal_loss(x, t, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="none").mean(1)
    p = x.sigmoid()
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    with torch.no_grad():
        hard = (x > 0).float()
        inter, union = (hard * t).sum(1), ((hard + t) > 0).float().sum(1)
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou_mse = (iou_pred.reshape(-1) - iou) ** 2
    loss = FOCAL_WEIGHT * focal + DICE_WEIGHT * dice + IOU_WEIGHT * iou_mse
    return {"loss": loss, "focal": focal, "dice": dice, "iou_mse": iou_mse}


def weights_hash(*modules: torch.nn.Module) -> str:
    """blake2b (16 hex) over the modules' parameter and buffer names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=8)
    for m in modules:
        for name, t in m.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EmbeddingCache:
    """Image-encoder outputs of :class:`SamSample` images, computed as ``SamPredictor.set_image``
    does (``ResizeLongestSide``, ``Sam.preprocess``, ``image_encoder``) under ``torch.no_grad``.

    Args:
        model: the ``Sam`` whose (frozen) image encoder is used.
        directory: where ``<encoder hash>/<image sha256>.pt`` files live; ``None`` keeps
            nothing (every call runs the encoder).
        device: where embeddings are returned.
    """

    def __init__(self, model, directory: Path | None, device: torch.device) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model, self.device = model, torch.device(device)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.dir = self.key = None
        if directory is not None:
            self.key = weights_hash(model.image_encoder, _PixelStats(model))
            self.dir = Path(directory) / self.key
            self.dir.mkdir(parents=True, exist_ok=True)

    def input_size(self, s: SamSample) -> tuple[int, int]:
        """``(height, width)`` of the resized image inside the padded square input."""
        return self.transform.get_preprocess_shape(s.height, s.width, self.transform.target_length)

    @torch.no_grad()
    def __call__(self, s: SamSample) -> torch.Tensor:
        """float32 ``(1, C, 64, 64)`` embedding of ``s``'s image on ``self.device``.

        Raises:
            SamFinetuneError: the image cannot be decoded or its EXIF-corrected size is not
                ``(s.height, s.width)``.
        """
        from distillery.engine.images import content_id, decode

        file = None
        if self.dir is not None:
            image_id = s.image_id
            if not image_id:
                try:
                    image_id = content_id(Path(s.path).read_bytes())
                except OSError as e:
                    raise SamFinetuneError(f"{s.path}: cannot read the image ({e.strerror or e})") from e
            file = self.dir / f"{image_id}.pt"
            if file.is_file():
                return torch.load(file, map_location=self.device, weights_only=True)
        d = decode(s.path)
        if d.error is not None:
            raise SamFinetuneError(f"{s.path}: {d.error}")
        if (d.height, d.width) != (s.height, s.width):
            raise SamFinetuneError(f"{s.path}: decoded frame is {d.height}x{d.width} (HxW), the sample says {s.height}x{s.width}")
        x = torch.as_tensor(self.transform.apply_image(d.pixels), device=self.device).permute(2, 0, 1).contiguous()[None]
        emb = self.model.image_encoder(self.model.preprocess(x.to(self.model.pixel_mean.device)))
        emb = emb.float().to(self.device)
        if file is not None:
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            torch.save(emb.cpu(), tmp)
            os.replace(tmp, file)
        return emb


class _PixelStats(torch.nn.Module):
    """SAM's normalisation buffers as a module, so that they enter the encoder hash."""

    def __init__(self, model) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", model.pixel_mean)
        self.register_buffer("pixel_std", model.pixel_std)


def decode_boxes(model, embedding: torch.Tensor, boxes_input: torch.Tensor, *, grad_prompt: bool = False):
    """Prompt encoder + mask decoder for boxes already in SAM's 1024-pixel input frame.

    Args:
        embedding: float32 ``(1, C, 64, 64)`` image embedding.
        boxes_input: float32 ``(N, 4)`` xyxy input-frame pixels (``ResizeLongestSide.apply_boxes``).
        grad_prompt: build the prompt embeddings with autograd (prompt encoder trained).

    Returns:
        ``low_res_logits`` ``(N, 1, 256, 256)`` over the padded input and ``iou_pred`` ``(N, 1)``.
    """
    with torch.set_grad_enabled(grad_prompt and torch.is_grad_enabled()):
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes_input, masks=None)
        image_pe = model.prompt_encoder.get_dense_pe()
    return model.mask_decoder(image_embeddings=embedding, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                              dense_prompt_embeddings=dense, multimask_output=False)


@torch.no_grad()
def predict_masks(model, cache: EmbeddingCache, s: SamSample, boxes: np.ndarray | None = None,
                  boxes_per_call: int = 32) -> np.ndarray:
    """SAM's masks for ``boxes`` (default ``s.boxes``; float ``(N, 4)`` xyxy frame pixels), as
    ``SamPredictor.predict_torch(multimask_output=False)`` + ``Sam.postprocess_masks`` give them:
    bool ``(N, height, width)``, logits thresholded at ``model.mask_threshold`` (0.0)."""
    boxes = s.boxes if boxes is None else boxes
    emb, input_size = cache(s), cache.input_size(s)
    dev = emb.device
    out = []
    for i in range(0, len(boxes), boxes_per_call):
        b = cache.transform.apply_boxes_torch(torch.as_tensor(boxes[i : i + boxes_per_call], device=dev), (s.height, s.width))
        low, _ = decode_boxes(model, emb, b)
        up = model.postprocess_masks(low, input_size, (s.height, s.width))
        out.append((up[:, 0] > model.mask_threshold).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, s.height, s.width), bool)


def mask_miou(model, samples: Sequence[SamSample], device: str | torch.device = "auto", *,
              cache: EmbeddingCache | None = None) -> float:
    """Mean mask IoU over every instance of ``samples``: SAM prompted with the ground-truth
    box (no jitter), thresholded at ``mask_threshold`` at the original frame, IoU by
    ``pycocotools.mask.iou`` against the ground-truth RLE. NaN when there is no instance.

    Args:
        model: a ``segment_anything`` ``Sam`` (moved to ``device``).
        cache: embeddings to reuse (default: computed, kept in no file).
    """
    from distillery.labeling.detector import resolve_device
    from distillery.labeling.segmenter import encode_masks

    dev = resolve_device(device) if isinstance(device, str) else device
    model = model.to(dev)
    cache = cache or EmbeddingCache(model, None, dev)
    ious = []
    for s in samples:
        if len(s.boxes):
            rles = encode_masks(predict_masks(model, cache, s))
            ious.append(np.diag(mask_utils.iou(rles, list(s.masks), [0] * len(s.masks))))
    return float(np.concatenate(ious).mean()) if ious else float("nan")


def _instances(samples: Sequence[SamSample]) -> np.ndarray:
    """int64 ``(M, 2)``: (sample index, instance index) of every training pair."""
    rows = [(i, j) for i, s in enumerate(samples) for j in range(len(s.boxes))]
    return np.asarray(rows, np.int64).reshape(-1, 2)


def _data_hash(samples: Sequence[SamSample]) -> str:
    """blake2b (16 hex) of the samples' paths, frames, boxes and masks: a resume must see the same data."""
    h = hashlib.blake2b(digest_size=8)
    for s in samples:
        h.update(f"{s.path}|{s.height}x{s.width}|".encode())
        h.update(s.boxes.tobytes())
        for m in s.masks:
            h.update(m["counts"] if isinstance(m["counts"], bytes) else str(m["counts"]).encode())
    return h.hexdigest()


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, expect: dict) -> dict:
    """Read a training state written by :func:`finetune_sam`; every ``expect`` key must match."""
    if not Path(path).is_file():
        raise SamFinetuneError(f"resume state {path} not found: give the state_path file a previous run wrote")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a corrupt or foreign file
        raise SamFinetuneError(f"resume state {path} is not a SAM fine-tuning state ({type(e).__name__}: {e})") from e
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise SamFinetuneError(f"resume state {path} is not a version-{STATE_VERSION} SAM fine-tuning state")
    for k, v in expect.items():
        if st["config"].get(k) != v:
            raise SamFinetuneError(f"resume state {path}: {k} was {st['config'].get(k)!r}, this run has {v!r}; "
                                   "rerun with the same setting, or start without resuming")
    return st


def finetune_sam(model_type: str, checkpoint: str | None, train: list[SamSample], val: list[SamSample],
                 out_checkpoint: Path, *, epochs: int = 10, lr: float = 1e-4, weight_decay: float = 1e-4,
                 batch: int = 8, seed: int = 0, train_prompt_encoder: bool = False, device: str = "auto",
                 resume_state: Path | None = None, state_path: Path | None = None,
                 on_epoch: Callable[[dict], None] | None = None, embedding_dir: Path | None = None) -> dict:
    """Fine-tune SAM's mask decoder (and, with ``train_prompt_encoder``, its prompt encoder).

    Each epoch visits every (box, mask) pair of ``train`` once in a seeded random order,
    ``batch`` pairs per AdamW step (constant ``lr``), each box jittered by :func:`jitter_boxes`
    in the 1024-pixel input frame; :func:`sam_loss` is computed on the 256x256 low-resolution
    logits against :func:`low_res_targets`. The image encoder stays frozen (embeddings cached
    on disk, see the module docstring). After each epoch the validation mIoU
    (:func:`mask_miou`) is measured, the training state written to ``state_path`` and
    ``on_epoch`` called with the epoch's entry. The last epoch's weights are saved.

    Args:
        model_type, checkpoint: base SAM (:func:`distillery.labeling.segmenter.load_sam`).
        train, val: :class:`SamSample` lists; ``val`` may be empty (``val_miou`` is then None).
        out_checkpoint: the fine-tuned full ``state_dict``, loadable by
            ``sam_model_registry[model_type](checkpoint=out_checkpoint)`` (``vit_tiny``:
            :func:`~distillery.labeling.segmenter.build_sam_vit_tiny`), i.e. a preset's
            ``segmenter.checkpoint``.
        resume_state: a ``state_path`` file of an earlier run with the same base weights,
            data and hyper-parameters (``epochs`` may grow): model, optimizer, RNG and
            history are restored and training continues after its last epoch.
        embedding_dir: the embedding cache (default ``out_checkpoint``'s folder / ``sam-embeddings``).

    Returns:
        History: ``epochs`` (per epoch ``epoch``, ``steps``, ``train_loss``, ``train_focal``,
        ``train_dice``, ``train_iou_mse`` (means per pair), ``val_miou``), ``base_val_miou``
        (before training), ``train_images``, ``train_instances``, ``val_images``,
        ``val_instances``, ``trained`` (module names), ``out_checkpoint``.

    Raises:
        SamFinetuneError: no training pair, bad hyper-parameters, an unreadable image or a
            frame size that disagrees with a sample, a resume state that does not match.
        ValueError / FileNotFoundError: from ``load_sam`` (model type, checkpoint path).
    """
    from tqdm import tqdm

    from distillery.labeling.detector import resolve_device
    from distillery.labeling.segmenter import load_sam

    if not (isinstance(epochs, int) and epochs >= 1 and isinstance(batch, int) and batch >= 1):
        raise SamFinetuneError(f"epochs and batch must be integers >= 1, got epochs={epochs!r}, batch={batch!r}")
    if not (lr > 0 and weight_decay >= 0):
        raise SamFinetuneError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    pairs = _instances(train)
    if not len(pairs):
        raise SamFinetuneError("no training instances: the selection gave no (box, mask) pair to fine-tune SAM on")
    dev = resolve_device(device)
    out_checkpoint = Path(out_checkpoint)
    model = load_sam(model_type, checkpoint).to(dev).eval()
    trained = {"mask_decoder": model.mask_decoder}
    if train_prompt_encoder:
        trained["prompt_encoder"] = model.prompt_encoder
    model.requires_grad_(False)
    params = [p for m in trained.values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.Generator(np.random.PCG64(seed))

    cache = EmbeddingCache(model, Path(embedding_dir or out_checkpoint.parent / "sam-embeddings"), dev)
    frozen = cache.key + ("" if train_prompt_encoder else "+" + weights_hash(model.prompt_encoder))
    config = {"model_type": model_type, "frozen_weights": frozen, "trained": sorted(trained),
              "lr": lr, "weight_decay": weight_decay, "batch": batch, "seed": seed, "train_data": _data_hash(train)}
    low_hw = tuple(model.prompt_encoder.mask_input_size)
    targets = []  # per sample: bit-packed bool (N, 1, 256, 256 / 8)
    for s in tqdm(list(train) + list(val), desc="SAM embeddings", disable=None):
        cache(s)
    for s in train:
        t = low_res_targets(s, cache.input_size(s), model.image_encoder.img_size, low_hw)
        targets.append(np.packbits(t.numpy(), axis=-1))

    history = {"epochs": [], "base_val_miou": None, "trained": sorted(trained), "out_checkpoint": str(out_checkpoint),
               "train_images": len(train), "train_instances": len(pairs),
               "val_images": len(val), "val_instances": int(sum(len(s.boxes) for s in val))}
    start = 0
    if resume_state is not None:
        st = _load_state(Path(resume_state), config)
        for name, m in trained.items():
            m.load_state_dict(st["modules"][name])
        opt.load_state_dict(st["optimizer"])
        rng.bit_generator.state = st["rng"]
        start, history = int(st["epoch"]), st["history"]
        if start > epochs:
            raise SamFinetuneError(f"resume state {resume_state} is at epoch {start}, past epochs={epochs}: "
                                   f"ask for epochs >= {start}")
        history["out_checkpoint"] = str(out_checkpoint)
    elif val:
        history["base_val_miou"] = mask_miou(model, val, dev, cache=cache)

    for epoch in range(start, epochs):
        for m in trained.values():
            m.train()
        order = pairs[rng.permutation(len(pairs))]
        sums, steps = {k: 0.0 for k in ("loss", "focal", "dice", "iou_mse")}, 0
        for k in tqdm(range(0, len(order), batch), desc=f"SAM epoch {epoch + 1}/{epochs}", disable=None):
            chunk, parts = order[k : k + batch], []
            for si in np.unique(chunk[:, 0]):
                s, js = train[si], chunk[chunk[:, 0] == si, 1]
                box = cache.transform.apply_boxes(s.boxes[js], (s.height, s.width))
                box = torch.from_numpy(jitter_boxes(box, rng, cache.input_size(s))).to(dev)
                low, iou = decode_boxes(model, cache(s), box, grad_prompt=train_prompt_encoder)
                tgt = torch.from_numpy(np.unpackbits(targets[si][js], axis=-1, count=low_hw[1]).astype(np.float32))
                parts.append(sam_loss(low, tgt.to(dev), iou))
            loss = torch.cat([p["loss"] for p in parts]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            for key in sums:
                sums[key] += float(torch.cat([p[key] for p in parts]).detach().sum())
        for m in trained.values():
            m.eval()
        entry = {"epoch": epoch + 1, "steps": steps, **{f"train_{k}": v / len(pairs) for k, v in sums.items()},
                 "val_miou": mask_miou(model, val, dev, cache=cache) if val else None}
        history["epochs"].append(entry)
        if state_path is not None:
            _atomic_save({"version": STATE_VERSION, "epoch": epoch + 1, "config": config, "history": history,
                          "modules": {n: m.state_dict() for n, m in trained.items()},
                          "optimizer": opt.state_dict(), "rng": rng.bit_generator.state}, Path(state_path))
        if on_epoch is not None:
            on_epoch(entry)
    _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_checkpoint)
    return history


__all__ = ["JITTER_FRACTION", "JITTER_MAX_STD", "SamFinetuneError", "SamSample", "samples_from_records", "jitter_boxes",
           "low_res_targets", "sam_loss", "EmbeddingCache", "decode_boxes", "predict_masks", "mask_miou", "finetune_sam"]
