"""A mask-decoder fine-tuning run (``distillery teachers finetune --component segmenter|both``)
for every segmenter kind of :data:`~distillery.labeling.finetune.sam_kinds.FINETUNE_SEGMENTERS`:
data from a label set, :func:`~distillery.labeling.finetune.sam.finetune_mask_decoder`, resume,
and what it leaves in ``OUT``::

    OUT/sam-run.json          # what the run trains on and how (checked again by --resume)
    OUT/sam-state.pt          # after every epoch: decoder, optimizer, RNG and history (--resume)
    OUT/sam-embeddings/       # the frozen image encoder's embeddings, one file per image
    OUT/sam_decoder.pth       # sam: the whole fine-tuned SAM state_dict (only the mask decoder changed)
    OUT/segmenter/            # sam2, sam-hq: the whole fine-tuned model + processor (save_pretrained)
    OUT/preset.yaml           # the input preset, segmenter.checkpoint: sam_decoder.pth | segmenter.model: segmenter
    OUT/finetune.json         # provenance (:func:`~distillery.labeling.finetune.provenance.write_provenance`)

Data: :func:`~distillery.labeling.finetune.data.select_training_data` with
``exhaustive=False`` (the mask loss is per instance, so any image with confirmed instances
serves): accepted and relabelled instances, instances of accepted images, and ground truth,
each as a (box, mask) pair; the same split by image id as the detector's.
"""

from __future__ import annotations

import hashlib
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
    """Hyperparameters of the mask-decoder run (every SAM kind): epochs, lr, weight_decay, batch
    (box-mask pairs per step), seed, val_fraction (images held out by image id), curation (None: latest, 0: none)."""

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


#: The folder a transformers kind's fine-tuned model is written to (``save_pretrained``).
HF_OUT = "segmenter"


def check_segmenter(preset) -> None:
    """Refuse, before any training, a segmenter this run cannot fine-tune.

    Raises:
        FinetuneError: a kind outside ``FINETUNE_SEGMENTERS``, or ``sam`` without a checkpoint.
    """
    from distillery.labeling.finetune.sam_kinds import FINETUNE_SEGMENTERS

    seg = preset.segmenter
    if seg.kind not in FINETUNE_SEGMENTERS:
        raise FinetuneError(f"fine-tuning covers segmenter kinds {', '.join(FINETUNE_SEGMENTERS)}, not {seg.kind}")
    if seg.kind == "sam" and seg.checkpoint is None:
        raise FinetuneError("preset: segmenter.checkpoint is not set; SAM is fine-tuned from a checkpoint "
                            "(e.g. sam_vit_b_01ec64.pth from the segment-anything release)")


def _base_model(seg) -> dict:
    """The base weights' identity: SAM's checkpoint sha256; a transformers model's id, revision
    and files (:func:`~distillery.labeling.teachers.detector_identity`, the label-set fingerprint's)."""
    from distillery.labeling.teachers import detector_identity, file_sha256

    if seg.kind == "sam":
        return {"kind": "sam", "model_type": seg.model_type, "checkpoint": seg.checkpoint,
                "checkpoint_sha256": file_sha256(seg.checkpoint)}
    return {"kind": seg.kind, "model": seg.model, "revision": seg.revision,
            "identity": detector_identity(seg.model, seg.revision)}


def _written(kind: str, path: Path, trained: list) -> dict:
    """``finetune.json``'s ``weights``: path (relative to OUT), sha256 of the weights, bytes, trained modules."""
    from distillery.labeling.teachers import detector_identity, file_sha256

    if kind == "sam":
        sha = file_sha256(path)
        return {"path": path.name, "checkpoint_sha256": sha, "weights_sha256": sha, "bytes": path.stat().st_size,
                "trained": trained}
    files = detector_identity(str(path), None)["files"]  # what the new label set's fingerprint holds
    weights = sorted(f for f in files if f.endswith(".safetensors"))
    sha = files[weights[0]] if len(weights) == 1 else hashlib.sha256(
        "".join(f"{f}:{files[f]}\n" for f in weights).encode()).hexdigest()
    return {"path": path.name, "weights_sha256": sha, "files": files,
            "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()), "trained": trained}


def train_segmenter(preset, ls, out: Path, cfg: SamFinetuneConfig, resume: bool, log, fresh: bool = True):
    """Train the mask decoder of ``preset.segmenter`` (any kind of ``FINETUNE_SEGMENTERS``) on label set ``ls``.

    Returns:
        ``(data, (finetune.json section, preset segmenter keys))``.

    Raises:
        FinetuneError: a kind it cannot train, no SAM checkpoint in the preset, base weights that
            do not load, nothing to train on, ``out`` holds another run, or a resumed run with
            other inputs.
    """
    from distillery.labeling.finetune.sam import SamFinetuneError, finetune_mask_decoder
    from distillery.labeling.finetune.sam_kinds import KIND_NAMES, load_kind

    seg = preset.segmenter
    check_segmenter(preset)
    name = KIND_NAMES[seg.kind]
    data: FinetuneData = select_training_data(ls, cfg.curation, cfg.val_fraction, exhaustive=False)
    log(f"{name}: " + data.summary())
    train, val = sam_samples(data.train), sam_samples(data.val)
    if not train:
        raise FinetuneError(
            f"nothing to train {name} on: {data.summary()}. {name} learns from instances a person confirmed: accept or "
            "relabel instances (or whole images) in curation, or fine-tune on ground truth from `distillery labels "
            "import`; each needs a mask")
    base = _base_model(seg)
    identity = {"labelset": ls.id, "curation_version": data.curation_version,
                "training_data_sha256": data.instance_ids_sha256(), "hyperparameters": asdict(cfg)}
    if seg.kind == "sam":  # the keys SAM runs have always had
        identity.update(base_checkpoint_sha256=base["checkpoint_sha256"], model_type=seg.model_type)
    else:
        identity.update(kind=seg.kind, base_model=base["identity"])
    _prepare_out(out, identity, resume, log, name="sam-run.json", fresh=fresh)
    state, weights = out / "sam-state.pt", out / ("sam_decoder.pth" if seg.kind == "sam" else HF_OUT)
    if resume and state.exists():
        log(f"{name}: resuming from sam-state.pt")

    def on_epoch(e: dict) -> None:
        v = "-" if e["val_miou"] is None else f"{e['val_miou']:.4f}"
        log(f"{name} epoch {e['epoch']}/{cfg.epochs}: train loss {e['train_loss']:.4f}, val mIoU {v}")

    try:
        kind = load_kind(seg, preset.device)
        history = finetune_mask_decoder(kind, train, val, weights, epochs=cfg.epochs, lr=cfg.lr,
                                        weight_decay=cfg.weight_decay, batch=cfg.batch, seed=cfg.seed,
                                        resume_state=state if resume and state.exists() else None, state_path=state,
                                        on_epoch=on_epoch)
    except (SamFinetuneError, ValueError, FileNotFoundError) as e:
        raise FinetuneError(str(e)) from e
    written = _written(seg.kind, weights, history["trained"])
    section = {
        "method": "decoder",
        "kind": seg.kind,
        "base_model": base,
        "weights": {**written, "trainable_parameters": history["trainable_parameters"]},
        "weights_sha256": written["weights_sha256"],
        "training_data": {**training_data(data, identity), "train_instances": history["train_instances"],
                          "val_instances": history["val_instances"]},
        "ontology": data.ontology.to_dict(),
        "hyperparameters": asdict(cfg), "seed": cfg.seed,
        "base_val_miou": history["base_val_miou"],
        "epochs": history["epochs"],
    }
    if seg.kind == "sam":
        section["checkpoint_sha256"] = written["checkpoint_sha256"]
        return data, (section, {"checkpoint": weights.name})
    # a local folder: the base's hub revision does not apply to it
    return data, (section, {"model": weights.name, "revision": None})


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
    return write_provenance(out, preset, data, {"segmenter": part}, f"{_name(preset)} mask decoder")


def finetune_both(preset_path, store, labelset: str | None, out, det_cfg, sam_cfg: SamFinetuneConfig,
                  resume: bool = False, ray_address: str | None = None, log=print) -> dict:
    """``--component both``: the detector (:func:`~distillery.labeling.finetune.run.finetune_detector`),
    then SAM, in one ``out``; one preset with both, one ``finetune.json`` with a section each."""
    from distillery.engine.store import LabelStore
    from distillery.labeling.finetune.run import finetune_detector
    from distillery.labeling.teachers import TeacherPreset

    preset = TeacherPreset.load(preset_path)
    check_segmenter(preset)  # before hours of detector training
    out = Path(out)
    data, det = finetune_detector(preset_path, store, labelset, out, det_cfg, resume=resume, ray_address=ray_address,
                                  log=log, write=False)
    if det_cfg.workers:
        log(f"{_name(preset)}: trains in this process on the preset's device (--workers applies to the detector)")
    _, seg = train_segmenter(preset, LabelStore(store).open(labelset), out, sam_cfg, resume, log, fresh=False)
    return write_provenance(out, preset, data, {"detector": det, "segmenter": seg},
                            f"detector {det_cfg.method}, {_name(preset)} mask decoder")


def _name(preset) -> str:
    from distillery.labeling.finetune.sam_kinds import KIND_NAMES

    return KIND_NAMES.get(preset.segmenter.kind, preset.segmenter.kind)
