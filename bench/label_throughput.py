"""`label` throughput against the loop users run today, and where its time goes; one run.

    python bench/label_throughput.py                       # tiny teachers, 24 coco128 photos, Ray
    python bench/label_throughput.py --segment-actors 2    # two SAM actors
    python bench/label_throughput.py --full --no-tiny --n-full 4 --rounds 1
                                                           # Grounding DINO-T + SAM ViT-B, random weights
    python bench/label_throughput.py --runner ray,local,auto
    python bench/label_throughput.py --kind grounding-dino+sam --kind owlv2+sam2 --kind mm-grounding-dino+sam-hq
                                                           # teacher combinations side by side
    python bench/label_throughput.py --kind sam3 --full --no-tiny --n-full 1 --classes 8
                                                           # SAM 3 at full size: one pass per class

For each teacher combination (``--kind``, repeatable: ``DETECTOR+SEGMENTER`` or a grounded
``TEACHER`` kind; default ``grounding-dino+sam``) and size, on the same photos and the same
teachers (written by ``distillery teachers tiny --kind ... --size ...``, loaded through the
real loading code and built by the preset's kinds, :mod:`distillery.labeling.kinds`):

* **loop**: what autodistill's and ultralytics' ``auto_annotate`` loops do: load both
  teachers (or the one grounded teacher), then one image at a time decode, detect, segment
  (or label, grounded) and write a JSON file (boxes,
  soft scores, RLE masks). img/s over the whole loop, model loads included; run at torch's
  default thread count (what users get) and at the count the job gives each actor. Each
  step is timed, which gives each stage's rate *running alone* at that thread count.
  ``--rounds 2`` runs the loops before and after the jobs and keeps the best of each.
* **label**: :func:`run_label_job` into a fresh label set, from a cold start (Ray not
  running: its start-up is counted, as a `distillery label` user pays it). img/s over the
  whole job, start-up included; ratio label / loop (goal >= 1.5 tiny, >= 2 full-size).
* **where the time goes**: each stage's busy seconds in the job (decode, detect, segment,
  write; :mod:`distillery.engine.stagetime`) as a share of the job's wall time, the models'
  load time, the start-up before the first labelled images, the driver's idle wait.
* **efficiency**: label img/s / the rate of the slowest stage running alone with the threads
  the job gives each of its actors (times its actor count). The job pushes every image
  through that stage with no more resources, so the figure is <= 1 by construction; 1 -
  efficiency is what start-up, stalls and contention cost.

With more than one combination, a last table puts them side by side: loop and label img/s
and their ratio per combination and size.

The machine is shared: figures move with other load, and OpenMP threads spin, so a process
running more threads than the cores it gets loses most of its time (on the 2-core machine
the tiny SAM call took 2.8 s at 1 thread and 6.5 s at torch's default 2 while others ran).
Ratios measured side by side in one run are what matter.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent

from distillery.engine.config import resolve_config  # noqa: E402
from distillery.engine.images import decode  # noqa: E402
from distillery.engine.job import actor_threads, plan_actor_cpus, run_label_job  # noqa: E402
from distillery.engine.store import LabelStore  # noqa: E402
from distillery.labeling.kinds import build_detector, build_grounded, build_segmenter  # noqa: E402
from distillery.labeling.ontology import Ontology  # noqa: E402
from distillery.labeling.teachers import TeacherPreset, labelset_spec, teacher_stages  # noqa: E402
import bench_args as ba  # bench/ is on sys.path (the script's folder)  # noqa: E402

DEFAULT_THREADS = __import__("torch").get_num_threads()  # torch's default: what a user's loop runs with


def user_loop(preset: TeacherPreset, onto: Ontology, paths: list[str], out: Path) -> dict[str, float]:
    """The per-image loop. Returns seconds: ``load`` (the models), ``loop`` (all images), and
    per step summed over the images (``decode``, ``detect`` and ``segment`` -- or ``label`` for
    a grounded teacher --, ``write``): each stage running alone, one image at a time."""
    t0 = time.perf_counter()
    if preset.teacher is not None:
        grounded = build_grounded(preset, onto)
    else:
        det, sam = build_detector(preset, onto), build_segmenter(preset)
    t1 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    names = ("label",) if preset.teacher is not None else ("detect", "segment")
    steps = dict.fromkeys(("decode", *names, "write"), 0.0)
    for p in paths:
        t = time.perf_counter()
        im = decode(p)
        steps["decode"] += (t2 := time.perf_counter()) - t
        if im.error is not None:
            continue
        if preset.teacher is not None:
            ((r, masks, mask_score),) = grounded([im.pixels])
            steps["label"] += (t4 := time.perf_counter()) - t2
        else:
            (r,) = det([im.pixels])
            steps["detect"] += (t3 := time.perf_counter()) - t2
            masks, mask_score = sam(im.pixels, r.boxes)
            steps["segment"] += (t4 := time.perf_counter()) - t3
        record = {"image": p, "width": im.width, "height": im.height, "boxes": r.boxes.tolist(),
                  "scores": r.scores.tolist(), "mask_score": np.asarray(mask_score).tolist(),
                  "masks": [{"size": m["size"], "counts": m["counts"].decode()} for m in masks]}
        (out / f"{Path(p).stem}.json").write_text(json.dumps(record))
        steps["write"] += time.perf_counter() - t4
    return {"load": t1 - t0, "loop": time.perf_counter() - t1, **steps}


def write_teachers(out: Path, combo: str, size: str) -> Path:
    """``distillery teachers tiny OUT --kind ... --size SIZE`` for a ``DET+SEG`` or grounded combination."""
    from click.testing import CliRunner

    from distillery.engine.cli import main as cli

    kinds = [a for k in combo.split("+") for a in ("--kind", k)]
    r = CliRunner().invoke(cli, ["teachers", "tiny", str(out), "--size", size, *kinds])
    if r.exit_code != 0:
        raise SystemExit(f"--kind {combo}: {r.output.strip()}")
    return out / "teachers.yaml"


def label(preset_path: Path, onto: Ontology, paths: list[str], store: Path, runner: str):
    """``run_label_job`` from a cold start (Ray shut down after it); returns its JobSummary."""
    import ray
    import torch

    torch.set_num_threads(DEFAULT_THREADS)  # the local runner runs with the process's defaults
    preset = TeacherPreset.load(preset_path)
    ls = LabelStore(store).create(labelset_spec(onto, preset))
    s = run_label_job(paths, ls, teacher_stages(preset, onto), runner=runner, progress=False,
                      log=lambda line: print(f"  [label] {line}", flush=True))
    ray.shutdown()
    return s


def stage_threads(runner: str, specs) -> int:
    """Torch threads the job gives each stage: an actor's (:func:`engine.job.actor_threads`), or,
    in process, the process's default."""
    if runner != "ray":
        return DEFAULT_THREADS
    cpus = os.cpu_count()
    return actor_threads(plan_actor_cpus(cpus, cpus, specs))


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the fewest seconds over the rounds (the least disturbed by other load)."""
    return {k: min(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "coco128" / "images"))
    ap.add_argument("--n", type=ba.positive, default=24, help="images for the tiny teachers")
    ap.add_argument("--full", action="store_true", help="also full-size architectures at random weights")
    ap.add_argument("--n-full", type=ba.positive, default=4)
    ap.add_argument("--no-tiny", action="store_true", help="only the full-size teachers (with --full)")
    ap.add_argument("--runner", type=ba.names(("ray", "local", "auto")), default="ray",
                    help="comma-separated: ray, local, auto (what `label` picks)")
    ap.add_argument("--segment-actors", type=ba.positive, default=None,
                    help="segmenter actors (default: the preset's, 1)")
    ap.add_argument("--rounds", type=ba.positive, default=2, help="loop rounds, before and after the jobs; best kept")
    ap.add_argument("--classes", type=ba.at_least(1, 80), default=80,
                    help="the first N of the 80 COCO classes (default all)")
    ap.add_argument("--kind", action="append", default=None, metavar="DET+SEG|TEACHER",
                    help="teacher combination (repeatable), e.g. owlv2+sam2; default grounding-dino+sam")
    args = ap.parse_args()
    all_paths = sorted(str(p) for p in Path(args.images).glob("*.jpg"))
    need = max(0 if args.no_tiny else args.n, args.n_full if args.full else 0)
    if len(all_paths) < need:
        ap.error(f"--images {args.images}: {len(all_paths)} .jpg files, {need} needed (--n / --n-full)")
    import torch
    import yaml

    onto = Ontology.load(resolve_config("ontology", "coco80"))
    if args.classes < len(onto.classes):  # the first N COCO classes (SAM 3 runs one pass per class)
        onto = Ontology.from_classes(list(onto.classes[: args.classes]))
    runners = args.runner
    combos = args.kind or ["grounding-dino+sam"]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = [] if args.no_tiny else [("tiny", all_paths[: args.n])]
        if args.full:
            runs.append(("full", all_paths[: args.n_full]))
        for combo in combos:
            for size, paths in runs:
                n = len(paths)
                name = f"{combo}, {size}" + (" (real architectures, random weights)" if size == "full" else "")
                where = tmp / f"{combo}-{size}"
                preset_path = write_teachers(where, combo, size)
                if args.segment_actors:
                    data = yaml.safe_load(preset_path.read_text())
                    data["segmenter"]["actors"] = args.segment_actors
                    preset_path.write_text(yaml.safe_dump(data))
                preset = TeacherPreset.load(preset_path)
                specs = teacher_stages(preset, onto)
                threads = sorted({DEFAULT_THREADS} | {stage_threads(r if r != "auto" else "ray", specs)
                                                      for r in runners})
                print(f"{name}: {n} coco128 photos; " + ", ".join(f"{sp.name} x{sp.actors}" for sp in specs)
                      + " actor(s)", flush=True)
                loops: dict[int, list] = {th: [] for th in threads}
                jobs = {}
                for round_ in range(max(1, args.rounds)):
                    if round_ == 1:  # the jobs between two rounds of loops: the same load around both
                        jobs = {r: label(preset_path, onto, paths, where / f"store-{r}", r) for r in runners}
                    for th in threads:
                        torch.set_num_threads(th)
                        loops[th].append(user_loop(preset, onto, paths, where / f"json-{th}"))
                        last = loops[th][-1]
                        print(f"  loop, {th} torch thread(s), round {round_ + 1}: "
                              f"{n / (last['load'] + last['loop']):.3f} img/s", flush=True)
                if not jobs:
                    jobs = {r: label(preset_path, onto, paths, where / f"store-{r}", r) for r in runners}
                loops = {th: best(v) for th, v in loops.items()}
                for th, v in loops.items():
                    print(f"  loop, {th} torch thread(s){' (the default)' if th == DEFAULT_THREADS else ''}: "
                          f"{n / (v['load'] + v['loop']):.3f} img/s (models loaded in {v['load']:.1f} s, then "
                          f"{n / v['loop']:.3f} img/s)", flush=True)
                loop_rate = n / (loops[DEFAULT_THREADS]["load"] + loops[DEFAULT_THREADS]["loop"])
                for asked, s in jobs.items():
                    report(f"{asked}" + (f" -> {s.runner}" if asked == "auto" else ""), n, loops, s,
                           stage_threads(s.runner, specs), {sp.name: sp.actors for sp in specs})
                    table.append((combo, size, asked, loop_rate, s.images_per_second))
    if len(table) > 1:
        print("\nside by side (loop at the default thread count, label from a cold start):")
        print(f"  {'teachers':<28} {'size':<5} {'runner':<6} {'loop img/s':>10} {'label img/s':>11} {'ratio':>6}")
        for combo, size, runner, lr, jr in table:
            print(f"  {combo:<28} {size:<5} {runner:<6} {lr:>10.3f} {jr:>11.3f} {jr / lr:>6.2f}")


def report(name: str, n: int, loops: dict, s, threads: int, actors: dict[str, int]) -> None:
    rate = s.images_per_second
    vs = {th: rate / (n / (v["load"] + v["loop"])) for th, v in loops.items()}
    busy = ", ".join(f"{k} {v:.1f} s ({100 * v / s.seconds:.0f}%)" for k, v in s.busy_seconds.items())
    loads = ", ".join(f"{k} {v:.1f} s" for k, v in s.load_seconds.items())
    ready = ", ".join(f"{k} {v:.1f} s" for k, v in s.ready_seconds.items())
    alone = loops[threads]
    # a stage with k actors gets k times one actor's resources: the bound stays an upper bound
    rates = {k: n / alone[k] * actors.get(k, 1) for k in alone if k not in ("load", "loop")}
    slowest = min(rates, key=rates.get)
    print(f"  label, runner {name}: {rate:.3f} img/s over {s.seconds:.1f} s\n"
          f"    ratio label / loop: {vs[DEFAULT_THREADS]:.2f} (loop at the default {DEFAULT_THREADS} threads)"
          + "".join(f", {v:.2f} (loop at {th} thread(s))" for th, v in vs.items() if th != DEFAULT_THREADS) + "\n"
          f"    start-up: {s.startup_seconds:.1f} s before the first labelled images; teachers ready after {ready} "
          f"(model loads: {loads})\n"
          f"    busy: {busy}; driver waited {s.wait_seconds:.1f} s; after the first batch "
          f"{s.steady_images_per_second:.3f} img/s\n"
          f"    stages alone, {threads} thread(s) per actor: "
          + ", ".join(f"{k} {v:.3f} img/s" for k, v in rates.items())
          + f"\n    efficiency: {rate / rates[slowest]:.2f} (label img/s / {slowest} alone; <= 1 by construction)",
          flush=True)


if __name__ == "__main__":
    main()
