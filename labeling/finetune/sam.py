"""Fine-tune the mask decoder of a SAM-family segmenter (SAM, SAM 2, SAM-HQ) on box -> mask pairs.

One loop for every kind; a kind adapter (:mod:`distillery.labeling.finetune.sam_kinds`) says how
it embeds images, frames boxes, decodes and writes its weights. The recipe follows the SAM paper
(Kirillov et al., "Segment Anything", ICCV 2023, Appendix A, "Training algorithm" and "Losses")
and MedSAM (Ma et al., Nature Communications 2024): the image encoder is frozen and runs once per
image; box prompts are the ground-truth boxes with Gaussian noise; the loss is ``20 * focal +
dice`` on the mask logits plus the mean-square error of the IoU head. A box yields one mask
(``multimask_output=False``: the extra output token SAM trains for unambiguous prompts,
Appendix A, "Resolving ambiguity"; the output the labelling teachers use). SAM 2 in training mode
returns that token's mask; in eval mode (validation, labelling) it falls back to the best
multimask output when that mask is unstable, as ``Sam2MaskDecoder`` does (SAM 2's own training
code, facebookresearch/sam2 ``sam2/modeling/sam/mask_decoder.py``, switches the same way).

Image embeddings are cached **on disk**, one ``<image sha256>.pt`` file per image under
``<out folder>/sam-embeddings/<encoder weights hash>/`` (MedSAM precomputes them to ``.npy``
files the same way). Disk, not memory, because an embedding of SAM ViT-B/L/H is 256x64x64
float32 = 4 MiB (SAM 2 Hiera-T: 16 MiB, its three FPN levels after the decoder's
``conv_s0``/``conv_s1``; SAM-HQ ViT-B: 16 MiB, with its first global block's output): ten
thousand images would not fit in memory, while on disk they survive a resume or a rerun with
other hyper-parameters, which then skip the encoder (the dominant cost: seconds per image for
ViT-H on a CPU). The hash of the weights the embedding depends on (and, for transformers kinds,
of the image processor's settings) keeps embeddings of another base model apart.

Training never goes through the teachers' ``decode`` (it runs under ``torch.inference_mode``);
evaluation (:func:`mask_miou`) uses the teachers' own pre- and post-processing.
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
from distillery.labeling.finetune.loss import diverged_weights
from distillery.labeling.finetune.sam_kinds import MaskKind, as_kind, features_to, state_hash

#: SAM's mask loss: focal and dice in a 20:1 ratio, IoU-head MSE added with weight 1.0
#: (Kirillov et al. 2023, Appendix A, "Losses"); focal alpha 0.25, gamma 2 as in DETR's
#: ``sigmoid_focal_loss`` which SAM follows.
FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT = 20.0, 1.0, 1.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
#: Version of the training-state file (``state_path``); 2: one state for every kind.
STATE_VERSION = 2


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


class EmbeddingCache:
    """Frozen image-encoder outputs of :class:`SamSample` images, computed by the kind's
    ``embed`` (SAM: as ``SamPredictor.set_image``; SAM 2 / SAM-HQ: the teacher's processor and
    ``get_image_embeddings``) under ``torch.no_grad``.

    Args:
        model: a :class:`~distillery.labeling.finetune.sam_kinds.MaskKind`, or what
            :func:`~distillery.labeling.finetune.sam_kinds.as_kind` accepts (a segment-anything
            ``Sam``, a ``SamTeacher``, ``Sam2Teacher`` or ``SamHQTeacher``).
        directory: where ``<encoder hash>/<image sha256>.pt`` files live; ``None`` keeps
            nothing (every call runs the encoder).
        device: where embeddings are returned.
    """

    def __init__(self, model, directory: Path | None, device: torch.device) -> None:
        self.kind: MaskKind = as_kind(model)
        self.device = torch.device(device)
        self.dir = self.key = None
        if directory is not None:
            self.key = self.kind.encoder_key()
            self.dir = Path(directory) / self.key
            self.dir.mkdir(parents=True, exist_ok=True)

    def input_size(self, s: SamSample) -> tuple[int, int]:
        """``(height, width)`` of the resized image inside the model input."""
        return self.kind.input_size((s.height, s.width))

    @torch.no_grad()
    def __call__(self, s: SamSample):
        """The embedding of ``s``'s image on ``self.device`` (SAM: float32 ``(1, C, 64, 64)``;
        SAM 2: a list of its FPN levels; SAM-HQ: (embedding, [ViT features])).

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
                return features_to(torch.load(file, map_location=self.device, weights_only=True), self.device)
        d = decode(s.path)
        if d.error is not None:
            raise SamFinetuneError(f"{s.path}: {d.error}")
        if (d.height, d.width) != (s.height, s.width):
            raise SamFinetuneError(f"{s.path}: decoded frame is {d.height}x{d.width} (HxW), the sample says {s.height}x{s.width}")
        emb = features_to(self.kind.embed(d.pixels), self.device)
        if file is not None:
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            torch.save(features_to(emb, torch.device("cpu")), tmp)
            os.replace(tmp, file)
        return emb


@torch.no_grad()
def predict_masks(model, cache: EmbeddingCache, s: SamSample, boxes: np.ndarray | None = None,
                  boxes_per_call: int = 32) -> np.ndarray:
    """The kind's masks for ``boxes`` (default ``s.boxes``; float ``(N, 4)`` xyxy frame pixels) as
    its labelling teacher computes them before the small-region clean-up (SAM:
    ``SamPredictor.predict_torch(multimask_output=False)`` + ``Sam.postprocess_masks``): bool
    ``(N, height, width)``, logits thresholded at the kind's ``mask_threshold`` (0.0).

    Args:
        model: as :class:`EmbeddingCache`'s, in eval mode.
    """
    kind = as_kind(model)
    boxes = s.boxes if boxes is None else boxes
    hw = (s.height, s.width)
    emb = features_to(cache(s), kind.device)
    out = []
    for i in range(0, len(boxes), boxes_per_call):
        low, _ = kind.decode(emb, kind.input_boxes(boxes[i : i + boxes_per_call], hw))
        out.append(kind.postprocess(low, hw))
    return np.concatenate(out) if out else np.zeros((0, s.height, s.width), bool)


def mask_miou(model, samples: Sequence[SamSample], device: str | torch.device = "auto", *,
              cache: EmbeddingCache | None = None) -> float:
    """Mean mask IoU over every instance of ``samples``: the model prompted with the ground-truth
    box (no jitter), masks by :func:`predict_masks` at the original frame, IoU by
    ``pycocotools.mask.iou`` against the ground-truth RLE. NaN when there is no instance.

    Args:
        model: as :class:`EmbeddingCache`'s (moved to ``device``).
        cache: embeddings to reuse (default: computed, kept in no file).
    """
    from distillery.labeling.detector import resolve_device
    from distillery.labeling.segmenter import encode_masks

    dev = resolve_device(device) if isinstance(device, str) else device
    kind = as_kind(model).to(dev)
    cache = cache or EmbeddingCache(kind, None, dev)
    ious = []
    for s in samples:
        if len(s.boxes):
            rles = encode_masks(predict_masks(kind, cache, s))
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
    """Read a training state written by :func:`finetune_mask_decoder`; every ``expect`` key must match."""
    if not Path(path).is_file():
        raise SamFinetuneError(f"resume state {path} not found: give the state_path file a previous run wrote")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a corrupt or foreign file
        raise SamFinetuneError(f"resume state {path} is not a mask-decoder fine-tuning state ({type(e).__name__}: {e})") from e
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise SamFinetuneError(f"resume state {path} is not a version-{STATE_VERSION} mask-decoder fine-tuning state")
    for k, v in expect.items():
        if st["config"].get(k) != v:
            raise SamFinetuneError(f"resume state {path}: {k} was {st['config'].get(k)!r}, this run has {v!r}; "
                                   "rerun with the same setting, or start without resuming")
    return st


def finetune_mask_decoder(model, train: list[SamSample], val: list[SamSample], out: Path, *, epochs: int = 10,
                          lr: float = 1e-4, weight_decay: float = 1e-4, batch: int = 8, seed: int = 0,
                          train_prompt_encoder: bool = False, resume_state: Path | None = None,
                          state_path: Path | None = None, on_epoch: Callable[[dict], None] | None = None,
                          embedding_dir: Path | None = None) -> dict:
    """Fine-tune a SAM-family model's mask decoder (and, with ``train_prompt_encoder``, its prompt encoder).

    Each epoch visits every (box, mask) pair of ``train`` once in a seeded random order,
    ``batch`` pairs per AdamW step (constant ``lr``), each box moved to the kind's input frame
    and jittered there by :func:`jitter_boxes`; :func:`sam_loss` is computed on the 256x256
    low-resolution logits against :func:`low_res_targets` built in the same frame. The image
    encoder stays frozen (embeddings cached on disk, see the module docstring), as do the
    decoder weights the embedding step reads (SAM 2's ``conv_s0``/``conv_s1``). After each
    epoch the validation mIoU (:func:`mask_miou`) is measured, the training state written to
    ``state_path`` and ``on_epoch`` called with the epoch's entry. The last epoch's model is
    written to ``out`` by the kind's ``save``.

    Args:
        model: the base model, loaded on its training device: a
            :class:`~distillery.labeling.finetune.sam_kinds.MaskKind` or what
            :func:`~distillery.labeling.finetune.sam_kinds.as_kind` accepts. Trained in place.
        train, val: :class:`SamSample` lists; ``val`` may be empty (``val_miou`` is then None).
        out: SAM: the whole ``state_dict`` file; SAM 2 / SAM-HQ: the ``save_pretrained``
            folder (model and processor).
        resume_state: a ``state_path`` file of an earlier run with the same kind, frozen weights,
            data and hyper-parameters (``epochs`` may grow): trained modules, optimizer, RNG and
            history are restored and training continues after its last epoch.
        embedding_dir: the embedding cache (default ``out``'s folder / ``sam-embeddings``).

    Returns:
        History: ``epochs`` (per epoch ``epoch``, ``steps``, ``train_loss``, ``train_focal``,
        ``train_dice``, ``train_iou_mse`` (means per pair), ``val_miou``), ``base_val_miou``
        (before training), ``train_images``, ``train_instances``, ``val_images``,
        ``val_instances``, ``trained`` (module names), ``trainable_parameters``, ``kind``, ``out``.

    Raises:
        SamFinetuneError: no training pair, bad hyper-parameters, an unreadable image or a
            frame size that disagrees with a sample, a resume state that does not match.
    """
    from tqdm import tqdm

    if not (isinstance(epochs, int) and epochs >= 1 and isinstance(batch, int) and batch >= 1):
        raise SamFinetuneError(f"epochs and batch must be integers >= 1, got epochs={epochs!r}, batch={batch!r}")
    if not (lr > 0 and weight_decay >= 0):
        raise SamFinetuneError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    pairs = _instances(train)
    if not len(pairs):
        raise SamFinetuneError("no training instances: the selection gave no (box, mask) pair to fine-tune on")
    kind = as_kind(model)
    dev, out = kind.device, Path(out)
    kind.model.eval()
    trained, params = kind.trainable(train_prompt_encoder)
    kind.model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    trainable_names = {n for n, p in kind.model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.Generator(np.random.PCG64(seed))

    cache = EmbeddingCache(kind, Path(embedding_dir or out.parent / "sam-embeddings"), dev)
    frozen = state_hash(kind.model, (), exclude=trainable_names)  # everything that does not train
    config = {"kind": kind.kind, "frozen_weights": frozen, "trained": sorted(trained),
              "lr": lr, "weight_decay": weight_decay, "batch": batch, "seed": seed, "train_data": _data_hash(train)}
    low_hw = tuple(kind.low_res_size)
    targets = []  # per sample: bit-packed bool (N, 1, 256, 256 / 8)
    for s in tqdm(list(train) + list(val), desc=f"{kind.name} embeddings", disable=None):
        cache(s)
    for s in train:
        t = low_res_targets(s, cache.input_size(s), kind.pad_size, low_hw)
        targets.append(np.packbits(t.numpy(), axis=-1))

    history = {"epochs": [], "base_val_miou": None, "trained": sorted(trained), "kind": kind.kind, "out": str(out),
               "trainable_parameters": int(sum(p.numel() for p in params)),
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
        history["out"] = str(out)
    elif val:
        history["base_val_miou"] = mask_miou(kind, val, dev, cache=cache)

    for epoch in range(start, epochs):
        for m in trained.values():
            m.train()
        order = pairs[rng.permutation(len(pairs))]
        sums, steps = {k: 0.0 for k in ("loss", "focal", "dice", "iou_mse")}, 0
        for k in tqdm(range(0, len(order), batch), desc=f"{kind.name} epoch {epoch + 1}/{epochs}", disable=None):
            chunk, parts = order[k : k + batch], []
            for si in np.unique(chunk[:, 0]):
                s, js = train[si], chunk[chunk[:, 0] == si, 1]
                box = kind.input_boxes(s.boxes[js], (s.height, s.width)).cpu().numpy()
                box = torch.from_numpy(jitter_boxes(box, rng, cache.input_size(s))).to(dev)
                low, iou = kind.decode(cache(s), box, grad_prompt=train_prompt_encoder)
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
                 "val_miou": mask_miou(kind, val, dev, cache=cache) if val else None}
        history["epochs"].append(entry)
        if state_path is not None:
            _atomic_save({"version": STATE_VERSION, "epoch": epoch + 1, "config": config, "history": history,
                          "modules": {n: m.state_dict() for n, m in trained.items()},
                          "optimizer": opt.state_dict(), "rng": rng.bit_generator.state}, Path(state_path))
        if on_epoch is not None:
            on_epoch(entry)
    why = diverged_weights((f"{n}.{w}", p) for n, m in trained.items() for w, p in m.named_parameters())
    if why:  # a diverged run: nothing is saved
        raise SamFinetuneError(why)
    kind.save(out)
    return history


def finetune_sam(model_type: str, checkpoint: str | None, train: list[SamSample], val: list[SamSample],
                 out_checkpoint: Path, *, device: str = "auto", **kwargs) -> dict:
    """:func:`finetune_mask_decoder` of segment-anything SAM loaded by
    :func:`~distillery.labeling.segmenter.load_sam` (``model_type``, ``checkpoint``) on ``device``.

    ``out_checkpoint``: the fine-tuned full ``state_dict``, loadable by
    ``sam_model_registry[model_type](checkpoint=out_checkpoint)`` (``vit_tiny``:
    :func:`~distillery.labeling.segmenter.build_sam_vit_tiny`), i.e. a preset's ``segmenter.checkpoint``.

    Raises:
        as :func:`finetune_mask_decoder`; ValueError / FileNotFoundError: from ``load_sam``
        (model type, checkpoint path).
    """
    from distillery.labeling.detector import resolve_device
    from distillery.labeling.finetune.sam_kinds import SamKind
    from distillery.labeling.segmenter import load_sam

    model = load_sam(model_type, checkpoint).to(resolve_device(device)).eval()
    return finetune_mask_decoder(SamKind(model), train, val, out_checkpoint, **kwargs)


__all__ = ["JITTER_FRACTION", "JITTER_MAX_STD", "SamFinetuneError", "SamSample", "samples_from_records", "jitter_boxes",
           "low_res_targets", "sam_loss", "EmbeddingCache", "predict_masks", "mask_miou", "finetune_mask_decoder",
           "finetune_sam"]
