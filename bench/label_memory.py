"""Memory of a `label` job at 1k vs 10k images: RSS of the driver and of each Ray actor; one run.

    python bench/label_memory.py                   # 10,000 images on Ray, RSS sampled every 1,000
    python bench/label_memory.py --runner local    # the same in this process
    python bench/label_memory.py --n 2000 --every 500

One job labels N synthetic images (64x48 JPEG noise, each unique, so none is a duplicate) with
the tiny random teachers at a small input size, so that it runs in minutes: Grounding DINO
resized to 96 px (``detector.image_size``; its 100 queries need that many encoder tokens), at
most 4 boxes per image, and SAM with the same modules at a 64 px input instead of 1024
(:class:`SmallSam`, built through :class:`distillery.labeling.segmenter.SamTeacher`). The
models' cost is not what is measured here: what grows with the number of images is. With
``--runner local`` everything runs in the driver, at ``--threads`` torch threads (default 1:
the fastest for these tiny models on the shared 2-core machine).

Every ``--every`` images (``on_row`` of :func:`run_label_job`) it samples the resident set size
of the driver and of every process of the local Ray cluster this job started (psutil, the
driver's descendants; actors by their process title, e.g. ``ray::MapWorker(MapBatches(DetectStage))``),
and prints the table, then RSS at N / RSS at ``--every`` per process (goal <= 1.1).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from distillery.engine.job import run_label_job  # noqa: E402
from distillery.engine.store import LabelStore  # noqa: E402
from distillery.labeling.ontology import Ontology  # noqa: E402
from distillery.labeling.segmenter import SamTeacher  # noqa: E402
from distillery.labeling.teachers import SegmentStage, TeacherPreset, labelset_spec, teacher_stages  # noqa: E402
from distillery.labeling.tiny import write_tiny_teachers  # noqa: E402
import bench_args as ba  # bench/ is on sys.path (the script's folder)  # noqa: E402

MB = 1 << 20


def small_sam(img_size: int = 64):
    """SAM's modules (segment_anything) at a ``img_size`` input, width 16, random weights."""
    import functools

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    dim, patch = 16, 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=1, embed_dim=dim, img_size=img_size, mlp_ratio=2, num_heads=1, patch_size=patch, qkv_bias=True,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=False, global_attn_indexes=[0],
            window_size=0, out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img_size // patch,) * 2,
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1,
                                 iou_head_hidden_dim=dim,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=1)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()


class SmallSam(SamTeacher):
    """:class:`SamTeacher` (its embed, decode, post-processing and RLE code) on :func:`small_sam`."""

    def __init__(self, *args, **kwargs) -> None:
        from segment_anything import SamPredictor

        super().__init__(*args, **kwargs)
        self.sam = small_sam().to(self.device)
        self.predictor = SamPredictor(self.sam)


class SmallSegmentStage(SegmentStage):
    teacher_class = SmallSam


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct 64x48 RGB JPEGs of uniform noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    return paths


def processes() -> dict[int, str]:
    """pid -> role, for the driver and its descendants (the local Ray cluster it started)."""
    me = psutil.Process()
    out = {me.pid: "driver"}
    for p in me.children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        actor = re.match(r"ray::MapWorker\(MapBatches\((\w+)\)\)", title)  # its title changes per task
        if actor:
            out[p.pid] = f"actor {actor.group(1)}"
    return out


def rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=ba.positive, default=10_000)
    ap.add_argument("--every", type=ba.positive, default=1_000)
    ap.add_argument("--runner", choices=["ray", "local"], default="ray")
    ap.add_argument("--threads", type=ba.positive, default=1,
                    help="torch threads in this process (--runner local; the actors get the job's)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        paths = write_images(tmp / "images", args.n)
        print(f"{args.n} synthetic images written in {time.perf_counter() - t:.1f} s", flush=True)
        preset_path = write_tiny_teachers(tmp / "teachers", image_size={"shortest_edge": 96, "longest_edge": 128})
        data = yaml.safe_load(preset_path.read_text())
        data["detector"]["max_detections"] = 4
        preset = TeacherPreset.from_dict(data, base=preset_path.parent)
        onto = Ontology.from_classes("person,car,dog")
        stages = teacher_stages(preset, onto)
        stages[1].cls = SmallSegmentStage
        ls = LabelStore(tmp / "store").create(labelset_spec(onto, preset))
        samples: list[tuple[int, dict[str, int]]] = []
        done = [0]

        def on_row(row: dict) -> None:
            done[0] += 1
            if done[0] % args.every == 0 or done[0] == args.n:
                samples.append((done[0], {f"{role} {pid}": rss(pid) for pid, role in processes().items()}))
                print(f"  {done[0]} images, {time.perf_counter() - t0:.0f} s", flush=True)

        t0 = time.perf_counter()
        s = run_label_job(paths, ls, stages, runner=args.runner, progress=False, on_row=on_row,
                          log=lambda line: print(f"  [label] {line}", flush=True))
        print(f"labelled {s.processed} images ({s.labeled} with labels, {s.instances} instances) in {s.seconds:.0f} s, "
              f"runner {s.runner}; busy seconds {({k: round(v, 1) for k, v in s.busy_seconds.items()})}", flush=True)
        if args.runner == "ray":
            import ray

            ray.shutdown()
    names = sorted({k for _, d in samples for k in d}, key=lambda k: (not k.startswith("driver"), k))
    print("RSS, MB, after N images:")
    print("images  " + "  ".join(f"{k:>30s}" for k in names))
    for n, d in samples:
        print(f"{n:6d}  " + "  ".join(f"{(d.get(k) or 0) / MB:30.0f}" for k in names))
    first, last = samples[0], samples[-1]
    print(f"ratio RSS at {last[0]} / at {first[0]} images (goal <= 1.1):")
    for k in names:
        a, b = first[1].get(k), last[1].get(k)
        if a and b:
            print(f"  {k}: {a / MB:.0f} -> {b / MB:.0f} MB, ratio {b / a:.3f}, "
                  f"{(b - a) / (last[0] - first[0]) / 1024:.2f} KB per image")


if __name__ == "__main__":
    main()
