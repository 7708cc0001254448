"""What each added class costs the SAM 3 teacher (``teacher.kind: sam3``), in one run.

    python bench/sam3_classes.py                          # tiny and full size, 1-16 classes, 2 photos
    python bench/sam3_classes.py --sizes tiny --rounds 3  # tiny only, best of 3
    python bench/sam3_classes.py --device cuda --precision bf16

SAM 3 reads one text prompt per forward, so an ontology of C classes (one prompt each) costs one
image-encoder pass per image batch plus C passes of the prompt-conditioned part (DETR encoder and
decoder, mask decoder) and the post-processing of every candidate. For each size (``tiny``: the
width-32 test teacher; ``full``: ``Sam3Config()``'s architecture, 840M parameters; both at random
weights, written by :func:`distillery.labeling.tiny_grounded.write_tiny_sam3` and loaded by the real
``from_pretrained`` code), on the same coco128 photos in one batch, this prints:

* seconds per image of ``Sam3Teacher.__call__`` for 1, 2, 4, 8, 16 classes (best of ``--rounds``,
  after one warm-up call), and the ratio to 1 class;
* the image encoder alone (``Sam3Model.get_vision_features`` on the preprocessed batch, timed
  beside every class count, the best kept), seconds per image: the part paid once whatever the
  class count;
* the least-squares slope of seconds per image over the class count: the cost of one more class.

Random weights score every query about 0.25, so every query is a candidate; the preset caps
instances at 20 per image (``max_detections``, as the tiny presets do). With real weights the
presence token keeps absent classes' candidates near zero, so the post-processing share is lower.
The machine is shared: the ratios, measured side by side in one run, are what matter.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
import bench_args as ba  # bench/ is on sys.path (the script's folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
COCO128 = Path(os.environ.get("DISTILLERY_COCO128", ROOT.parent / "shared" / "data" / "coco128"))
#: coco128 photos: 640x480 with 8 instances, 640x426 with 2 giraffes
PHOTOS = ("000000000009.jpg", "000000000025.jpg")


def best_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(size: str, work: Path, counts: list[int], rounds: int, device: str, precision: str, photos: int) -> dict:
    import numpy as np
    import torch

    from distillery.engine.images import decode
    from distillery.labeling.ontology import Ontology
    from distillery.labeling.sam3 import Sam3Teacher
    from distillery.labeling.tiny_grounded import write_tiny_sam3

    coco = [c for c in ("person", "car", "dog", "bicycle", "bus", "cup", "chair", "bird", "giraffe", "truck",
                        "boat", "horse", "sheep", "cow", "bottle", "laptop")]
    t = time.perf_counter()
    folder = write_tiny_sam3(work / f"sam3-{size}", size=size)
    written = time.perf_counter() - t
    t = time.perf_counter()
    teacher = Sam3Teacher(str(folder), Ontology.from_classes(coco[:1]), device=device, precision=precision,
                          max_detections=20)
    loaded = time.perf_counter() - t
    ims = [decode(str(COCO128 / "images" / p)).pixels for p in (PHOTOS * photos)[:photos]]
    n = len(ims)
    teacher(ims)  # warm-up: allocator, kernels, lazy imports

    def encode():
        with torch.inference_mode():
            teacher.model.get_vision_features(pixel_values=teacher.preprocess(ims)["pixel_values"])
        if teacher.device.type == "cuda":
            torch.cuda.synchronize()

    def label():
        teacher(ims)
        if teacher.device.type == "cuda":
            torch.cuda.synchronize()

    per_image, encoder = {}, float("inf")
    for c in counts:
        teacher.use_ontology(Ontology.from_classes(coco[:c]))
        encoder = min(encoder, best_time(encode, rounds) / n)  # beside every count: the least-loaded moment
        per_image[c] = best_time(label, rounds) / n
        print(f"  {size:<5} {c:>2} classes: {per_image[c]:8.3f} s/img  ({per_image[c] / per_image[counts[0]]:.2f}x "
              f"{counts[0]} class)", flush=True)
    slope = float(np.polyfit(counts, [per_image[c] for c in counts], 1)[0])
    return {"written": written, "loaded": loaded, "encoder": encoder, "per_image": per_image, "slope": slope,
            "params": sum(p.numel() for p in teacher.model.parameters()), "images": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,full")
    ap.add_argument("--classes", default="1,2,4,8,16", help="class counts (at most 16)")
    ap.add_argument("--photos", type=ba.positive, default=2, help="coco128 photos in the batch")
    ap.add_argument("--rounds", type=ba.positive, default=1, help="timed calls per class count; the best is kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=ba.non_negative, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    counts = sorted(int(c) for c in args.classes.split(","))
    print(f"sam3_classes: {args.device} {args.precision}, {torch.get_num_threads()} torch threads, "
          f"{args.photos} coco128 photos per batch, best of {args.rounds}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="sam3-bench-") as tmp:
        for size in args.sizes.split(","):
            results[size] = measure(size, Path(tmp), counts, args.rounds, args.device, args.precision, args.photos)
    print("\n| size | parameters | image encoder s/img | " + " | ".join(f"{c} cls s/img" for c in counts)
          + " | s/img per added class | " + f"{counts[-1]} cls / {counts[0]} cls |")
    print("| --- " * (5 + len(counts)) + "|")
    for size, r in results.items():
        p = r["per_image"]
        print(f"| {size} | {r['params'] / 1e6:.1f}M | {r['encoder']:.3f} | "
              + " | ".join(f"{p[c]:.3f}" for c in counts)
              + f" | {r['slope']:.3f} | {p[counts[-1]] / p[counts[0]]:.2f}x |")
    for size, r in results.items():
        print(f"{size}: written in {r['written']:.0f} s, loaded in {r['loaded']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
