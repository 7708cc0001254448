"""`curate sync` cost vs a plain `fo.Dataset.add_samples` of the same samples, same run.

    python bench/curate_sync.py                  # 1,000 images x 10 instances, then 100 new
    python bench/curate_sync.py --n 200 --new 50 # quicker

Builds a label store of synthetic images (smooth random colour fields, 320x240 PNG) with
``--instances`` instances each (random boxes, elliptical masks, soft scores over 20
classes), then times, each into a fresh throwaway dataset:

  plain   ``add_samples`` of the very samples sync makes (built beforehand, timed apart as
          ``build``: FiftyOne ``Sample``/``Detection`` documents, the part of the work that
          is FiftyOne's object construction):
          the N first images into an empty dataset, then the ``--new`` next ones into it;
  sync    first ``curate sync`` (store read, RLE decode, mask crops, signals, pHash,
          near-duplicate groups, saved views) with and without pHash;
  incr    ``--new`` more images stored, then sync again (adds only those);
  noop    sync again with nothing new.

Each is run ``--repeat`` times and the fastest run counts (other jobs on the machine only
ever slow a run down). Prints seconds per 1,000 images, wall and CPU (this process and
FiftyOne's mongod), and on the last line both ratios side by side: first sync / plain add of
the N images, and incremental sync / plain add of the same new images into the N-image
dataset (goal: both <= 1.5); then both against building the same samples plus adding them,
which is what sync cannot avoid doing. FiftyOne's MongoDB lives in a temporary directory unless
FIFTYONE_DATABASE_DIR is set.
"""

from __future__ import annotations

import argparse
import atexit
import os
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from distillery.engine.images import content_id  # noqa: E402
from distillery.engine.record import LabelRecord  # noqa: E402
from distillery.engine.store import LabelStore  # noqa: E402
import bench_args as ba  # bench/ is on sys.path (the script's folder)  # noqa: E402

W, H, C = 320, 240, 20


def make_record(path: Path, rng, k: int) -> LabelRecord:
    Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((W, H), Image.BILINEAR).save(path)
    xy = rng.uniform(0, [W - 20, H - 20], (k, 2))
    wh = rng.uniform(10, [W / 3, H / 3], (k, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [W, H])], 1).astype(np.float32)
    masks = []
    for x0, y0, x1, y1 in boxes:  # the ellipse inscribed in the box (pixel centres at integers)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        c0, r0, c1, r1 = int(x0), int(y0), min(W, int(x1) + 2), min(H, int(y1) + 2)
        yy, xx = np.ogrid[r0:r1, c0:c1]
        m = np.zeros((H, W), np.uint8, order="F")
        m[r0:r1, c0:c1] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        masks.append(mask_utils.encode(m))
    scores = rng.dirichlet(np.full(C, 0.3), k).astype(np.float32)
    return LabelRecord(image_id=content_id(path.read_bytes()), path=str(path), width=W, height=H, num_classes=C,
                       boxes=boxes, scores=scores, box_score=scores.max(1), masks=masks,
                       mask_score=rng.uniform(0.5, 1, k).astype(np.float32))


class Clock:
    """Wall seconds, and CPU seconds of this process (all threads) plus FiftyOne's ``mongod``
    when it is our child (``psutil``): the CPU figure is what a run costs the machine, and
    stays comparable when other jobs share the cores (wall time then includes waiting)."""

    def __init__(self):
        import psutil

        import fiftyone as fo

        fo.list_datasets()  # starts FiftyOne's database service, if it is ours
        self.mongod = [p for p in psutil.Process().children(recursive=True) if "mongod" in p.name()]

    def now(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time() + sum(sum(p.cpu_times()[:2]) for p in self.mongod)

    def time(self, fn) -> tuple[float, float, object]:
        w0, c0 = self.now()
        out = fn()
        w1, c1 = self.now()
        return w1 - w0, c1 - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    ap.add_argument("--n", type=ba.positive, default=1000, help="images in the first sync")
    ap.add_argument("--new", type=ba.positive, default=100, help="images added before the incremental sync")
    ap.add_argument("--instances", type=ba.positive, default=10)
    ap.add_argument("--repeat", type=ba.positive, default=3, help="runs of each measurement; the fastest counts")
    args = ap.parse_args()
    TMP = Path(tempfile.mkdtemp(prefix="curate-bench-"))  # images, store and (by default) FiftyOne's database
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(TMP / "db"))
    # not removed at exit: FiftyOne's mongod outlives this process by a moment and aborts if its files go
    atexit.register(print, f"(work dir {TMP}: images, label store and database; delete it when done)")

    import fiftyone as fo
    from fiftyone import ViewField as F

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

    def drop(name: str) -> None:
        fo.delete_dataset(name)
        names.remove(name)

    clock = Clock()
    cfg = CurationConfig()
    best: dict[str, tuple[float, float]] = {}

    def keep(key: str, wall: float, cpu: float) -> None:  # fastest run, wall and CPU separately
        w, c = best.get(key, (float("inf"), float("inf")))
        best[key] = (min(w, wall), min(c, cpu))

    def samples_of(paths=None):  # the samples sync makes, without pHash (timed apart: build)
        return [record_to_sample(r, ls.classes, cfg, "x:0", with_phash=False)
                for r in ls.iter_records() if paths is None or r.path in paths]

    try:
        for r in range(args.repeat):  # first syncs (a fresh dataset each)
            wall, cpu, samples = clock.time(samples_of)
            keep("build", wall, cpu)
            plain_ds = fo.Dataset(fresh())
            keep("plain", *clock.time(lambda smp=samples: plain_ds.add_samples(smp, progress=False, dynamic=True))[:2])
            del samples
            if r < args.repeat - 1:
                drop(plain_ds.name)
            name = fresh()
            keep("first_nohash", *clock.time(lambda: sync(ls, name, cfg, with_phash=False, progress=False))[:2])
            drop(name)
            name = fresh()
            keep("first", *clock.time(lambda: sync(ls, name, cfg, progress=False))[:2])
            if r < args.repeat - 1:
                drop(name)

        new_paths = {str(TMP / "img" / f"{i:06d}.png") for i in range(args.n, args.n + args.new)}
        with ls.writer() as w:
            for p in sorted(new_paths):
                w.add(make_record(Path(p), rng, args.instances).to_row())
        ds = fo.load_dataset(name)
        for r in range(args.repeat):  # the same new images added to the N-image datasets, then taken out again
            wall, cpu, samples = clock.time(lambda: samples_of(new_paths))
            keep("build_incr", wall, cpu)
            keep("plain_incr", *clock.time(lambda smp=samples: plain_ds.add_samples(smp, progress=False,
                                                                                          dynamic=True))[:2])
            del samples
            wall, cpu, s = clock.time(lambda: sync(ls, name, cfg, progress=False))
            if not (s.added == args.new and s.unchanged == args.n):
                raise SystemExit(f"incremental sync did not add exactly the {args.new} new images: {s}")
            keep("incr", wall, cpu)
            if r < args.repeat - 1:
                plain_ds.delete_samples(plain_ds.match(F("filepath").is_in(sorted(new_paths))))
                ds.delete_samples(ds.match(F("filepath").is_in(sorted(new_paths))))
        noop = sync(ls, name, cfg, progress=False)
        if noop.added or len(ds) != args.n + args.new:
            raise SystemExit(f"a sync with nothing new changed the dataset: {noop}")

        def line(label, key, n, base=None):
            w, c = best[key]
            text = f"{label:34s} {w * 1000 / n:7.2f} s / 1000 images (CPU {c * 1000 / n:6.2f} s)"
            if base:
                text += f"   ratio {w / best[base][0]:.2f} (CPU {c / best[base][1]:.2f})"
            print(text)

        print(f"fastest of {args.repeat} runs each; CPU = this process + FiftyOne's mongod")
        line(f"plain add_samples, {args.n} images", "plain", args.n)
        line(f"plain add_samples, +{args.new} to {args.n}", "plain_incr", args.new)
        line("sync, first, no pHash", "first_nohash", args.n, "plain")
        line("sync, first, with pHash", "first", args.n, "plain")
        line(f"sync, +{args.new} new images", "incr", args.new, "plain_incr")
        print(f"sync, nothing new                  {noop.seconds:7.2f} s for {args.n + args.new} images")
        (fw, fc), (iw, ic) = best["first"], best["incr"]
        (pw, pc), (qw, qc) = best["plain"], best["plain_incr"]
        print(f"sync / add_samples (goal <= 1.5): first {fw / pw:.2f} | incremental {iw / qw:.2f}   "
              f"(CPU: first {fc / pc:.2f} | incremental {ic / qc:.2f})")
        (bw, _), (cw, _) = best["build"], best["build_incr"]
        print(f"sync with pHash / (building the same fo.Samples, no pHash, + add_samples): first {fw / (pw + bw):.2f} | incremental "
              f"{iw / (qw + cw):.2f}   (building them alone: {bw * 1000 / args.n:.2f} s / 1000 images, FiftyOne's "
              "Detection documents with Distillery's attributes)")
    finally:
        for n in names:
            if fo.dataset_exists(n):
                fo.delete_dataset(n)


if __name__ == "__main__":
    main()
