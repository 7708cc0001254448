"""Detector AP50 on its own training images before and after `distillery teachers finetune`, one run.

    python bench/finetune_overfit.py                          # 8 coco128 photos, tiny teachers, full, 128 px
    python bench/finetune_overfit.py --method lora --epochs 100 --lr 2e-3

The coco128 GT (all 80 classes) of the first N photos is imported into a label store; the
tiny random-weight Grounding DINO (``distillery teachers tiny``, or ``--teachers PRESET``) at
a small image size labels those photos before and after fine-tuning on them, through the
label-time path (``GroundingDinoTeacher``, the preset's thresholds, the adapter merged for
``lora``), and box AP50 against their GT is printed (pycocotools, ignore regions as crowd).
Fine-tuning runs in this process with no validation split and no flips: the bench measures
whether the targets, loss and optimiser can fit the data, not generalisation. Goal: AP50 >=
0.5 after, in <= 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
import bench_args as ba  # bench/ is on sys.path (the script's folder)

ROOT = Path(__file__).resolve().parent.parent
COCO128 = Path(os.environ.get("DISTILLERY_COCO128", ROOT.parent / "shared" / "data" / "coco128"))


def ap50(preset_path: Path, data) -> float:
    """AP50 of the preset's detector on ``data``'s training images, labelled as `distillery label` would."""
    from distillery.engine.images import decode
    from distillery.labeling.detector import GroundingDinoTeacher
    from distillery.labeling.finetune.detector import box_ap
    from distillery.labeling.teachers import TeacherPreset

    d = TeacherPreset.load(preset_path).detector
    teacher = GroundingDinoTeacher(d.model, data.ontology, device="cpu", box_floor=d.box_floor, nms_iou=d.nms_iou,
                                   image_size=d.image_size, max_detections=d.max_detections, adapter=d.adapter)
    dets = [teacher([decode(im.path).pixels])[0] for im in data.train]
    return box_ap(data.train, dets, len(data.ontology.classes))["ap50"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=ba.positive, default=8, help="coco128 photos (the first N by file name)")
    ap.add_argument("--teachers", default=None, help="teachers preset (default: tiny random teachers)")
    ap.add_argument("--size", type=ba.at_least(32), default=128, help="shortest edge, pixels (longest: 1.5x)")
    ap.add_argument("--method", default="full", choices=["lora", "heads", "full"])
    ap.add_argument("--epochs", type=ba.positive, default=100)
    ap.add_argument("--lr", type=ba.positive_float, default=1e-3)
    ap.add_argument("--batch", type=ba.positive, default=2)
    ap.add_argument("--rank", type=ba.positive, default=16)
    ap.add_argument("--threads", type=ba.positive, default=1,
                    help="torch threads (1 is fastest on a busy 2-core machine)")
    args = ap.parse_args()

    import torch
    import yaml

    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import import_coco
    from distillery.labeling.finetune.data import select_training_data
    from distillery.labeling.finetune.run import FinetuneConfig, finetune_detector
    from distillery.labeling.teachers import TeacherPreset
    from distillery.labeling.tiny import write_tiny_teachers

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="finetune-overfit-"))
    gt = json.loads((COCO128 / "annotations.json").read_text())
    images = sorted(gt["images"], key=lambda im: im["file_name"])[: args.n]
    ids = {im["id"] for im in images}
    (work / "gt.json").write_text(json.dumps({"images": images, "categories": gt["categories"], "annotations": [
        a for a in gt["annotations"] if a["image_id"] in ids]}))
    ls, _ = import_coco(LabelStore(work / "store"), str(work / "gt.json"), str(COCO128 / "images"))
    preset = TeacherPreset.load(args.teachers or write_tiny_teachers(work / "teachers")).to_dict()
    preset["detector"].update(image_size={"shortest_edge": args.size, "longest_edge": args.size * 3 // 2},
                              max_detections=100, box_floor=0.01)
    preset["device"] = "cpu"
    (work / "preset.yaml").write_text(yaml.safe_dump(preset))
    data = select_training_data(ls, val_fraction=0.0)

    before = ap50(work / "preset.yaml", data)
    cfg = FinetuneConfig(method=args.method, epochs=args.epochs, lr=args.lr, batch=args.batch, rank=args.rank,
                         val_fraction=0.0, flip=0.0)
    t0 = time.perf_counter()
    rec = finetune_detector(work / "preset.yaml", work / "store", None, work / "ft", cfg, log=lambda line: None)
    seconds = time.perf_counter() - t0
    after = ap50(work / "ft" / "preset.yaml", data)
    losses = [e["train_loss"] for e in rec["epochs"]]
    print(f"{len(data.train)} coco128 photos, {sum(len(im.boxes) for im in data.train)} GT boxes, "
          f"{args.size} px, {args.method}, {args.epochs} epochs x {rec['epochs'][0]['steps']} steps, lr {args.lr}")
    print(f"train loss {losses[0]:.1f} -> {losses[-1]:.1f}; fine-tuning {seconds:.0f} s")
    print(f"detector AP50 on its training images: before {before:.3f}, after {after:.3f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
