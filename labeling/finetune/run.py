"""A teacher fine-tuning run: data, training (in this process or on Ray Train), checkpoints,
resume, and what it leaves in ``OUT``::

    OUT/run.json              # what this run trains on and how (checked again by --resume)
    OUT/checkpoints/epoch-NNNN.pt   # after every epoch: trainable weights, optimizer, history
    OUT/adapter/              # method lora: the peft LoRA adapter (adapter_config.json, .safetensors)
    OUT/model/                # methods heads, full: the whole detector (save_pretrained) and processor
    OUT/preset.yaml           # the input preset, pointing at them (detector.adapter or detector.model)
    OUT/finetune.json         # provenance: base model, weights sha256, label set, curation, data hash,
                              # hyperparameters, seed, per-epoch loss and validation AP, data counts

(``--component segmenter`` and ``both`` add SAM's files, :mod:`.sam_run`; one preset.yaml and
one finetune.json serve both components, :func:`write_provenance`.)

A checkpoint is written whole under a temporary name and renamed, so ``kill -9`` loses at
most the epoch in flight; ``resume=True`` continues after the last checkpoint. Captions,
flips and sampling order are drawn from seeds of (seed, epoch), and the torch generator is
reseeded each epoch, so a resumed run repeats what the uninterrupted run would have done.

Scale: ``workers=0`` trains on one device in this process (the preset's ``device``); ``workers=N``
runs the same loop on N Ray Train workers (``TorchTrainer``, DistributedDataParallel; one GPU
each where the cluster has GPUs, else CPU processes with the gloo backend). Worker 0 writes
checkpoints and weights to ``OUT``, so on a multi-node cluster ``OUT`` must be shared storage;
it also validates each epoch while the other workers wait. Training runs in float32 whatever
the preset's ``precision`` (which applies to labelling).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distillery.labeling.finetune.data import FinetuneData, select_training_data
from distillery.labeling.finetune.detector import CaptionError, CaptionSampler, METHODS
from distillery.labeling.finetune.provenance import training_data, write_provenance


class FinetuneError(ValueError):
    """A fine-tuning run cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters (defaults: mmdetection's Grounding DINO fine-tune recipe, AdamW with
    lr 1e-4, weight decay 1e-4, gradient norm clipped to 0.1, learning rate x0.1 for the last
    twelfth of the epochs; Open-GroundingDino's 80 classes per caption).

    Attributes:
        method: ``lora``, ``heads`` or ``full`` (:mod:`.detector`); rank: LoRA rank (alpha = rank).
        epochs, lr, weight_decay, clip, batch (images per device and step), seed.
        val_fraction: images held out by image id; flip: probability of a left-right flip.
        max_classes: classes per training caption at most; curation: version (None: latest, 0: none).
        workers: 0 trains in this process; N >= 1 on N Ray Train workers.
    """

    method: str = "lora"
    epochs: int = 12
    lr: float = 1e-4
    weight_decay: float = 1e-4
    clip: float = 0.1
    batch: int = 4
    rank: int = 16
    seed: int = 0
    val_fraction: float = 0.1
    flip: float = 0.5
    max_classes: int = 80
    curation: int | None = None
    workers: int = 0

    def check(self) -> None:
        """Raises FinetuneError naming the bad setting."""
        if self.method not in METHODS:
            raise FinetuneError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("epochs", "batch", "rank", "max_classes"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.clip > 0):
            raise FinetuneError(f"--lr and the gradient clip must be > 0, weight decay >= 0 (got lr {self.lr})")
        if not 0.0 <= self.val_fraction < 1.0 or not 0.0 <= self.flip <= 1.0:
            raise FinetuneError(f"--val-fraction must lie in [0, 1) and flip in [0, 1], got {self.val_fraction}, "
                                f"{self.flip}")


def lr_at(cfg: FinetuneConfig, epoch: int) -> float:
    """Learning rate of epoch ``epoch`` (1-based): ``lr``, then x0.1 from epoch ``round(11/12 *
    epochs) + 1`` on (mmdetection's 12-epoch schedule steps at epoch 11), for runs of 2+ epochs."""
    step = round(cfg.epochs * 11 / 12)
    return cfg.lr * (0.1 if cfg.epochs >= 2 and epoch > step else 1.0)


# -- checkpoints --------------------------------------------------------------------------

def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first."""
    d = Path(out) / "checkpoints"
    return sorted(d.glob("epoch-[0-9][0-9][0-9][0-9].pt")) if d.is_dir() else []


def save_checkpoint(out: Path, epoch: int, state: dict) -> Path:
    """Write ``state`` as ``checkpoints/epoch-NNNN.pt`` (temporary name, fsync, rename), then
    remove older checkpoints."""
    import torch

    d = Path(out) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    path, tmp = d / f"epoch-{epoch:04d}.pt", d / f".tmp-epoch-{epoch:04d}.pt"
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in checkpoints(out)[:-1]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


# -- the training loop (one process, or one Ray Train worker) -----------------------------

def _trainable(model) -> dict:
    inner = getattr(model, "module", model)
    return {n: p for n, p in inner.named_parameters() if p.requires_grad}


def train_loop(config: dict) -> None:
    """Train, validate and checkpoint every epoch from the last checkpoint in ``config["out"]``
    on; then write the weights. Runs as is in this process, or as Ray Train's
    ``train_loop_per_worker`` (``config["ray"]`` True)."""
    import torch

    from distillery.labeling.detector import resolve_device
    from distillery.labeling.finetune import detector as fd

    cfg, data, out = FinetuneConfig(**config["cfg"]), config["data"], Path(config["out"])
    det = config["preset"]["detector"]
    rank, world = 0, 1
    if config.get("ray"):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
    else:
        device = resolve_device(config["preset"]["device"])
    torch.manual_seed(cfg.seed)
    processor, model = load_base(det["model"], det["revision"], det.get("kind", "grounding-dino"))
    model = fd.make_trainable(model, cfg.method, cfg.rank)
    counts = fd.parameter_counts(model)
    fd.detection_model(model).loss_function = fd.grounding_dino_loss
    model.to(device)
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, start = [], 1
    if ckpts := checkpoints(out):
        state = load_checkpoint(ckpts[-1])
        trainable = _trainable(model)
        for name, value in state["trainable"].items():
            trainable[name].data.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"] + 1
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"find_unused_parameters": cfg.method != "lora"})
    sampler = CaptionSampler(data.ontology, processor.tokenizer, int(fd.detection_model(model).config.max_text_len),
                             cfg.max_classes)
    dataset = fd.DetectionDataset(data.train, sampler, cfg.seed, cfg.flip)
    order = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch, sampler=order,
                                         collate_fn=fd.Collate(processor, det.get("image_size")))
    log = config.get("log") or (lambda line: None)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        dataset.set_epoch(epoch), order.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        loss = fd.train_epoch(model, loader, optimizer, device, cfg.clip)
        if world > 1:
            t = torch.tensor([loss], device=device)
            torch.distributed.all_reduce(t)
            loss = float(t) / world
        metrics = {"epoch": epoch, "train_loss": loss, "lr": lr_at(cfg, epoch), "steps": len(loader)}
        if rank == 0:
            metrics.update(fd.validate(model, processor, data.val, data.ontology, config["preset"], device))
            metrics["seconds"] = round(time.perf_counter() - t0, 2)
            history.append(metrics)
            save_checkpoint(out, epoch, {"epoch": epoch, "history": history, "optimizer": optimizer.state_dict(),
                                         "parameters": counts,
                                         "trainable": {n: p.detach().cpu() for n, p in _trainable(model).items()}})
            log(f"epoch {epoch}/{cfg.epochs}: train loss {loss:.4f}, val AP50 {_fmt(metrics['val_ap50'])}, "
                f"AP {_fmt(metrics['val_ap'])} ({metrics['seconds']:.1f} s)")
        if config.get("ray"):
            ray.train.report({k: v for k, v in metrics.items() if v is not None})
    if rank == 0:
        save_weights(model, processor, cfg.method, out)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


#: detector kinds ``teachers finetune`` trains -> the transformers class it loads (the same as labelling's)
FINETUNE_DETECTORS = {"grounding-dino": "GroundingDinoForObjectDetection",
                      "mm-grounding-dino": "MMGroundingDinoForObjectDetection"}


def load_base(model: str, revision: str | None, kind: str = "grounding-dino"):
    """``(processor, model)`` of the preset's detector of ``kind`` (:data:`FINETUNE_DETECTORS`), as
    labelling loads it."""
    import transformers
    from transformers import AutoProcessor

    return (AutoProcessor.from_pretrained(model, revision=revision),
            getattr(transformers, FINETUNE_DETECTORS[kind]).from_pretrained(model, revision=revision))


def save_weights(model, processor, method: str, out: Path) -> Path:
    """``OUT/adapter`` (lora: peft ``save_pretrained``) or ``OUT/model`` (the whole detector and
    its processor), written to a temporary folder and renamed into place.

    Raises:
        TrainingDiverged: a trained weight is NaN or infinite (the last step's update can
            diverge after its loss was checked); nothing is written.
    """
    from distillery.labeling.finetune.detector import TrainingDiverged, detection_model
    from distillery.labeling.finetune.loss import diverged_weights

    net = getattr(model, "module", model)
    why = diverged_weights((n, p) for n, p in net.named_parameters() if p.requires_grad)
    if why:
        raise TrainingDiverged(why)
    final = Path(out) / ("adapter" if method == "lora" else "model")
    tmp = Path(out) / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    if method == "lora":
        net.save_pretrained(tmp)
    else:
        detection_model(net).save_pretrained(tmp)
        processor.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


# -- the run ------------------------------------------------------------------------------

def captionable(data: FinetuneData, sampler: CaptionSampler) -> FinetuneData:
    """``data`` without the images whose positive classes alone exceed one caption (counted as
    ``skipped_caption_too_long``; their objects could not all be named, so the image would teach misses)."""
    keep = []
    for im in data.images:
        try:
            sampler.check(im.classes)
            keep.append(im)
        except CaptionError:
            data.counts["skipped_caption_too_long"] += 1
            data.counts["used_val" if im.val else "used_train"] -= 1
    data.images = keep
    return data


def _prepare_out(out: Path, identity: dict, resume: bool, log, name: str = "run.json", fresh: bool = True) -> None:
    """Check ``out`` (no earlier run unless ``resume``; on resume the same ``identity`` as in
    ``out/name``), then write ``identity`` there. ``fresh=False``: the second component of a
    run whose first one has just written to ``out``."""
    previous = out / name
    if not resume:
        earlier = [out / "run.json", out / "sam-run.json", out / "finetune.json", out / "checkpoints",
                   out / "sam-state.pt"]
        if fresh and any(p.exists() for p in earlier):
            raise FinetuneError(f"{out} holds an earlier fine-tuning run: pass --resume to continue it, or choose "
                                "another --out")
    elif previous.exists():
        before = json.loads(previous.read_text())
        changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if changed:
            raise FinetuneError(f"--resume: {out} was trained with other {', '.join(changed)} ({previous}); rerun "
                                "with the same options, or choose another --out")
        if name == "run.json":
            done = checkpoints(out)
            log(f"resuming after epoch {int(done[-1].stem.split('-')[1])}" if done else "resuming: no checkpoint yet")
    else:
        log(f"--resume: nothing to resume in {out}; starting")
    out.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(identity, indent=2, sort_keys=True))


def worker_log(line: str) -> None:
    """A Ray Train worker's log: its stdout, which Ray forwards to the driver. A module function,
    not ``print`` itself: cloudpickle pickles a builtin by identity and refuses one that another
    library has replaced (``Can't pickle <built-in function print>``, seen in the full suite)."""
    print(line, flush=True)


def run_ray(config: dict, workers: int, want_gpu: bool, ray_address: str | None) -> None:
    """``train_loop`` on ``workers`` Ray Train workers (``TorchTrainer``): one GPU each when
    ``want_gpu`` and the cluster has that many, else CPU workers over gloo."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        if ray_address:
            from distillery.engine.ray_local import check_ray_address

            check_ray_address(ray_address)
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False)
    gpu = want_gpu and ray.cluster_resources().get("GPU", 0) >= workers
    out = Path(config["out"]).resolve()
    trainer = TorchTrainer(
        train_loop, train_loop_config={**config, "ray": True, "log": worker_log},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name="finetune", storage_path=str(out / "ray")),
    )
    try:
        trainer.fit()
    except ray.exceptions.RayError as e:  # TrainingFailedError and other Ray failures: the workers' error
        raise FinetuneError(f"Ray Train failed: {str(e).strip().splitlines()[-1]}") from e


def finetune_detector(preset_path, store, labelset: str | None, out, cfg: FinetuneConfig, resume: bool = False,
                      ray_address: str | None = None, log=print, write: bool = True):
    """Fine-tune the preset's Grounding DINO on a label set (see the module docstring).

    Args:
        preset_path: a teachers preset (its detector is the base; it must have no adapter).
        store, labelset: the label store and a label set name or id (None: the store's only one).
        out: the output folder; cfg: hyperparameters; resume: continue the run in ``out``.
        ray_address: a Ray cluster for ``cfg.workers`` >= 1 (None: a local one).
        log: called with progress lines.

        write: write ``preset.yaml`` and ``finetune.json`` (False: a part of a run that trains the
            segmenter next, see :mod:`.sam_run`).

    Returns:
        the provenance written to ``OUT/finetune.json``; with ``write=False`` instead
        ``(data, (section, preset keys))`` for
        :func:`~distillery.labeling.finetune.provenance.write_provenance`.

    Raises:
        FinetuneError: bad settings, nothing to train on, ``out`` holds another run, or a
            resumed run with other inputs; PresetError, StoreError: as their loaders.
    """
    from transformers import AutoConfig, AutoTokenizer

    from distillery.engine.store import LabelStore
    from distillery.labeling.teachers import TeacherPreset, detector_identity

    cfg.check()
    preset = TeacherPreset.load(preset_path)
    det = preset.detector
    if det.adapter is not None:
        raise FinetuneError(f"{preset_path}: detector.adapter is set; fine-tune from the base preset (without the "
                            "adapter key) so that the new adapter applies to the weights it was trained on")
    ls = LabelStore(store).open(labelset)
    data = select_training_data(ls, cfg.curation, cfg.val_fraction)
    tokenizer = AutoTokenizer.from_pretrained(det.model, revision=det.revision)
    max_text_len = int(getattr(AutoConfig.from_pretrained(det.model, revision=det.revision), "max_text_len", 256))
    data = captionable(data, CaptionSampler(data.ontology, tokenizer, max_text_len, cfg.max_classes))
    log(data.summary())
    if not data.train:
        raise FinetuneError(
            f"nothing to train on: {data.summary()}. The detector learns only from images a person reviewed "
            "exhaustively: accept whole images in curation (sample tag accept), decide every instance of an image, "
            "or fine-tune on ground truth imported with `distillery labels import`")
    identity = {"labelset": ls.id, "curation_version": data.curation_version,
                "training_data_sha256": data.instance_ids_sha256(), "base": detector_identity(det.model, det.revision),
                "hyperparameters": asdict(cfg)}
    out = Path(out)
    _prepare_out(out, identity, resume, log)
    config = {"cfg": asdict(cfg), "data": data, "out": str(out), "preset": preset.to_dict()}
    if cfg.workers:
        run_ray(config, cfg.workers, preset.device != "cpu", ray_address)
    else:
        train_loop({**config, "log": log})
    part = detector_section(out, preset, data, cfg, identity)
    if not write:
        return data, part
    return write_provenance(out, preset, data, {"detector": part}, cfg.method)


def detector_section(out: Path, preset, data: FinetuneData, cfg: FinetuneConfig, identity: dict) -> tuple[dict, dict]:
    """The detector's part of ``finetune.json`` and its ``preset.yaml`` keys, after the last epoch."""
    from distillery.labeling.teachers import adapter_sha256, detector_identity

    state = load_checkpoint(checkpoints(out)[-1])
    if cfg.method == "lora":
        weights = {"path": "adapter", "adapter_sha256": adapter_sha256(out / "adapter"),
                   "bytes": sum(f.stat().st_size for f in (out / "adapter").iterdir() if f.is_file())}
        keys = {"adapter": "adapter"}
    else:
        files = detector_identity(str(out / "model"), None)["files"]
        weights = {"path": "model", "files": files,
                   "bytes": sum(f.stat().st_size for f in (out / "model").iterdir() if f.is_file())}
        keys = {"model": "model", "revision": None}
    base = preset.detector
    section = {
        "method": cfg.method,
        "base_model": {"model": base.model, "revision": base.revision, "identity": identity["base"]},
        "weights": weights, "adapter_sha256": weights.get("adapter_sha256"),
        "training_data": training_data(data, identity),
        "ontology": data.ontology.to_dict(),
        "hyperparameters": asdict(cfg), "seed": cfg.seed,
        "parameters": state.get("parameters"),
        "epochs": state["history"],
    }
    return section, keys
