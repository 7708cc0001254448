"""`curate sync` cost vs a plain `fo.Dataset.add_samples` of the same samples, same run.

    python bench/curate_sync.py                  # 1,000 images x 10 instances, then 100 new
    python bench/curate_sync.py --n 200 --new 50 # quicker

Builds a label store of synthetic images (smooth random colour fields, 320x240 PNG) with
``--instances`` instances each (random boxes, elliptical masks, soft scores over 20
classes), then times, each into a fresh throwaway dataset:

  plain   ``add_samples`` of the very samples sync makes (built beforehand, not timed);
  sync    first ``curate sync`` (store read, RLE decode, mask crops, signals, pHash,
          near-duplicate groups, saved views) with and without pHash;
  incr    ``--new`` more images stored, then sync again (adds only those);
  noop    sync again with nothing new.

Prints seconds per 1,000 images and the ratios sync / plain (first and incremental, per
image). FiftyOne's MongoDB lives in a temporary directory unless FIFTYONE_DATABASE_DIR is set.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TMP = Path(tempfile.mkdtemp(prefix="curate-bench-"))
os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(TMP / "db"))
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from distillery.engine.images import content_id  # noqa: E402
from distillery.engine.record import LabelRecord  # noqa: E402
from distillery.engine.store import LabelStore  # noqa: E402

W, H, C = 320, 240, 20


def make_record(path: Path, rng, k: int) -> LabelRecord:
    Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((W, H), Image.BILINEAR).save(path)
    xy = rng.uniform(0, [W - 20, H - 20], (k, 2))
    wh = rng.uniform(10, [W / 3, H / 3], (k, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [W, H])], 1).astype(np.float32)
    yy, xx = np.mgrid[:H, :W]
    masks = []
    for x0, y0, x1, y1 in boxes:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
        masks.append(mask_utils.encode(np.asfortranarray(m)))
    scores = rng.dirichlet(np.full(C, 0.3), k).astype(np.float32)
    return LabelRecord(image_id=content_id(path.read_bytes()), path=str(path), width=W, height=H, num_classes=C,
                       boxes=boxes, scores=scores, box_score=scores.max(1), masks=masks,
                       mask_score=rng.uniform(0.5, 1, k).astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="images in the first sync")
    ap.add_argument("--new", type=int, default=100, help="images added before the incremental sync")
    ap.add_argument("--instances", type=int, default=10)
    args = ap.parse_args()

    import fiftyone as fo

    from distillery.labeling.curation.config import CurationConfig
    from distillery.labeling.curation.samples import record_to_sample
    from distillery.labeling.curation.sync import sync

    rng = np.random.default_rng(0)
    (TMP / "img").mkdir()
    store = LabelStore(TMP / "store")
    ls = store.create({"ontology": {"classes": [f"class{i}" for i in range(C)]}, "bench": "curate_sync"})
    t = time.perf_counter()
    with ls.writer(shard_size=256) as w:
        for i in range(args.n):
            w.add(make_record(TMP / "img" / f"{i:06d}.png", rng, args.instances).to_row())
    print(f"store: {args.n} images x {args.instances} instances written in {time.perf_counter() - t:.1f} s")

    names = []

    def fresh() -> str:
        names.append(f"bench-{uuid.uuid4().hex[:8]}")
        return names[-1]

    try:
        cfg = CurationConfig()
        samples = [record_to_sample(r, ls.classes, cfg, "x:0", with_phash=False) for r in ls.iter_records()]
        ds = fo.Dataset(fresh())
        t = time.perf_counter()
        ds.add_samples(samples, progress=False, dynamic=True)
        plain = time.perf_counter() - t

        first_nohash = sync(ls, fresh(), cfg, with_phash=False, progress=False).seconds
        name = fresh()
        first = sync(ls, name, cfg, progress=False).seconds
        with ls.writer() as w:
            for i in range(args.n, args.n + args.new):
                w.add(make_record(TMP / "img" / f"{i:06d}.png", rng, args.instances).to_row())
        s = sync(ls, name, cfg, progress=False)
        assert s.added == args.new and s.unchanged == args.n, s
        incr = s.seconds
        noop = sync(ls, name, cfg, progress=False)
        assert noop.added == 0 and len(fo.load_dataset(name)) == args.n + args.new

        per_k = 1000.0 / args.n
        print(f"plain add_samples        {plain * per_k:7.2f} s / 1000 images")
        print(f"sync, first, no pHash    {first_nohash * per_k:7.2f} s / 1000 images   ratio {first_nohash / plain:.2f}")
        print(f"sync, first, with pHash  {first * per_k:7.2f} s / 1000 images   ratio {first / plain:.2f}")
        incr_per_img, plain_per_img = incr / args.new, plain / args.n
        print(f"sync, +{args.new} new images     {incr:7.2f} s ({incr_per_img * 1000:.2f} s / 1000 new)   "
              f"ratio per image {incr_per_img / plain_per_img:.2f}")
        print(f"sync, nothing new        {noop.seconds:7.2f} s for {args.n + args.new} images")
    finally:
        for n in names:
            if fo.dataset_exists(n):
                fo.delete_dataset(n)


if __name__ == "__main__":
    main()
