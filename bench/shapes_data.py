"""Synthetic photos of three shape classes with exact COCO masks: a task a YOLOv8n-seg trained
from scratch on a CPU learns to a high mask mAP in minutes, so that a quantization's mAP drop is
measured on a model that works (no pretrained weights can be downloaded here).

    from shapes_data import write_shapes    # bench/ is on sys.path when a bench script runs
    gt_json, images_dir = write_shapes(out_dir, n=96, seed=0)

Each image (``size`` x ``size`` JPEG, quality 95) has a smooth random colour background with
fine noise and 1-4 shapes (``disk``, ``box``: a rotated rectangle, ``triangle``), 40-140 px
across at 320, each a random colour. Later shapes occlude earlier ones; a GT mask is what stays
visible (RLE, pycocotools), and an instance with under 150 visible pixels is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

CLASSES = ["disk", "box", "triangle"]


def write_shapes(out: Path, n: int, seed: int = 0, size: int = 320, prefix: str = "shape") -> tuple[Path, Path]:
    """Write ``n`` images to ``out/images`` and their COCO GT to ``out/annotations.json``;
    returns both paths."""
    import cv2
    import numpy as np
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        grid = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
        img = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 8, (size, size, 3))
        owner = np.full((size, size), -1, np.int32)
        kinds = []
        for k in range(int(rng.integers(1, 5))):
            cls = int(rng.integers(0, len(CLASSES)))
            r = rng.uniform(20, 70) * size / 320
            cx, cy = rng.uniform(r, size - r, 2)
            color = tuple(float(c) for c in rng.uniform(0, 255, 3))
            m = np.zeros((size, size), np.uint8)
            if cls == 0:
                cv2.ellipse(m, (int(cx), int(cy)), (int(r), int(r * rng.uniform(0.6, 1.0))), float(rng.uniform(0, 180)),
                            0, 360, 1, -1)
            elif cls == 1:
                pts = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.5, 1.0)), float(rng.uniform(0, 90))))
                cv2.fillPoly(m, [pts.astype(np.int32)], 1)
            else:
                a = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
                pts = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
                cv2.fillPoly(m, [pts.astype(np.int32)], 1)
            img[m > 0] = color
            owner[m > 0] = k
            kinds.append(cls)
        name = f"{prefix}{i:04d}.jpg"
        cv2.imwrite(str(images_dir / name), np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for k, cls in enumerate(kinds):
            vis = np.asfortranarray((owner == k).astype(np.uint8))
            if vis.sum() < 150:
                continue
            rle = mask_utils.encode(vis)
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cls + 1, "iscrowd": 0,
                         "bbox": [x, y, w, h], "area": float(vis.sum()),
                         "segmentation": {"size": [size, size], "counts": rle["counts"].decode()}})
    gt = out / "annotations.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns,
                              "categories": [{"id": j + 1, "name": c} for j, c in enumerate(CLASSES)]}))
    return gt, images_dir
