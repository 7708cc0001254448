"""Pipeline efficiency of `label`: end-to-end images/s vs the bare teacher calls, same run.

    python bench/label_throughput.py                       # tiny teachers, 32 coco128 photos
    python bench/label_throughput.py --full --n 4          # + Grounding DINO-T / SAM ViT-B at random weights

Prints, for each teacher size, on the same images and teachers:
  end-to-end images/s of `run_label_job` on Ray Data (decode, both teachers, store write;
  Ray already started, actor start-up and model loads included; and after the first
  batch, the rate a large pool runs at), images/s of the bare
  teacher calls on pre-decoded images in this process (detector preprocess+forward+
  postprocess, SAM embed+decode+postprocess), and their ratio (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent

from distillery.engine.config import resolve_config  # noqa: E402
from distillery.engine.images import decode  # noqa: E402
from distillery.engine.job import run_label_job  # noqa: E402
from distillery.engine.store import LabelStore  # noqa: E402
from distillery.labeling.detector import GroundingDinoTeacher  # noqa: E402
from distillery.labeling.ontology import Ontology  # noqa: E402
from distillery.labeling.segmenter import SamTeacher  # noqa: E402
from distillery.labeling.teachers import TeacherPreset, labelset_spec, teacher_stages  # noqa: E402


def write_full_size(out: Path) -> Path:
    """Grounding DINO-T (Swin-T, BERT-base; transformers' GroundingDinoConfig defaults) and SAM
    ViT-B, random weights, plus a preset."""
    import torch
    import yaml
    from segment_anything import sam_model_registry
    from transformers import AutoTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    from distillery.labeling.tiny import bert_uncased_vocab

    model = GroundingDinoForObjectDetection(GroundingDinoConfig())
    model.save_pretrained(out / "gdino-t")
    tok = AutoTokenizer.from_pretrained(str(bert_uncased_vocab().parent))
    GroundingDinoProcessor(GroundingDinoImageProcessor(), tok).save_pretrained(out / "gdino-t")
    torch.save(sam_model_registry["vit_b"]().state_dict(), out / "sam_vit_b.pth")
    preset = {"detector": {"model": "gdino-t", "image_size": {"shortest_edge": 800, "longest_edge": 1333},
                           "max_detections": 100, "batch_size": 1},
              "segmenter": {"model_type": "vit_b", "checkpoint": "sam_vit_b.pth", "batch_size": 1}}
    (out / "teachers.yaml").write_text(yaml.safe_dump(preset))
    return out / "teachers.yaml"


def bare(preset: TeacherPreset, onto: Ontology, paths: list[str]) -> float:
    d, s = preset.detector, preset.segmenter
    det = GroundingDinoTeacher(d.model, onto, device="cpu", box_floor=d.box_floor, nms_iou=d.nms_iou,
                               image_size=d.image_size, max_detections=d.max_detections)
    sam = SamTeacher(s.model_type, s.checkpoint, device="cpu", boxes_per_call=s.boxes_per_call)
    images = [decode(p).pixels for p in paths]
    det(images[:1]), sam(images[0], det(images[:1])[0].boxes[:2])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(images), d.batch_size):
        batch = images[i : i + d.batch_size]
        for im, r in zip(batch, det(batch)):
            sam(im, r.boxes)
    return len(images) / (time.perf_counter() - t)


def end_to_end(preset_path: Path, onto: Ontology, paths: list[str], store: Path):
    preset = TeacherPreset.load(preset_path)
    ls = LabelStore(store).create(labelset_spec(onto, preset))
    s = run_label_job(paths, ls, teacher_stages(preset, onto), runner="ray", progress=False)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "coco128" / "images"))
    ap.add_argument("--n", type=int, default=32, help="images for the tiny teachers")
    ap.add_argument("--full", action="store_true", help="also full-size architectures at random weights")
    ap.add_argument("--n-full", type=int, default=4)
    args = ap.parse_args()
    import ray

    from distillery.labeling.tiny import write_tiny_teachers

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    onto = Ontology.load(resolve_config("ontology", "coco80"))
    all_paths = sorted(str(p) for p in Path(args.images).glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = [("tiny", write_tiny_teachers(tmp / "tiny"), all_paths[: args.n])]
        if args.full:
            runs.append(("full-size (GDINO-T, SAM ViT-B)", write_full_size(tmp / "full"), all_paths[: args.n_full]))
        for name, preset_path, paths in runs:
            s = end_to_end(preset_path, onto, paths, tmp / f"store-{len(name)}")
            fwd = bare(TeacherPreset.load(preset_path), onto, paths)
            e2e, steady = s.images_per_second, s.steady_images_per_second
            after = (f"after it {steady:.3f} img/s, ratio {steady / fwd:.2f}" if steady > 0
                     else "the first batch was the whole run")
            print(f"{name}: {len(paths)} images | bare teacher calls {fwd:.3f} img/s | label end-to-end "
                  f"{e2e:.3f} img/s, efficiency (ratio) {e2e / fwd:.2f} | start-up {s.startup_seconds:.1f} s "
                  f"incl. the first batch; {after}", flush=True)


if __name__ == "__main__":
    main()
