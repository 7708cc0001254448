"""Seconds per epoch of the soft-label trainer vs stock ultralytics on the same data, one run.

    python bench/train_overhead.py                    # 32 coco128 photos, imgsz 320, 3 epochs each
    python bench/train_overhead.py --n 64 --epochs 5

The coco128 GT (all 80 classes) on the first N photos is imported into a label store;
stock ultralytics trains on its YOLO-seg export, the soft-label trainer on the store (soft
targets, weights and ignore machinery active: crowds become ignore regions). Same model
(yolov8n-seg.yaml from scratch), same arguments, no validation between epochs. The first
epoch of each is dropped (dataloader start-up); the runs alternate stock / ours ``--rounds``
times; printed: the ratio of the medians of all epoch times, and the ratio within each round
(back-to-back runs, less exposed to a machine whose load changes). Target: <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
import bench_args as ba  # bench/ is on sys.path (the script's folder)

ROOT = Path(__file__).resolve().parent.parent
COCO128 = Path(os.environ.get("DISTILLERY_COCO128", ROOT.parent / "shared" / "data" / "coco128"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=ba.positive, default=32)
    ap.add_argument("--epochs", type=ba.positive, default=3)
    ap.add_argument("--imgsz", type=ba.imgsz, default=320)
    ap.add_argument("--rounds", type=ba.positive, default=2)
    args = ap.parse_args()

    import yaml
    from ultralytics import YOLO

    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import import_coco
    from distillery.labeling.yolo import export_yolo_seg
    from distillery.student.data import Selection
    from distillery.student.train import train

    work = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    gt = json.loads((COCO128 / "annotations.json").read_text())
    images = sorted(gt["images"], key=lambda im: im["file_name"])[: args.n]
    ids = {im["id"] for im in images}
    sub = {"images": images, "categories": gt["categories"],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
    (work / "gt.json").write_text(json.dumps(sub))
    ls, _ = import_coco(LabelStore(work / "store"), str(work / "gt.json"), str(COCO128 / "images"))
    export_yolo_seg(ls, work / "yolo", val_fraction=0.0)
    data = yaml.safe_load((work / "yolo" / "data.yaml").read_text())
    data["val"] = data["train"]
    (work / "yolo" / "data.yaml").write_text(yaml.safe_dump(data))
    common = dict(epochs=args.epochs, imgsz=args.imgsz, batch=16, seed=0, plots=False, val=False, workers=2)

    def epoch_times():
        marks = []
        return marks, {"on_train_epoch_start": lambda tr: marks.append(time.perf_counter()),
                       "on_train_epoch_end": lambda tr: marks.append(time.perf_counter())}

    times = {"stock": [], "ours": []}
    paired = []
    for rnd in range(args.rounds):
        marks, cbs = epoch_times()
        model = YOLO("yolov8n-seg.yaml", task="segment")
        for ev, fn in cbs.items():
            model.add_callback(ev, fn)
        model.train(data=str(work / "yolo" / "data.yaml"), project=str(work), name=f"stock{rnd}", exist_ok=True, **common)
        times["stock"] += [b - a for a, b in zip(marks[2::2], marks[3::2])]
        marks, cbs = epoch_times()
        train(work / "store", work / f"ours{rnd}", model="yolov8n-seg.yaml", selection=Selection(val_fraction=0.0),
              val_labelset=ls.id, callbacks=cbs, **common)
        ours = [b - a for a, b in zip(marks[2::2], marks[3::2])]
        times["ours"] += ours
        stock = times["stock"][-len(ours):]
        paired.append(statistics.median(ours) / statistics.median(stock))
    s, o = statistics.median(times["stock"]), statistics.median(times["ours"])
    print(f"\n{args.n} photos, 80 classes, imgsz {args.imgsz}, {args.epochs} epochs x {args.rounds} rounds "
          f"(first epoch of each run dropped)")
    print(f"stock ultralytics   {s:7.2f} s/epoch  (epochs: {', '.join(f'{t:.1f}' for t in times['stock'])})")
    print(f"soft-label trainer  {o:7.2f} s/epoch  (epochs: {', '.join(f'{t:.1f}' for t in times['ours'])})")
    print(f"ratio ours/stock    {o / s:7.2f}  (medians of all epochs)")
    print(f"ratio per round     {', '.join(f'{r:.2f}' for r in paired)}  (each round's runs back to back; "
          f"median {statistics.median(paired):.2f}, target <= 1.10)")


if __name__ == "__main__":
    main()
