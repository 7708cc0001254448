"""Ragged teacher masks vs training and export time: before / after, side by side, one run.

    python bench/ragged_masks.py                      # 8 coco128 photos, imgsz 160, 3 epochs
    python bench/ragged_masks.py --n 16 --epochs 4

The same N coco128 photos make three label sets in one store: their COCO GT (``labels
import``), and the tiny random teachers' labels (``distillery teachers tiny``, ragged masks
with thousands of parts) made twice by the real label job (``runner="local"``): with SAM's
small-region clean-up off (``segmenter.min_region_area: 0``, the labels before) and at its
default (100 px, after). Printed:

* labelling s/image without and with the clean-up;
* per mask: parts (8-connected components), polygon vertices and conversion time, exact
  outline (``tolerance=0``, the conversion before) vs the 0.5 px Douglas-Peucker default;
* ``labels export --format yolo-seg``: seconds and bytes, before (raw masks, exact polygons)
  vs after (cleaned masks, simplified polygons);
* student epoch seconds (``distillery.student.train.train``, yolov8n-seg from scratch, same
  arguments, mosaic on in every epoch as in all but the last 10 epochs of a real run, no
  validation, first epoch dropped) on the GT set, on the raw teacher set with the data path
  before this change (each mask converted, exactly, every time a sample is loaded: one epoch,
  start-up included), on the raw set with the data path after (converted once per run,
  simplified), on the cleaned set traced at full resolution (stop 15's data path), on the
  cleaned set traced in the frame ultralytics fills polygons in (after:
  ``StoreSegDataset.polygon_scale``), and on the cleaned set with every mask replaced by
  its box (the floor that no mask treatment can beat: the teacher set has more instances than
  the GT); the ratios to GT. Goal: cleaned teacher set / GT <= 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
import bench_args as ba  # bench/ is on sys.path (the script's folder)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
COCO128 = Path(os.environ.get("DISTILLERY_COCO128", ROOT.parent / "shared" / "data" / "coco128"))


def label(store, preset_path: Path, min_region_area: int, paths: list[str], name: str):
    from distillery.engine.config import resolve_config
    from distillery.engine.job import run_label_job
    from distillery.labeling.ontology import Ontology
    from distillery.labeling.teachers import TeacherPreset, labelset_spec, teacher_stages

    preset = TeacherPreset.load(preset_path)
    preset.segmenter.min_region_area = min_region_area
    onto = Ontology.load(resolve_config("ontology", "coco80"))
    ls = store.create(labelset_spec(onto, preset), name=name)
    t = time.perf_counter()
    run_label_job(paths, ls, teacher_stages(preset, onto), runner="local", progress=False)
    return ls, (time.perf_counter() - t) / len(paths)


def mask_stats(ls, limit: int = 40) -> dict:
    """Median parts, exact / simplified vertices and conversion seconds over up to ``limit`` masks."""
    import cv2
    import numpy as np
    from pycocotools import mask as mask_utils

    from distillery.engine.polygons import mask_to_polygon

    masks = [mask_utils.decode(r.masks[k]) for r in ls.iter_records() for k in range(r.num_instances)][:limit]
    out = {"parts": [], "exact": [], "simplified": [], "t_exact": [], "t_simplified": []}
    for m in masks:
        out["parts"].append(cv2.connectedComponents(m, connectivity=8)[0] - 1)
        for key, tol in (("exact", 0.0), ("simplified", None)):
            t = time.perf_counter()
            p = mask_to_polygon(m) if tol is None else mask_to_polygon(m, tol)
            out[f"t_{key}"].append(time.perf_counter() - t)
            out[key].append(len(p))
    return {k: float(np.median(v)) for k, v in out.items()}


def export(ls, out: Path, exact: bool) -> tuple[float, int]:
    """yolo-seg export seconds and bytes of label files; ``exact``: polygons as before (tolerance 0)."""
    import distillery.labeling.yolo as yolo
    from distillery.engine.polygons import mask_to_polygon

    saved = yolo.mask_to_polygon
    if exact:
        yolo.mask_to_polygon = functools.partial(mask_to_polygon, tolerance=0.0)
    try:
        t = time.perf_counter()
        yolo.export_yolo_seg(ls, out, val_fraction=0.0)
        dt = time.perf_counter() - t
    finally:
        yolo.mask_to_polygon = saved
    return dt, sum(p.stat().st_size for p in (out / "labels").rglob("*.txt"))


def legacy_dataset_class():
    """The student's dataset as it was before: no polygons at build time; every sample load
    decodes each mask and converts it, exactly, again (every epoch)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from distillery.engine.polygons import mask_to_polygon
    from distillery.student.data import StoreSegDataset, _box_polygon

    class LegacyStoreSegDataset(StoreSegDataset):
        def get_labels(self):
            t, labels = self.table, []
            for path, (h, w), rows in t.images[self.split]:
                rows = np.asarray(rows, np.int64)
                xyxy = t.boxes[rows] if len(rows) else np.zeros((0, 4), np.float32)
                xywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                                 (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h], 1).astype(np.float32)
                cls = rows.astype(np.float64) if self.split == "train" else t.hard[rows].astype(np.float32)
                labels.append({"im_file": path, "shape": (h, w), "cls": cls.reshape(-1, 1), "bboxes": xywh,
                               "rows": rows, "store_shape": (h, w), "segments": [], "keypoints": None,
                               "normalized": True, "bbox_format": "xywh"})
            return labels

        def update_labels_info(self, label):
            t = self.table
            h, w = label["store_shape"]
            segs = []
            for r in label.pop("rows"):
                seg = _box_polygon(t.boxes[r]) if t.ignore[r] else mask_to_polygon(mask_utils.decode(t.masks[r]), 0.0)
                segs.append((seg if len(seg) else _box_polygon(t.boxes[r])) / np.array([w, h], np.float32))
            label["segments"] = segs
            return super().update_labels_info(label)

    return LegacyStoreSegDataset


def full_size_dataset_class():
    """The student's dataset as at stop 15: masks traced at their full resolution (0.5 px),
    not in the frame ultralytics fills polygons in."""
    from distillery.student.data import StoreSegDataset

    class FullSizeStoreSegDataset(StoreSegDataset):
        def polygon_scale(self, h, w):
            return 1.0

    return FullSizeStoreSegDataset


def boxes_dataset_class():
    """The student's dataset with every mask replaced by its box outline."""
    from distillery.student.data import StoreSegDataset, _box_polygon

    class BoxStoreSegDataset(StoreSegDataset):
        def segment(self, row, scale=1.0):
            return _box_polygon(self.table.boxes[row])

    return BoxStoreSegDataset


def epoch_seconds(store_root: Path, ls_id: str, val_id: str, out: Path, dataset_class, **common) -> list[float]:
    """Seconds of each epoch after the first, or of the only one (``val_id``: the GT set, which
    ultralytics' validation loader is built from even with ``val=False``)."""
    import distillery.student.train as st
    from distillery.student.data import Selection

    marks = []
    cbs = {"on_train_epoch_start": lambda tr: marks.append(time.perf_counter()),
           "on_train_epoch_end": lambda tr: marks.append(time.perf_counter())}
    saved = st.StoreSegDataset
    st.StoreSegDataset = dataset_class or saved
    try:
        st.train(store_root, out, model="yolov8n-seg.yaml", labelset=ls_id,
                 selection=Selection(val_fraction=0.0, min_score=0.0, ignore_min_score=0.0), val_labelset=val_id,
                 callbacks=cbs, **common)
    finally:
        st.StoreSegDataset = saved
    times = [b - a for a, b in zip(marks[0::2], marks[1::2])]
    return times[1:] or times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=ba.positive, default=8, help="coco128 photos")
    ap.add_argument("--epochs", type=ba.at_least(2), default=3, help="epochs per run (the first is dropped)")
    ap.add_argument("--legacy-epochs", type=ba.non_negative, default=1,
                    help="epochs of the slow before-run (0: skip it)")
    ap.add_argument("--imgsz", type=ba.imgsz, default=160)
    ap.add_argument("--workers", type=ba.non_negative, default=0, help="dataloader workers (0: loading counts in full)")
    args = ap.parse_args()

    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import import_coco
    from distillery.labeling.tiny import write_tiny_teachers

    work = Path(tempfile.mkdtemp(prefix="ragged-masks-"))
    gt = json.loads((COCO128 / "annotations.json").read_text())
    images = sorted(gt["images"], key=lambda im: im["file_name"])[: args.n]
    ids = {im["id"] for im in images}
    (work / "gt.json").write_text(json.dumps({"images": images, "categories": gt["categories"],
                                              "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}))
    store = LabelStore(work / "store")
    gt_ls, _ = import_coco(store, str(work / "gt.json"), str(COCO128 / "images"), name="gt")
    preset = write_tiny_teachers(work / "teachers")
    paths = [str(COCO128 / "images" / im["file_name"]) for im in images]
    raw, t_raw = label(store, preset, 0, paths, "tiny-raw")
    clean, t_clean = label(store, preset, 100, paths, "tiny-clean")
    n_inst = {k: ls.counts().instances for k, ls in (("gt", gt_ls), ("raw", raw), ("clean", clean))}

    print(f"\n{args.n} coco128 photos, tiny random teachers, imgsz {args.imgsz}, batch 8, workers {args.workers}; "
          f"instances GT {n_inst['gt']}, teacher raw {n_inst['raw']}, cleaned {n_inst['clean']}")
    print(f"labelling          raw {t_raw:6.2f} s/image | with clean-up (min_region_area 100) {t_clean:6.2f} s/image "
          f"({t_clean / t_raw:.2f}x)", flush=True)
    print("per mask (medians)  parts | vertices exact -> 0.5 px | seconds exact -> 0.5 px")
    for k, ls in (("GT", gt_ls), ("teacher raw", raw), ("teacher cleaned", clean)):
        s = mask_stats(ls)
        print(f"  {k:16s} {s['parts']:7.0f} | {s['exact']:8.0f} -> {s['simplified']:7.0f} "
              f"({s['exact'] / max(s['simplified'], 1):4.1f}x) | {s['t_exact']:.4f} -> {s['t_simplified']:.4f}", flush=True)
    ex_before = export(raw, work / "yolo-before", exact=True)
    ex_after = export(clean, work / "yolo-after", exact=False)
    print(f"yolo-seg export    before {ex_before[0]:7.1f} s {ex_before[1] / 1e6:8.1f} MB | after {ex_after[0]:6.1f} s "
          f"{ex_after[1] / 1e6:7.2f} MB  ({ex_before[0] / ex_after[0]:.0f}x faster, {ex_before[1] / ex_after[1]:.0f}x "
          "smaller)", flush=True)

    common = dict(epochs=args.epochs, imgsz=args.imgsz, batch=8, seed=0, plots=False, val=False,
                  workers=args.workers, exist_ok=True, close_mosaic=0)
    runs = {}
    for name, ls, cls in (("GT (after)", gt_ls, None),
                          *([("raw teacher set, data path before", raw, legacy_dataset_class())] if args.legacy_epochs else []),
                          ("raw teacher set, data path after", raw, None),
                          ("cleaned teacher set, traced at full size", clean, full_size_dataset_class()),
                          ("cleaned teacher set (after)", clean, None),
                          ("cleaned teacher set, masks as boxes", clean, boxes_dataset_class())):
        kw = {**common, "epochs": args.legacy_epochs} if name.endswith("before") else common
        runs[name] = epoch_seconds(work / "store", ls.id, gt_ls.id, work / f"run-{len(runs)}", cls, **kw)
        print(f"  {name}: {', '.join(f'{t:.1f}' for t in runs[name])} s", flush=True)
    g = statistics.median(runs["GT (after)"])
    print(f"\n{args.n} coco128 photos, imgsz {args.imgsz}: student epoch seconds (median of the epochs after the "
          "first; ratio to GT)")
    for name, ts in runs.items():
        m = statistics.median(ts)
        print(f"  {name:42s} {m:7.2f} s  {m / g:6.2f}x   (epochs: {', '.join(f'{t:.1f}' for t in ts)})")
    print(f"goal: cleaned teacher set / GT <= 2.00 -> {statistics.median(runs['cleaned teacher set (after)']) / g:.2f}")


if __name__ == "__main__":
    main()
