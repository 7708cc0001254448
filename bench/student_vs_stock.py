"""The soft-label student side by side with stock ultralytics, on real photos, one run.

    python bench/student_vs_stock.py                   # 16 coco128 photos with a person, 150 epochs, imgsz 320
    python bench/student_vs_stock.py --epochs 20       # quicker

From the coco128 GT, class ``person`` on the first 16 photos (file-name order) that contain
one: imported into a label store (``labels import``; one-hot scores, so the soft-label loss
sees weight 1), then

  ours   ``distillery.student.train.train`` (soft-label trainer, data read from the store), and
  stock  ``ultralytics.YOLO("yolov8n-seg.yaml").train`` on the YOLO-seg export of the same
         label set (``labels export --format yolo-seg``),

both from scratch with the same arguments (mosaic off, seed fixed, no early stopping,
validation on the same 16 photos), then both checkpoints through ``distillery eval`` (COCOeval against the
filtered GT). Prints box / mask mAP50 and mAP50-95 and wall time of each. This checks the
data path (masks aligned with boxes, labels not lost), not generalisation.
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


def person_subset(n: int, out: Path) -> Path:
    gt = json.loads((COCO128 / "annotations.json").read_text())
    person = next(c for c in gt["categories"] if c["name"] == "person")
    with_person = {a["image_id"] for a in gt["annotations"] if a["category_id"] == person["id"]}
    images = sorted((im for im in gt["images"] if im["id"] in with_person), key=lambda im: im["file_name"])[:n]
    ids = {im["id"] for im in images}
    sub = {"images": images, "categories": [person],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in ids and a["category_id"] == person["id"]]}
    path = out / "person16.json"
    path.write_text(json.dumps(sub))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=ba.positive, default=16)
    ap.add_argument("--epochs", type=ba.positive, default=150)
    ap.add_argument("--imgsz", type=ba.imgsz, default=320)
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()

    import yaml
    from ultralytics import YOLO

    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import import_coco
    from distillery.labeling.yolo import export_yolo_seg
    from distillery.student.data import Selection
    from distillery.engine.evaluation import evaluate, load_gt, predict_ultralytics
    from distillery.student.train import train

    work = args.out or Path(tempfile.mkdtemp(prefix="student-vs-stock-"))
    work.mkdir(parents=True, exist_ok=True)
    gt_path = person_subset(args.n, work)
    ls, _ = import_coco(LabelStore(work / "store"), str(gt_path), str(COCO128 / "images"))
    # patience = epochs: no early stop (mAP on 16 photos from scratch stays ~0 for ~100 epochs,
    # which ultralytics' default patience of 100 would end)
    common = dict(epochs=args.epochs, imgsz=args.imgsz, batch=16, mosaic=0.0, seed=0, deterministic=True,
                  plots=False, workers=2, val=True, patience=args.epochs)

    # stock: YOLO-seg export of the same label set, validated on the same photos
    ydir = work / "yolo"
    export_yolo_seg(ls, ydir, val_fraction=0.0)
    data = yaml.safe_load((ydir / "data.yaml").read_text())
    data["val"] = data["train"]
    (ydir / "data.yaml").write_text(yaml.safe_dump(data))
    t = time.perf_counter()
    YOLO("yolov8n-seg.yaml", task="segment").train(data=str(ydir / "data.yaml"), project=str(work), name="stock",
                                                    exist_ok=True, **common)
    t_stock = time.perf_counter() - t

    t = time.perf_counter()
    run = train(work / "store", work / "ours", model="yolov8n-seg.yaml", selection=Selection(val_fraction=0.0),
                val_labelset=ls.id, **common)
    t_ours = time.perf_counter() - t

    gt = load_gt(gt_path)
    paths = [str(COCO128 / "images" / im["file_name"]) for im in gt["images"]]
    rows = {}
    for name, ckpt in (("stock", work / "stock" / "weights" / "best.pt"), ("ours", run / "weights" / "best.pt")):
        rep = evaluate(gt, predict_ultralytics(ckpt, paths, imgsz=args.imgsz), ["person"], image_files=paths)
        rows[name] = rep
    print(f"\n{args.n} photos, class person, yolov8n-seg.yaml from scratch, {args.epochs} epochs, imgsz {args.imgsz}, "
          f"mosaic off, seed 0 (work dir {work})")
    print(f"{'':8}{'box mAP50':>11}{'box mAP50-95':>14}{'mask mAP50':>12}{'mask mAP50-95':>15}{'wall s':>9}")
    for name, wall in (("stock", t_stock), ("ours", t_ours)):
        r = rows[name]
        print(f"{name:8}{r['bbox']['mAP50']:11.3f}{r['bbox']['mAP50-95']:14.3f}{r['segm']['mAP50']:12.3f}"
              f"{r['segm']['mAP50-95']:15.3f}{wall:9.0f}")
    for name in ("stock", "ours"):
        r = rows[name]
        ratio = r["segm"]["mAP50"] / r["bbox"]["mAP50"] if r["bbox"]["mAP50"] else float("nan")
        print(f"{name}: mask/box mAP50 ratio {ratio:.2f}")
    (work / "side_by_side.json").write_text(json.dumps({k: {t: {m: v[t][m] for m in ("mAP50", "mAP50-95")}
                                                          for t in ("bbox", "segm")} for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
