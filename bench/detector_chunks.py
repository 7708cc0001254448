"""Cost of Grounding DINO prompt chunks: one image-backbone pass per image batch vs one per chunk.

    python bench/detector_chunks.py                 # tiny random teacher, 4 coco128 photos in one batch
    python bench/detector_chunks.py --full          # + Grounding DINO-T (Swin-T, BERT-base) at random weights
    python bench/detector_chunks.py --full --full-size 480 --chunks 1,2,4,8

Prints, for 1, 2, 4 and 8 prompt chunks of ~256 tokens each (an ontology of synthetic class
names, "thing number i", split by the labelling code), the cost of one teacher call on the
same images with the image features reused across chunks (the default) and recomputed per
chunk (``reuse_image_features=False``, the plain transformers call), side by side, and the
ratio cost(k)/cost(1) of each. Cost is the process's CPU seconds with one torch thread (the
benchmark machine is shared: CPU time is stable under load, wall time is printed too); the
best of ``--repeats`` runs, the two modes alternating.

It also prints the share of a plain one-chunk call that need run only once per image batch
(the Swin backbone and input projections, which are reused, and the image processor) and
the bound it sets: with share s, k chunks cost at least ``k - (k - 1) * s`` times one chunk
however well the image part is cached, because everything else -- BERT, the encoder (whose
every layer starts with the image-text fusion), the decoder and the post-processing --
depends on the caption.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from distillery.engine.images import decode  # noqa: E402
from distillery.labeling.detector import GroundingDinoTeacher  # noqa: E402
from distillery.labeling.ontology import Ontology, build_chunks  # noqa: E402
import bench_args as ba  # bench/ is on sys.path (the script's folder)  # noqa: E402


class FullSizeTeacher(GroundingDinoTeacher):
    """Grounding DINO-T (transformers' ``GroundingDinoConfig`` defaults: Swin-T, BERT-base, 6+6
    layers, 900 queries) at random weights, built in memory instead of loaded."""

    def load(self, model, revision, adapter):
        from transformers import (
            AutoTokenizer,
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
        )

        from distillery.labeling.tiny import bert_uncased_vocab

        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(str(bert_uncased_vocab().parent))
        return (GroundingDinoProcessor(GroundingDinoImageProcessor(), tok),
                GroundingDinoForObjectDetection(GroundingDinoConfig()))


def ontology_of(chunks: int, tokenizer) -> Ontology:
    """Synthetic class names, enough for ``chunks`` full captions plus a partial one."""
    n = 64
    while True:
        onto = Ontology.from_classes([f"thing number {i}" for i in range(n)])
        if len(build_chunks(onto, tokenizer)) > chunks:
            return onto
        n *= 2


def timed(fn) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call of ``fn``."""
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


@contextmanager
def once_per_batch_time(teacher: GroundingDinoTeacher, mods) -> Iterator[dict]:
    """CPU seconds spent, while the block runs, in ``mods`` (the submodules the image cache
    reuses; forward hooks on them: ``"image"``) and in the image processor (``"pre"``)."""
    spent, start = {"image": 0.0, "pre": 0.0}, {}

    def stop(m, args, out):
        spent["image"] += time.process_time() - start[m]

    hooks = [m.register_forward_pre_hook(lambda m, a: start.__setitem__(m, time.process_time())) for m in mods]
    hooks += [m.register_forward_hook(stop) for m in mods]

    def preprocess(images):
        c = time.process_time()
        out = GroundingDinoTeacher.preprocess(teacher, images)
        spent["pre"] += time.process_time() - c
        return out

    teacher.preprocess = preprocess
    try:
        yield spent
    finally:
        del teacher.preprocess
        for h in hooks:
            h.remove()


def run(name: str, teacher: GroundingDinoTeacher, batches, ks: list[int], repeats: int) -> None:
    chunks = teacher.chunks  # all but the last are full captions (ontology_of)
    tokens = [int(t["input_ids"].shape[1]) for t in teacher._text[: max(ks)]]
    n = sum(len(b) for b in batches)
    h, w = teacher.preprocess(batches[0][:1])["pixel_values"].shape[-2:]
    print(f"\n{name}: {n} images in batches of {len(batches[0])}, model input {h}x{w} (first image); "
          f"chunks of {min(tokens)}-{max(tokens)} tokens", flush=True)
    teacher.use_chunks(chunks[:1])
    teacher(batches[0][:1])  # warm-up
    print(f"{'chunks':>6} | {'reused: CPU s':>13} {'wall s':>7} {'x cost(1)':>9} | "
          f"{'per chunk: CPU s':>16} {'wall s':>7} {'x cost(1)':>9} | speed-up", flush=True)
    cost = {}
    cache = teacher.image_cache
    for k in ks:
        teacher.use_chunks(chunks[:k])
        for _ in range(repeats):  # alternating, so both modes see the same load on the machine
            for mode, c in (("reused", cache), ("plain", None)):
                teacher.image_cache = c
                with once_per_batch_time(teacher, cache.modules.values()) as spent:
                    cpu, wall = timed(lambda: [teacher(b) for b in batches])
                if cpu < cost.get((k, mode), (float("inf"),))[0]:
                    cost[k, mode] = cpu, wall
                    if k == 1 and mode == "plain":
                        share = {key: v / cpu for key, v in spent.items()}
        teacher.image_cache = cache
        (rc, rw), (pc, pw) = cost[k, "reused"], cost[k, "plain"]
        print(f"{k:>6} | {rc:>13.3f} {rw:>7.2f} {rc / cost[ks[0], 'reused'][0]:>9.2f} | "
              f"{pc:>16.3f} {pw:>7.2f} {pc / cost[ks[0], 'plain'][0]:>9.2f} | {pc / rc:.2f}x", flush=True)
    teacher.use_chunks(chunks)
    lo, hi = ks[0], ks[-1]
    print(f"cost({hi})/cost({lo}): reused {cost[hi, 'reused'][0] / cost[lo, 'reused'][0]:.2f}, "
          f"per chunk {cost[hi, 'plain'][0] / cost[lo, 'plain'][0]:.2f}"
          f"{' (goal <= 3)' if (lo, hi) == (1, 8) else ''}", flush=True)
    if 1 in ks:
        s = share["image"] + share["pre"]
        print(f"share of a plain 1-chunk call that runs once per batch: {s:.1%} (Swin + input projections "
              f"{share['image']:.1%}, image processor {share['pre']:.1%}); so cost(8)/cost(1) >= {8 - 7 * s:.2f} "
              f"with the image features reused, >= {8 - 7 * share['pre']:.2f} without", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "coco128" / "images"))
    ap.add_argument("--n", type=ba.positive, default=4, help="photos for the tiny teacher, one batch")
    ap.add_argument("--chunks", type=ba.ascending_counts, default="1,2,4,8",
                    help="prompt-chunk counts, comma-separated, ascending")
    ap.add_argument("--repeats", type=ba.positive, default=3,
                    help="runs per measurement for the tiny teacher (best kept)")
    ap.add_argument("--full", action="store_true", help="also Grounding DINO-T at random weights")
    ap.add_argument("--n-full", type=ba.positive, default=2, help="photos for the full-size model, one per batch")
    ap.add_argument("--full-size", type=ba.at_least(32), default=800,
                    help="full-size model's shortest edge (longest = 1333/800 of it; 800 is the released preset)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ks = args.chunks
    paths = sorted(str(p) for p in Path(args.images).glob("*.jpg"))
    if len(paths) < max(args.n, args.n_full):
        raise SystemExit(f"--images {args.images}: {len(paths)} .jpg files, need {max(args.n, args.n_full)}")
    images = [decode(p).pixels for p in paths[: max(args.n, args.n_full)]]

    from transformers import AutoTokenizer

    from distillery.labeling.tiny import bert_uncased_vocab, write_tiny_teachers
    from distillery.labeling.teachers import TeacherPreset

    onto = ontology_of(max(ks), AutoTokenizer.from_pretrained(str(bert_uncased_vocab().parent)))
    with tempfile.TemporaryDirectory() as tmp:
        d = TeacherPreset.load(write_tiny_teachers(Path(tmp))).detector
        tiny = GroundingDinoTeacher(d.model, onto, device="cpu", image_size=d.image_size,
                                    max_detections=d.max_detections)
        run("tiny random teacher (distillery teachers tiny)", tiny, [images[: args.n]], ks, args.repeats)
    if args.full:
        size = {"shortest_edge": args.full_size, "longest_edge": round(args.full_size * 1333 / 800)}
        full = FullSizeTeacher("gdino-t (in memory)", onto, device="cpu", image_size=size, max_detections=100)
        run("Grounding DINO-T at random weights", full, [[im] for im in images[: args.n_full]], ks, 1)


if __name__ == "__main__":
    main()
