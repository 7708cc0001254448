"""A SAM fine-tuning run (``distillery teachers finetune --component segmenter|both``): data
from a label set, :func:`~distillery.labeling.finetune.sam.finetune_sam`, resume, and what it
leaves in ``OUT``::

    OUT/sam-run.json          # what the SAM run trains on and how (checked again by --resume)
    OUT/sam-state.pt          # after every epoch: decoder, optimizer, RNG and history (--resume)
    OUT/sam-embeddings/       # the frozen image encoder's embeddings, one file per image
    OUT/sam_decoder.pth       # the whole fine-tuned SAM state_dict (only the mask decoder changed)
    OUT/preset.yaml           # the input preset, segmenter.checkpoint: sam_decoder.pth
    OUT/finetune.json         # provenance (:func:`~distillery.labeling.finetune.provenance.write_provenance`)

Data: :func:`~distillery.labeling.finetune.data.select_training_data` with
``exhaustive=False`` (SAM's mask loss is per instance, so any image with confirmed instances
serves): accepted and relabelled instances, instances of accepted images, and ground truth,
each as a (box, mask) pair; the same split by image id as the detector's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from distillery.labeling.finetune.data import FinetuneData, select_training_data
from distillery.labeling.finetune.provenance import training_data, write_provenance
from distillery.labeling.finetune.run import FinetuneError, _prepare_out

#: Defaults when the command line gives none: ``finetune_sam``'s (10 epochs, AdamW lr 1e-4,
#: weight decay 1e-4, 8 box-mask pairs per step). The lr is MedSAM's (Ma et al. 2024, AdamW lr 1e-4).
SAM_DEFAULTS = {"epochs": 10, "lr": 1e-4, "batch": 8}


@dataclass(frozen=True)
class SamFinetuneConfig:
    """Hyperparameters of the SAM run: epochs, lr, weight_decay, batch (box-mask pairs per step),
    seed, val_fraction (images held out by image id), curation (None: latest, 0: none)."""

    epochs: int = SAM_DEFAULTS["epochs"]
    lr: float = SAM_DEFAULTS["lr"]
    weight_decay: float = 1e-4
    batch: int = SAM_DEFAULTS["batch"]
    seed: int = 0
    val_fraction: float = 0.1
    curation: int | None = None
    trained: str = "mask_decoder"


def sam_samples(images) -> list:
    """:class:`~distillery.labeling.finetune.data.TrainImage` list -> :class:`SamSample` list,
    without instances whose box has no area or whose mask is empty, and images left with none."""
    from distillery.labeling.finetune.sam import SamSample

    out = []
    for im in images:
        b = im.boxes
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        keep &= np.asarray([mask_utils.area(m) > 0 for m in im.masks], bool).reshape(-1)
        idx = np.flatnonzero(keep)
        if len(idx):
            out.append(SamSample(im.path, im.height, im.width, b[idx], [im.masks[i] for i in idx], im.image_id))
    return out


def _need_checkpoint(preset) -> None:
    if preset.segmenter.checkpoint is None:
        raise FinetuneError("preset: segmenter.checkpoint is not set; SAM is fine-tuned from a checkpoint "
                            "(e.g. sam_vit_b_01ec64.pth from the segment-anything release)")


def train_segmenter(preset, ls, out: Path, cfg: SamFinetuneConfig, resume: bool, log, fresh: bool = True):
    """Train SAM's mask decoder from ``preset.segmenter`` on label set ``ls``.

    Returns:
        ``(data, (finetune.json section, preset segmenter keys))``.

    Raises:
        FinetuneError: no segmenter checkpoint in the preset, nothing to train on, ``out`` holds
            another run, or a resumed run with other inputs.
    """
    from distillery.labeling.finetune.sam import SamFinetuneError, finetune_sam
    from distillery.labeling.teachers import file_sha256

    seg = preset.segmenter
    _need_checkpoint(preset)
    data: FinetuneData = select_training_data(ls, cfg.curation, cfg.val_fraction, exhaustive=False)
    log("SAM: " + data.summary())
    train, val = sam_samples(data.train), sam_samples(data.val)
    if not train:
        raise FinetuneError(
            f"nothing to train SAM on: {data.summary()}. SAM learns from instances a person confirmed: accept or "
            "relabel instances (or whole images) in curation, or fine-tune on ground truth from `distillery labels "
            "import`; each needs a mask")
    base_sha = file_sha256(seg.checkpoint)
    identity = {"labelset": ls.id, "curation_version": data.curation_version,
                "training_data_sha256": data.instance_ids_sha256(), "base_checkpoint_sha256": base_sha,
                "model_type": seg.model_type, "hyperparameters": asdict(cfg)}
    _prepare_out(out, identity, resume, log, name="sam-run.json", fresh=fresh)
    state, weights = out / "sam-state.pt", out / "sam_decoder.pth"
    if resume and state.exists():
        log("SAM: resuming from sam-state.pt")

    def on_epoch(e: dict) -> None:
        v = "-" if e["val_miou"] is None else f"{e['val_miou']:.4f}"
        log(f"SAM epoch {e['epoch']}/{cfg.epochs}: train loss {e['train_loss']:.4f}, val mIoU {v}")

    try:
        history = finetune_sam(seg.model_type, seg.checkpoint, train, val, weights, epochs=cfg.epochs, lr=cfg.lr,
                               weight_decay=cfg.weight_decay, batch=cfg.batch, seed=cfg.seed, device=preset.device,
                               resume_state=state if resume and state.exists() else None, state_path=state,
                               on_epoch=on_epoch)
    except SamFinetuneError as e:
        raise FinetuneError(str(e)) from e
    section = {
        "method": "decoder",
        "base_model": {"model_type": seg.model_type, "checkpoint": seg.checkpoint, "checkpoint_sha256": base_sha},
        "weights": {"path": weights.name, "checkpoint_sha256": file_sha256(weights), "bytes": weights.stat().st_size,
                    "trained": history["trained"]},
        "checkpoint_sha256": file_sha256(weights),
        "training_data": {**training_data(data, identity), "train_instances": history["train_instances"],
                          "val_instances": history["val_instances"]},
        "ontology": data.ontology.to_dict(),
        "hyperparameters": asdict(cfg), "seed": cfg.seed,
        "base_val_miou": history["base_val_miou"],
        "epochs": history["epochs"],
    }
    return data, (section, {"checkpoint": weights.name})


def finetune_segmenter(preset_path, store, labelset: str | None, out, cfg: SamFinetuneConfig, resume: bool = False,
                       log=print) -> dict:
    """``--component segmenter``: train (:func:`train_segmenter`), then write ``OUT/preset.yaml``
    and ``OUT/finetune.json``; returns the record written.

    Raises:
        FinetuneError: as :func:`train_segmenter`; PresetError, StoreError: as their loaders.
    """
    from distillery.engine.store import LabelStore
    from distillery.labeling.teachers import TeacherPreset

    preset = TeacherPreset.load(preset_path)
    out = Path(out)
    data, part = train_segmenter(preset, LabelStore(store).open(labelset), out, cfg, resume, log)
    return write_provenance(out, preset, data, {"segmenter": part}, "SAM mask decoder")


def finetune_both(preset_path, store, labelset: str | None, out, det_cfg, sam_cfg: SamFinetuneConfig,
                  resume: bool = False, ray_address: str | None = None, log=print) -> dict:
    """``--component both``: the detector (:func:`~distillery.labeling.finetune.run.finetune_detector`),
    then SAM, in one ``out``; one preset with both, one ``finetune.json`` with a section each."""
    from distillery.engine.store import LabelStore
    from distillery.labeling.finetune.run import finetune_detector
    from distillery.labeling.teachers import TeacherPreset

    preset = TeacherPreset.load(preset_path)
    _need_checkpoint(preset)  # before hours of detector training
    out = Path(out)
    data, det = finetune_detector(preset_path, store, labelset, out, det_cfg, resume=resume, ray_address=ray_address,
                                  log=log, write=False)
    if det_cfg.workers:
        log("SAM: trains in this process on the preset's device (--workers applies to the detector)")
    _, seg = train_segmenter(preset, LabelStore(store).open(labelset), out, sam_cfg, resume, log, fresh=False)
    return write_provenance(out, preset, data, {"detector": det, "segmenter": seg},
                            f"detector {det_cfg.method}, SAM mask decoder")
