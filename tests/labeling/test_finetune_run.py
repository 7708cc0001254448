"""`distillery teachers finetune`: training that learns, the outputs and their provenance, a new
label set from the fine-tuned preset, refusals, resume after kill -9, Ray Train."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from distillery.engine.cli import main
from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco
from distillery.labeling.finetune.data import select_training_data
from distillery.labeling.teachers import TeacherPreset, adapter_sha256

SIZE = {"shortest_edge": 96, "longest_edge": 144}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_preset(tiny_teachers, tmp_path_factory) -> Path:
    """The tiny teachers at a small image size (fine-tuning on CPU in seconds)."""
    p = TeacherPreset.load(tiny_teachers).to_dict()
    p["detector"].update(image_size=SIZE, max_detections=50)
    path = tmp_path_factory.mktemp("preset") / "teachers.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def gt_subset(coco128, coco128_gt, n: int, folder: Path, offset: int = 0) -> Path:
    ims = coco128_gt["images"][offset:offset + n]
    ids = {im["id"] for im in ims}
    sub = {"images": ims, "annotations": [a for a in coco128_gt["annotations"] if a["image_id"] in ids],
           "categories": coco128_gt["categories"]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gt.json").write_text(json.dumps(sub))
    return folder / "gt.json"


def run(args) -> str:
    out = CliRunner().invoke(main, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


def shard_hashes(ls) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ls.shards()}


def label_base_then_tuned(store, coco128, images, base_preset, out):
    """``label`` the images with the base preset (label set ``base``), then with ``OUT/preset.yaml``
    (``tuned``); asserts a new label set id. Returns (old, new, the old shards' sha256 before)."""
    imgs = [coco128 / "images" / im["file_name"] for im in images]
    label = ["label", *imgs, "--classes", "person,dog", "--store", store, "--runner", "local", "--quiet"]
    run([*label, "--teachers", base_preset, "--name", "base"])
    old = LabelStore(store).open("base")
    before = shard_hashes(old)
    run([*label, "--teachers", out / "preset.yaml", "--name", "tuned"])
    new = LabelStore(store).open("tuned")
    assert new.id != old.id
    return old, new, before



def test_training_loss_falls_70_percent_on_coco128_photos(small_preset, coco128, coco128_gt, tmp_path):
    from distillery.labeling.finetune import detector as fd
    from distillery.labeling.finetune.run import load_base

    ls, _ = import_coco(LabelStore(tmp_path / "s"), str(gt_subset(coco128, coco128_gt, 4, tmp_path)),
                        str(coco128 / "images"))
    data = select_training_data(ls, val_fraction=0.0)
    processor, model = load_base(TeacherPreset.load(small_preset).detector.model, None)
    torch.manual_seed(0)
    model = fd.make_trainable(model, "lora", rank=16)
    fd.detection_model(model).loss_function = fd.grounding_dino_loss
    ds = fd.DetectionDataset(data.train, fd.CaptionSampler(data.ontology, processor.tokenizer), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, collate_fn=fd.Collate(processor, SIZE))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    losses = []
    steps = 0
    while steps < 200:
        losses.append(fd.train_epoch(model, loader, opt, "cpu"))  # the mean over all 4 photos
        steps += len(loader)
        if losses[-1] <= 0.3 * losses[0]:
            break
    print(f"training loss {losses[0]:.1f} -> {losses[-1]:.1f} ({100 * (1 - losses[-1] / losses[0]):.0f}% lower) "
          f"in {steps} steps")
    assert losses[-1] <= 0.3 * losses[0], losses


def test_finetune_writes_adapter_preset_provenance_and_labels_into_a_new_set(small_preset, coco128, coco128_gt,
                                                                             tmp_path):
    store, out = tmp_path / "store", tmp_path / "ft"
    run(["labels", "import", "--coco", gt_subset(coco128, coco128_gt, 6, tmp_path), "--images", coco128 / "images",
         "--store", store, "--name", "gt6"])
    log = run(["teachers", "finetune", "--teachers", small_preset, "--store", store, "--labelset", "gt6", "--out", out,
               "--epochs", 1, "--batch", 2, "--rank", 4, "--val-fraction", 0.34, "--seed", 3])
    data = select_training_data(LabelStore(store).open("gt6"), val_fraction=0.34)
    assert f"{len(data.train)} train / {len(data.val)} val images" in log and len(data.val) >= 1
    assert "epoch 1/1: train loss" in log and "done: 1 epochs" in log

    rec = json.loads((out / "finetune.json").read_text())
    assert rec["component"] == "detector" and rec["method"] == "lora"
    assert rec["base_model"]["model"] == TeacherPreset.load(small_preset).detector.model
    assert rec["base_model"]["identity"]["files"]  # the local base model's file hashes
    assert rec["adapter_sha256"] == adapter_sha256(out / "adapter") == rec["weights"]["adapter_sha256"]
    assert rec["weights"]["bytes"] == sum(f.stat().st_size for f in (out / "adapter").iterdir())
    assert rec["labelset"]["id"] == data.labelset and rec["labelset"]["kind"] == "import"
    assert rec["curation_version"] == 0
    assert rec["training_data"]["instance_ids_sha256"] == data.instance_ids_sha256()
    assert rec["hyperparameters"]["rank"] == 4 and rec["seed"] == 3 and rec["hyperparameters"]["lr"] == 1e-4
    (epoch,) = rec["epochs"]
    assert epoch["epoch"] == 1 and epoch["train_loss"] > 0 and epoch["steps"] == -(-len(data.train) // 2)
    assert epoch["val_ap50"] is not None
    assert 0 < rec["parameters"]["fraction"] < 0.05

    preset = yaml.safe_load((out / "preset.yaml").read_text())
    assert preset["detector"]["adapter"] == "adapter"  # relative to the preset, like model
    assert TeacherPreset.load(out / "preset.yaml").detector.adapter == str((out / "adapter").resolve())

    # label with the base preset, then with the fine-tuned one: a new label set, the old one untouched
    old, new, before = label_base_then_tuned(store, coco128, coco128_gt["images"][:2], small_preset, out)
    assert new.manifest["teachers"]["detector"]["adapter_sha256"] == rec["adapter_sha256"]
    assert "adapter_sha256" not in old.manifest["teachers"]["detector"]
    assert shard_hashes(old) == before
    assert new.counts().images == 2

    # the loop closes: `teachers eval` reads this finetune.json (label set, split) and compares the
    # base and the tuned teacher side by side on the GT's held-out images
    from distillery.labeling.teacher_eval import read_finetune

    ft, _ = read_finetune(out / "preset.yaml")
    assert (ft["labelset"], ft["val_fraction"]) == (data.labelset, 0.34)
    log = run(["teachers", "eval", "--teachers", small_preset, "--teachers", out / "preset.yaml", "--store", store,
               "--labelset", "gt6", "--out", tmp_path / "eval"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert len(report["teachers"]) == 2 and "B-A" in log.replace("−", "-"), log
    assert report["images"] == len(data.val), report["images"]

    # refusals, each one line
    cmd = ["teachers", "finetune", "--teachers", small_preset, "--store", store, "--out", out]
    for args, msg in [
        (["--labelset", "gt6"], "holds an earlier fine-tuning run: pass --resume"),
        (["--labelset", "gt6", "--resume", "--epochs", 1, "--batch", 2, "--rank", 4, "--val-fraction", 0.34],
         "was trained with other hyperparameters"),
        (["--labelset", "gt6", "--component", "segmenter"], "holds an earlier fine-tuning run: pass --resume"),
        (["--labelset", "base", "--out", tmp_path / "ft2"], "nothing to train on"),
        (["--labelset", "base", "--component", "segmenter", "--out", tmp_path / "ft5"], "nothing to train SAM on"),
    ]:
        r = CliRunner().invoke(main, [str(a) for a in [*cmd, *args]])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, [str(a) for a in ["teachers", "finetune", "--teachers", out / "preset.yaml", "--store",
                                                   store, "--labelset", "gt6", "--out", tmp_path / "ft3"]])
    assert r.exit_code == 1 and "detector.adapter is set" in r.output
    assert "unreviewed 2" in CliRunner().invoke(main, [str(a) for a in [*cmd, "--labelset", "base", "--out",
                                                                        tmp_path / "ft4"]]).output


def test_finetune_segmenter_writes_a_loadable_sam_checkpoint_and_labels_into_a_new_set(small_preset, coco128,
                                                                                     coco128_gt, tmp_path):
    from distillery.labeling.finetune.sam import mask_miou
    from distillery.labeling.finetune.sam_run import sam_samples
    from distillery.labeling.segmenter import SamTeacher
    from distillery.labeling.teachers import file_sha256

    store, out = tmp_path / "store", tmp_path / "ft"
    run(["labels", "import", "--coco", gt_subset(coco128, coco128_gt, 4, tmp_path), "--images", coco128 / "images",
         "--store", store, "--name", "gt4"])
    log = run(["teachers", "finetune", "--teachers", small_preset, "--store", store, "--labelset", "gt4", "--out", out,
               "--component", "segmenter", "--epochs", 2, "--batch", 4, "--lr", 1e-3, "--val-fraction", 0.34,
               "--seed", 1])
    data = select_training_data(LabelStore(store).open("gt4"), val_fraction=0.34, exhaustive=False)
    train, val = sam_samples(data.train), sam_samples(data.val)
    assert len(train) >= 1 and len(val) >= 1, (len(train), len(val))
    assert "SAM epoch 2/2: train loss" in log and "SAM done: 2 epochs" in log

    base = TeacherPreset.load(small_preset).segmenter
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["component"] == "segmenter" and rec["method"] == "decoder"
    assert rec["base_model"]["checkpoint_sha256"] == file_sha256(base.checkpoint)
    assert rec["checkpoint_sha256"] == file_sha256(out / "sam_decoder.pth") != file_sha256(base.checkpoint)
    assert rec["labelset"]["id"] == data.labelset and rec["curation_version"] == 0
    assert rec["training_data"]["instance_ids_sha256"] == data.instance_ids_sha256()
    assert rec["training_data"]["train_instances"] == sum(len(s.boxes) for s in train)
    assert rec["hyperparameters"]["lr"] == 1e-3 and rec["hyperparameters"]["batch"] == 4 and rec["seed"] == 1
    assert [e["epoch"] for e in rec["epochs"]] == [1, 2]
    assert [e["steps"] for e in rec["epochs"]] == [-(-rec["training_data"]["train_instances"] // 4)] * 2

    # the preset points at the new checkpoint (relative), which SamTeacher loads; the recorded val
    # mIoU is that of the saved weights on the held-out images
    assert yaml.safe_load((out / "preset.yaml").read_text())["segmenter"]["checkpoint"] == "sam_decoder.pth"
    seg = TeacherPreset.load(out / "preset.yaml").segmenter
    assert seg.checkpoint == str((out / "sam_decoder.pth").resolve())
    teacher = SamTeacher(seg.model_type, seg.checkpoint, device="cpu")
    assert rec["epochs"][-1]["val_miou"] == pytest.approx(mask_miou(teacher.sam, val, "cpu"), abs=1e-6)
    tuned, old = torch.load(seg.checkpoint, weights_only=True), torch.load(base.checkpoint, weights_only=True)
    assert tuned.keys() == old.keys()
    assert {k.split(".")[0] for k in tuned if not torch.equal(tuned[k], old[k])} == {"mask_decoder"}

    imgs = [coco128 / "images" / im["file_name"] for im in coco128_gt["images"][:1]]
    label = ["label", *imgs, "--classes", "person,dog", "--store", store, "--runner", "local", "--quiet"]
    run([*label, "--teachers", small_preset, "--name", "base"])
    run([*label, "--teachers", out / "preset.yaml", "--name", "tuned"])
    a, b = LabelStore(store).open("base"), LabelStore(store).open("tuned")
    assert a.id != b.id
    assert b.manifest["teachers"]["segmenter"]["checkpoint_sha256"] == rec["checkpoint_sha256"]


def test_finetune_both_writes_one_preset_and_one_record_with_a_section_each(small_preset, coco128, coco128_gt,
                                                                             tmp_path):
    from distillery.labeling.teacher_eval import read_finetune
    from distillery.labeling.teachers import file_sha256

    store, out = tmp_path / "store", tmp_path / "ft"
    run(["labels", "import", "--coco", gt_subset(coco128, coco128_gt, 3, tmp_path), "--images", coco128 / "images",
         "--store", store])
    args = ["teachers", "finetune", "--teachers", small_preset, "--store", store, "--out", out, "--component", "both",
            "--epochs", 1, "--batch", 2, "--rank", 4, "--val-fraction", 0.0]
    log = run(args)
    assert "epoch 1/1: train loss" in log and "SAM epoch 1/1: train loss" in log
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["component"] == "both" and rec["curation_version"] == 0
    assert rec["detector"]["method"] == "lora" and rec["detector"]["adapter_sha256"] == adapter_sha256(out / "adapter")
    assert rec["segmenter"]["checkpoint_sha256"] == file_sha256(out / "sam_decoder.pth")
    # both sections trained on the same 3 ground-truth images (all train at val fraction 0)
    assert rec["detector"]["training_data"]["train_images"] == rec["segmenter"]["training_data"]["train_images"] == 3
    preset = TeacherPreset.load(out / "preset.yaml")
    assert preset.detector.adapter == str((out / "adapter").resolve())
    assert preset.segmenter.checkpoint == str((out / "sam_decoder.pth").resolve())
    ft, _ = read_finetune(out / "preset.yaml")
    assert (ft["labelset"], ft["val_fraction"]) == (rec["labelset"]["id"], 0.0)
    # --resume after both finished: nothing retrained, the same weights
    log = run([*args, "--resume"])
    assert "resuming after epoch 1" in log and "SAM: resuming" in log
    assert json.loads((out / "finetune.json").read_text())["segmenter"]["checkpoint_sha256"] == \
        rec["segmenter"]["checkpoint_sha256"]


@pytest.mark.slow
def test_resume_after_kill_9_repeats_the_uninterrupted_run(small_preset, coco128, coco128_gt, tmp_path):
    store = tmp_path / "store"
    run(["labels", "import", "--coco", gt_subset(coco128, coco128_gt, 8, tmp_path), "--images", coco128 / "images",
         "--store", store])
    args = ["teachers", "finetune", "--teachers", small_preset, "--store", store, "--epochs", 3, "--batch", 2,
            "--rank", 4, "--val-fraction", 0.0, "--lr", 1e-3]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = Path(sys.executable).parent / "distillery"
    proc = subprocess.Popen([str(cli), *map(str, args), "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first = killed / "checkpoints" / "epoch-0001.pt"
    t0 = time.time()
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 300, "no checkpoint after 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in (killed / "checkpoints").glob("*.pt")] == ["epoch-0001.pt"]
    assert not (killed / "finetune.json").exists()

    log = run([*args, "--out", killed, "--resume"])
    assert "resuming after epoch 1" in log and "epoch 1/3" not in log and "epoch 3/3" in log
    whole = tmp_path / "whole"
    run([*args, "--out", whole])
    a, b = (json.loads((d / "finetune.json").read_text())["epochs"] for d in (killed, whole))
    assert [e["train_loss"] for e in a] == [e["train_loss"] for e in b]
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (killed, whole))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_ray_train_with_two_cpu_workers(small_preset, coco128, coco128_gt, tmp_path):
    store, out = tmp_path / "store", tmp_path / "ft"
    run(["labels", "import", "--coco", gt_subset(coco128, coco128_gt, 4, tmp_path), "--images", coco128 / "images",
         "--store", store])
    log = run(["teachers", "finetune", "--teachers", small_preset, "--store", store, "--out", out, "--epochs", 1,
               "--batch", 1, "--rank", 4, "--val-fraction", 0.0, "--workers", 2])
    rec = json.loads((out / "finetune.json").read_text())
    (epoch,) = rec["epochs"]
    assert rec["hyperparameters"]["workers"] == 2
    assert epoch["steps"] == 2, "4 images over 2 workers, 1 per step"
    assert rec["adapter_sha256"] == adapter_sha256(out / "adapter") and "done: 1 epochs" in log
    assert TeacherPreset.load(out / "preset.yaml").detector.adapter


def test_diverged_weights_are_never_saved(tmp_path):
    """The last step's update can turn weights NaN after its loss was checked (--lr 1e9 and
    up): save_weights refuses before writing anything."""
    import torch

    from distillery.labeling.finetune.detector import TrainingDiverged
    from distillery.labeling.finetune.run import save_weights

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"1 trained weight tensor\(s\) hold NaN or infinity \(e.g. weight\)"):
        save_weights(net, None, "lora", tmp_path)
    assert not any(tmp_path.iterdir())
    from distillery.labeling.finetune.loss import diverged_weights  # the SAM decoder's check too

    assert diverged_weights([("a", torch.ones(2)), ("b", torch.tensor([1.0, float("inf")]))]).startswith(
        "1 trained weight tensor(s) hold NaN or infinity (e.g. b)")
    assert diverged_weights([("a", torch.ones(2))]) is None
