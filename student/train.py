"""The soft-label student trainer: ultralytics' ``SegmentationTrainer`` subclassed to read its
data from the label store (:mod:`distillery.student.data`) and to train with
:class:`distillery.student.loss.SoftSegmentationLoss`. Everything else -- augmentation, optimiser,
EMA, validation, checkpoints, resume, logging -- is ultralytics' own.

A run directory (``--out``) holds what ultralytics writes (``weights/last.pt``,
``weights/best.pt``, ``args.yaml``, ``results.csv``, plots) plus ``data.yaml`` (where the data
came from: store, label set, selection; ultralytics' ``data`` argument points at it) and
``distillery.json`` (label-set fingerprint, curation version, selection counts).
Checkpoints are plain ultralytics checkpoints (the criterion is not saved), loadable with
``ultralytics.YOLO`` alone.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils.torch_utils import unwrap_model

from distillery.engine.store import LabelStore, StoreError
from distillery.student.data import Selection, StoreSegDataset, TrainTable, build_table, table_summary
from distillery.student.loss import SoftSegmentationLoss

DATA_FILE = "data.yaml"


def read_data_spec(path: str | Path) -> dict:
    """The ``data.yaml`` a run was started with (keys: store, labelset, selection, val_labelset)."""
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or spec.get("kind") != "distillery-store":
        raise ValueError(f"{path} is not a distillery data file (made by `distillery train`)")
    return spec


class SoftSegmentationTrainer(SegmentationTrainer):
    """ultralytics ``SegmentationTrainer`` over a label store; ``args.data`` is the run's
    ``data.yaml`` (see :func:`train`). ``table``: the training selection already built from
    that file (else it is built here)."""

    def __init__(self, *args, table: TrainTable | None = None, **kwargs):
        self._prebuilt = table
        super().__init__(*args, **kwargs)

    def get_dataset(self):
        spec = read_data_spec(self.args.data)
        store = LabelStore(spec["store"])
        ls = store.open(spec["labelset"])
        sel = Selection(**{**spec["selection"], "classes": tuple(spec["selection"]["classes"])
                           if spec["selection"].get("classes") else None})
        self.table: TrainTable = self._prebuilt if self._prebuilt is not None else build_table(ls, sel)
        self.val_table = None
        if spec.get("val_labelset"):
            gt = store.open(spec["val_labelset"])
            missing = sorted(set(self.table.names) - set(gt.classes))
            if missing:
                raise StoreError(f"val label set {gt.id} lacks class(es) {missing} of the training ontology")
            vsel = Selection(min_score=0.0, ignore_min_score=0.0, weight="none", classes=tuple(self.table.names),
                             val_fraction=1.0, curation=0)
            self.val_table = build_table(gt, vsel, require_train=False)
        from ultralytics.utils import LOGGER

        LOGGER.info(table_summary(self.table))
        names = dict(enumerate(self.table.names))
        return {"names": names, "nc": len(names), "channels": 3, "train": "store:train", "val": "store:val",
                "yaml_file": str(self.args.data)}

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        from ultralytics.utils import colorstr

        gs = max(int(unwrap_model(self.model).stride.max()), 32) if self.model is not None else 32
        if mode == "train":
            table, split = self.table, "train"
        elif self.val_table is not None:  # a GT label set: all its images, hard classes
            table, split = _as_val(self.val_table), "val"
        else:
            table, split = self.table, "val"
        if not table.images[split]:
            raise StoreError(f"no {mode} images after selection ({table_summary(table)}); "
                             "adjust --val-fraction or pass --val-labelset")
        return StoreSegDataset(
            img_path=img_path, imgsz=self.args.imgsz, batch_size=batch, augment=mode == "train", hyp=self.args,
            rect=self.args.rect or mode != "train", cache=self.args.cache or None, single_cls=False, stride=gs,
            pad=0.0 if mode == "train" else 0.5, prefix=colorstr(f"{mode}: "), task="segment", classes=None,
            data=self.data, fraction=1.0, table=table, split=split,
        )

    def preprocess_batch(self, batch: dict) -> dict:
        """ultralytics' preprocessing, then row ids in ``cls`` -> hard class, ``soft``, ``weight``,
        ``ignore`` (the criterion is set to the soft loss here, so checkpoints stay stock)."""
        batch = super().preprocess_batch(batch)
        model = unwrap_model(self.model)
        if not isinstance(getattr(model, "criterion", None), SoftSegmentationLoss):
            model.criterion = SoftSegmentationLoss(model)
        t = self.table
        rows = batch["cls"].view(-1).round().long().cpu().numpy()
        dev = batch["img"].device
        batch["soft"] = torch.from_numpy(t.soft[rows]).to(dev)
        batch["weight"] = torch.from_numpy(t.weight[rows]).to(dev)
        batch["ignore"] = torch.from_numpy(t.ignore[rows]).to(dev)
        batch["cls"] = torch.from_numpy(np.maximum(t.hard[rows], 0)).to(dev, torch.float32).view(-1, 1)
        return batch

    def _train_hard_classes(self) -> np.ndarray:
        rows = np.concatenate([lb["cls"].reshape(-1) for lb in self.train_loader.dataset.labels], 0).astype(np.int64)
        hard = self.table.hard[rows]
        return hard[hard >= 0]

    def get_class_counts(self):
        return np.bincount(self._train_hard_classes(), minlength=self.data["nc"]).astype(np.float32)

    def plot_training_labels(self):
        from ultralytics.utils.plotting import plot_labels

        ds = self.train_loader.dataset
        rows = np.concatenate([lb["cls"].reshape(-1) for lb in ds.labels], 0).astype(np.int64)
        boxes = np.concatenate([lb["bboxes"] for lb in ds.labels], 0)
        keep = self.table.hard[rows] >= 0
        plot_labels(boxes[keep], self.table.hard[rows][keep], names=self.data["names"], save_dir=self.save_dir,
                    on_plot=self.on_plot)


def _as_val(t: TrainTable) -> TrainTable:
    """A table whose images all sit in the ``val`` split (a GT label set used for validation)."""
    return TrainTable(**{**t.__dict__, "images": {"train": [], "val": t.images["train"] + t.images["val"]}})


def train(store: str | Path, out: str | Path, model: str = "yolov8n-seg.yaml", labelset: str | None = None,
          selection: Selection | None = None, val_labelset: str | None = None, resume: bool = False,
          callbacks: dict | None = None, **train_args) -> Path:
    """Train a student; returns the run directory.

    Args:
        store: label store; labelset: name, id or unique id prefix (default: the only one).
        out: run directory (``project/name`` for ultralytics); must not hold a run unless ``resume``.
        model: an ultralytics model YAML (from scratch, e.g. ``yolov8n-seg.yaml``) or a ``.pt``.
        selection: what to learn (:class:`distillery.student.data.Selection`).
        val_labelset: validate on this label set (e.g. GT imported with ``labels import``)
            instead of the held-out split.
        resume: continue ``out/weights/last.pt`` (same data and settings).
        callbacks: ultralytics callbacks to add, ``{event: fn(trainer)}``.
        train_args: any ultralytics train argument (epochs, imgsz, batch, seed, mosaic...).

    Raises:
        StoreError / ValueError: bad store, label set or settings, a selection with no
        training target (the message counts what removed them), a ``model`` that is not an
        ultralytics segmentation YAML or checkpoint, or a ``resume`` of a run that finished;
        FileExistsError: ``out`` already holds a run and ``resume`` is False.
    """
    from distillery.engine.filekinds import checkpoint_progress, model_config

    out = Path(out).resolve()
    last = out / "weights" / "last.pt"
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"nothing to resume: {last} does not exist")
        epoch, epochs = checkpoint_progress(last)
        if epoch < 0 or (epochs is not None and epoch + 1 >= epochs):  # ultralytics sets -1 when a run ends
            raise ValueError(f"run {out} finished{f' its {epochs} epochs' if epochs else ''}; nothing to resume. To "
                             f"train more, start a new run from its weights: distillery train --model {last} "
                             "--out NEW_RUN_DIR (with the store and settings you want)")
        trainer = SoftSegmentationTrainer(overrides={"resume": str(last)})
        for event, fn in (callbacks or {}).items():
            trainer.add_callback(event, fn)
        _run(trainer)
        return out
    if last.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    model_config(str(model), "model")
    st = LabelStore(store)
    ls = st.open(labelset)
    sel = selection or Selection()
    table = build_table(ls, sel)  # refuses a selection with nothing to learn, before anything is written
    if val_labelset:
        val_labelset = st.open(val_labelset).id
    out.mkdir(parents=True, exist_ok=True)
    names = list(sel.classes) if sel.classes else ls.classes
    spec = {
        "kind": "distillery-store",
        # ultralytics' own keys, so its stand-alone validator (final_eval) accepts the file;
        # the images themselves come from the store (train/val point at this directory)
        "path": str(out), "train": ".", "val": ".", "names": dict(enumerate(names)),
        "store": str(Path(store).resolve()),
        "labelset": ls.id,
        "val_labelset": val_labelset,
        "selection": {**asdict(sel), "classes": list(sel.classes) if sel.classes else None},
    }
    (out / DATA_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    overrides = {"model": str(model), "data": str(out / DATA_FILE), "project": str(out.parent), "name": out.name,
                 "exist_ok": True, "task": "segment", **train_args}
    trainer = SoftSegmentationTrainer(overrides=overrides, table=table)

    def record(tr):
        t = tr.table
        info = {"labelset": t.labelset, "curation_version": t.curation_version,  # the id is the fingerprint
                "names": t.names, "selection": spec["selection"], "val_labelset": val_labelset,
                "counts": dict(t.stats), "model": str(model)}
        (Path(tr.save_dir) / "distillery.json").write_text(json.dumps(info, indent=2))

    trainer.add_callback("on_pretrain_routine_end", record)
    for event, fn in (callbacks or {}).items():
        trainer.add_callback(event, fn)
    _run(trainer)
    return Path(trainer.save_dir)


def _run(trainer) -> None:
    """``trainer.train()`` without Ray's warning that ``get_trial_id`` is called outside Ray
    Tune: ultralytics' raytune callback asks it every epoch to learn whether it runs in a Tune
    trial (it does not here; the answer, None, is right)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`get_trial_id` is meant to only be")
        trainer.train()
