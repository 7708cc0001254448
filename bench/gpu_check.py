"""The GPU check: one table of what matters on a CUDA machine, in one run (<= 8 minutes on one H200).

    bash bench/gpu_check.sh                   # installs the tensorrt extra, runs this, then the GPU tests
    python bench/gpu_check.py --smoke         # the same code paths on this CPU, tiny teachers, small sizes

Sections (``--only label,tensorrt,finetune`` picks some):

* **label** -- ``distillery label``'s job (:func:`~distillery.engine.job.run_label_job`, Ray
  runner, one GPU shared by the detector and segmenter actors) with the full-size teachers at
  random weights (``teachers tiny --size full``: Grounding DINO-T + SAM ViT-B; random weights
  saturate the scores, so ``max_detections`` caps the boxes per image at 20, a typical count),
  for each precision in ``--precisions`` and preset batch size in ``--batches``. Prints the
  steady img/s (after the first batch, so model loading is not in it) and start-up seconds.
  Goal: >= 20 img/s on one H200 (anchors: a tuned Grounded-SAM ~18 img/s on an H100,
  Grounding DINO-T 9.4 FPS in PyTorch on an A100). Then, at the first precision and the last
  batch size only (``--label-kinds``): Grounding DINO-T with SAM 2 (``segmenter.kind: sam2``,
  Hiera-T, ``teachers tiny --kind sam2 --size full``) and SAM 3 alone (``teacher.kind: sam3``,
  ``Sam3Config()``'s 840M parameters, ``teachers tiny --kind sam3 --size full``: one image-encoder
  pass and one prompt pass per class, 8 classes), same images and classes.
* **tensorrt** -- a yolov8n-seg student (one epoch on 8 coco128 photos at 640, enough for
  BatchNorm statistics of real photos) exported to ONNX at 640, quantized to the TensorRT Q/DQ
  ONNX (:func:`~distillery.export.int8.quantize`), then two engines: FP16 (from the FP32 ONNX,
  ``BuilderFlag.FP16``) and INT8 (the strongly typed Q/DQ build of
  :func:`~distillery.export.tensorrt.build_engine`). For each: build seconds, median latency
  (batch 1, CUDA events excluded: wall time of ``execute_async_v3`` + synchronize), and
  agreement with ONNX Runtime FP32 on the same photos: the share of anchors whose top class
  agrees where FP32's top score >= 0.25, and the largest box error in pixels there.
* **finetune** -- one training step of each teacher at random weights, as
  ``teachers finetune`` runs it: Grounding DINO-T with LoRA rank 16 under bf16 autocast, batch
  4 coco128 photos with their GT (:mod:`distillery.labeling.finetune.detector`), and SAM ViT-B's
  mask decoder, 8 box-mask pairs per step (:func:`~distillery.labeling.finetune.sam.finetune_sam`,
  timed over its second epoch, embeddings cached). Median step ms and peak GPU memory.

Without CUDA (and without ``--smoke``) it prints one line and exits 0: nothing here can be
measured on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
import bench_args as ba  # bench/ is on sys.path (the script's folder)

ROOT = Path(__file__).resolve().parent.parent
COCO128 = Path(os.environ.get("DISTILLERY_COCO128", ROOT.parent / "shared" / "data" / "coco128"))
ROWS: list[tuple[str, str, str]] = []  # (section, what, figure)


def row(section: str, what: str, figure: str) -> None:
    ROWS.append((section, what, figure))
    print(f"  {section:<9} {what:<44} {figure}", flush=True)


def gt_store(work: Path, n: int):
    """The coco128 GT of the first ``n`` photos with objects, imported as a label set."""
    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import import_coco

    gt = json.loads((COCO128 / "annotations.json").read_text())
    ids = sorted({a["image_id"] for a in gt["annotations"] if not a.get("iscrowd")})[:n]
    sub = {"images": [im for im in gt["images"] if im["id"] in ids], "categories": gt["categories"],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
    (work / "gt.json").write_text(json.dumps(sub))
    ls, _ = import_coco(LabelStore(work / "store"), str(work / "gt.json"), str(COCO128 / "images"))
    return ls


# -- label ---------------------------------------------------------------------------------

def label_section(teachers: Path, work: Path, args, device: str, size: str) -> None:
    import yaml

    from distillery.engine.job import run_label_job
    from distillery.engine.store import LabelStore
    from distillery.labeling.ontology import Ontology
    from distillery.labeling.teachers import TeacherPreset, labelset_spec, teacher_stages

    onto = Ontology.from_classes(["person", "car", "dog", "bicycle", "bus", "cup", "chair", "bird"])
    paths = [str(p) for p in sorted((COCO128 / "images").glob("*.jpg"))[: args.images]]
    base = yaml.safe_load(teachers.read_text())

    def run(tag: str, p: dict, what: str) -> None:
        f = teachers.parent / f"preset-{tag}.yaml"
        f.write_text(yaml.safe_dump(p))
        preset = TeacherPreset.load(f)
        ls = LabelStore(work / f"label-{tag}").create(labelset_spec(onto, preset))
        s = run_label_job(paths, ls, teacher_stages(preset, onto), runner=args.runner, progress=False,
                          decode_batch_size=args.block)
        row("label", f"{what}, {s.processed} images",
            f"{s.steady_images_per_second:.2f} img/s steady, start-up {s.startup_seconds:.0f} s, "
            f"{s.instances / max(s.labeled, 1):.0f} masks/img")

    def batched(p: dict, roles: tuple, bs: int) -> dict:
        return {**p, **{r: dict(p[r], batch_size=bs) for r in roles}}

    if "default" in args.label_kinds:
        for precision in args.precisions:
            for bs in args.batches:
                run(f"{precision}-{bs}", batched(dict(base, device=device, precision=precision),
                                                 ("detector", "segmenter"), bs), f"{precision} batch {bs}")
    precision, bs = args.precisions[0], args.batches[-1]
    if "sam2" in args.label_kinds:
        from distillery.labeling.tiny import write_tiny_hf_segmenter

        t = time.perf_counter()
        sam2 = write_tiny_hf_segmenter("sam2", teachers.parent / "sam2", size=size)
        p = dict(base, device=device, precision=precision)
        p["segmenter"] = {"kind": "sam2", "model": str(sam2), "boxes_per_call": base["segmenter"]["boxes_per_call"]}
        run(f"sam2-{precision}-{bs}", batched(p, ("detector", "segmenter"), bs),
            f"GD + SAM 2 {precision} batch {bs} (written in {time.perf_counter() - t:.0f} s)")
    if "sam3" in args.label_kinds:
        from distillery.labeling.tiny_grounded import write_tiny_grounded_teachers

        t = time.perf_counter()
        sam3 = yaml.safe_load(write_tiny_grounded_teachers(work / "teachers-sam3", "sam3", size=size).read_text())
        sam3["teacher"]["model"] = str(work / "teachers-sam3" / "sam3")
        run(f"sam3-{precision}-{bs}", batched(dict(sam3, device=device, precision=precision), ("teacher",), bs),
            f"SAM 3 {precision} batch {bs} (written in {time.perf_counter() - t:.0f} s)")


# -- tensorrt ------------------------------------------------------------------------------

def _student(work: Path, imgsz: int, device: str) -> Path:
    from distillery.student.data import Selection
    from distillery.student.train import train

    ls = gt_store(work, 8)

    def bn_of_the_batch(trainer):  # as tests/export: BatchNorm statistics of the photos, not init values
        import torch

        for m in trainer.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0

    run = train(work / "store", work / "run", model="yolov8n-seg.yaml", selection=Selection(val_fraction=0.0),
                val_labelset=ls.id, epochs=1, imgsz=imgsz, batch=8, workers=0, plots=False, seed=0, val=False,
                device=device, callbacks={"on_train_start": bn_of_the_batch})
    return run / "weights" / "best.pt"


def _fp16_engine(onnx_path: Path, out: Path) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT could not build an FP16 engine from {onnx_path}")
    out.write_bytes(bytes(blob))


def _run_engine(path: Path, xs: list, rounds: int) -> tuple[list, float]:
    """Outputs (numpy, per input) and median latency ms of a serialized engine, batch 1."""
    import numpy as np
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    bufs = {}
    for n in names:
        dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(n)))).dtype
        bufs[n] = torch.empty(tuple(engine.get_tensor_shape(n)), dtype=dtype, device="cuda")
        ctx.set_tensor_address(n, bufs[n].data_ptr())
    inp = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT][0]
    outs = [n for n in names if n != inp]
    stream = torch.cuda.current_stream()
    results, times = [], []
    for r in range(rounds + 1):
        for x in xs:
            bufs[inp].copy_(torch.from_numpy(x))
            torch.cuda.synchronize()
            t = time.perf_counter()
            ctx.execute_async_v3(stream.cuda_stream)
            torch.cuda.synchronize()
            if r:
                times.append((time.perf_counter() - t) * 1000)
            else:
                results.append({n: bufs[n].float().cpu().numpy() for n in outs})
    return results, statistics.median(times)


def _agreement(ref: list, got: list, nc: int) -> tuple[float, float]:
    """Top-class agreement where ``ref``'s top score >= 0.25, and the largest box error (px) there."""
    import numpy as np

    agree = total = 0
    err = 0.0
    for a, b in zip(ref, got):
        a0, b0 = a["output0"][0], b["output0"][0]  # (4 + nc + 32, anchors)
        keep = a0[4 : 4 + nc].max(0) >= 0.25
        total += int(keep.sum())
        agree += int((a0[4 : 4 + nc, keep].argmax(0) == b0[4 : 4 + nc, keep].argmax(0)).sum())
        if keep.any():
            err = max(err, float(np.abs(a0[:4, keep] - b0[:4, keep]).max()))
    return (agree / total if total else float("nan")), err


def tensorrt_section(work: Path, args) -> None:
    import onnxruntime as ort

    from distillery.export.int8 import calibration_images, quantize
    from distillery.export.onnx import export_onnx, preprocess
    from distillery.export.tensorrt import DeviceProfile, build_engine

    imgsz = args.trt_imgsz
    pt = _student(work, imgsz, "0")
    fp32 = export_onnx(pt, work / "student.onnx", imgsz=imgsz)
    q = quantize(fp32, work / "student.int8.onnx", calibration_images(folder=str(COCO128 / "images"), n=32))
    photos = [str(p) for p in sorted((COCO128 / "images").glob("*.jpg"))[:16]]
    xs = [preprocess(p, imgsz) for p in photos]
    sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ref = [dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x}))) for x in xs]
    nc = ref[0]["output0"].shape[1] - 4 - 32
    for kind in ("fp16", "int8"):
        out = work / f"student.{kind}.engine"
        t = time.perf_counter()
        if kind == "fp16":
            _fp16_engine(fp32, out)
        else:
            build_engine(q["tensorrt"], DeviceProfile(name="gpu-check", imgsz=imgsz, batch=1), out)
        built = time.perf_counter() - t
        got, ms = _run_engine(out, xs, args.rounds)
        share, err = _agreement(ref, got, nc)
        row("tensorrt", f"{kind} engine at {imgsz}",
            f"build {built:.0f} s, {ms:.2f} ms/img, top class agrees {share:.3f}, box err <= {err:.1f} px")


# -- finetune ------------------------------------------------------------------------------

def finetune_section(teachers: Path, work: Path, args, device: str) -> None:
    import torch
    import yaml

    from distillery.labeling.finetune import detector as fd
    from distillery.labeling.finetune.data import select_training_data
    from distillery.labeling.finetune.run import load_base
    from distillery.labeling.finetune.sam import finetune_sam
    from distillery.labeling.finetune.sam_run import sam_samples

    (work / "ft").mkdir(parents=True, exist_ok=True)
    ls = gt_store(work / "ft", 16)
    data = select_training_data(ls, None, 0.0)
    preset = yaml.safe_load(teachers.read_text())
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    processor, model = load_base(str(teachers.parent / preset["detector"]["model"]), None)
    model = fd.make_trainable(model, "lora", 16)
    fd.detection_model(model).loss_function = fd.grounding_dino_loss
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    sampler = fd.CaptionSampler(data.ontology, processor.tokenizer,
                                int(fd.detection_model(model).config.max_text_len), 80)
    dataset = fd.DetectionDataset(data.train, sampler, 0, 0.5)
    collate = fd.Collate(processor, preset["detector"].get("image_size"))
    batch = fd.to_device(collate([dataset[i] for i in range(args.ft_batch)]), dev)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.ft_steps + 2):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = fd.training_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:  # after warm-up
            times.append((time.perf_counter() - t) * 1000)
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    row("finetune", f"Grounding DINO LoRA r16 {'bf16' if cuda else 'fp32'}, batch {args.ft_batch}",
        f"{statistics.median(times):.0f} ms/step{peak}" + ("" if torch.isfinite(loss) else ", LOSS NOT FINITE"))
    del model, opt, batch
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    samples = sam_samples(data.train)
    marks = []
    seg = preset["segmenter"]
    hist = finetune_sam(seg["model_type"], str(teachers.parent / seg["checkpoint"]), samples, [],
                        work / "sam_ft.pth", epochs=2, batch=8, device=device,
                        on_epoch=lambda e: marks.append(time.perf_counter()))
    steps = hist["epochs"][-1]["steps"]
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    row("finetune", f"SAM {seg['model_type']} mask decoder, 8 pairs/step",
        f"{(marks[1] - marks[0]) * 1000 / steps:.0f} ms/step over {steps} steps{peak}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="label,tensorrt,finetune")
    ap.add_argument("--images", type=ba.positive, default=128, help="coco128 photos per labelling run")
    ap.add_argument("--batches", default="1,8", help="preset batch sizes to sweep")
    ap.add_argument("--block", type=ba.positive, default=8,
                    help="images per decode block (run_label_job decode_batch_size)")
    ap.add_argument("--precisions", default="fp16,bf16")
    ap.add_argument("--label-kinds", default="default,sam2,sam3",
                    help="label runs: default (GD-T + SAM ViT-B, every precision and batch), sam2 (GD-T + SAM 2), "
                         "sam3 (SAM 3 alone); the last two at the first precision and last batch")
    ap.add_argument("--runner", default="ray", choices=["ray", "local"])
    ap.add_argument("--trt-imgsz", type=ba.imgsz, default=640)
    ap.add_argument("--rounds", type=ba.positive, default=5, help="latency rounds over 16 photos")
    ap.add_argument("--ft-batch", type=ba.positive, default=4)
    ap.add_argument("--ft-steps", type=ba.positive, default=5)
    ap.add_argument("--smoke", action="store_true",
                    help="on a CPU: tiny teachers, fp32, 4 images, local runner, no TensorRT (checks the code paths)")
    args = ap.parse_args()
    import torch

    only = set(args.only.split(","))
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: no CUDA device; every check here is GPU-only: skipped")
        return 0
    args.batches = [int(b) for b in args.batches.split(",")]
    args.precisions = args.precisions.split(",")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    size = "full"
    if args.smoke:
        device, size, args.precisions, args.batches, args.images, args.block = "cpu", "tiny", ["fp32"], [2], 6, 2
        args.runner, args.ft_batch, args.ft_steps = "local", 2, 1
        only.discard("tensorrt")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    from distillery.labeling.tiny import write_tiny_teachers

    t = time.perf_counter()
    teachers = write_tiny_teachers(work / "teachers", size=size)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke)"
    print(f"gpu_check on {name}: {size} random teachers written in {time.perf_counter() - t:.0f} s ({work})")
    args.label_kinds = set(args.label_kinds.split(","))
    sections = {"label": lambda: label_section(teachers, work, args, device, size),
                "tensorrt": lambda: tensorrt_section(work / "trt", args),
                "finetune": lambda: finetune_section(teachers, work, args, device)}
    failed = 0
    for key, fn in sections.items():
        if key in only:
            t = time.perf_counter()
            try:
                (work / "trt").mkdir(exist_ok=True)
                fn()
            except Exception as e:  # one broken section must not hide the others' figures
                failed += 1
                row(key, "FAILED", f"{type(e).__name__}: {e}")
            print(f"  ({key}: {time.perf_counter() - t:.0f} s)", flush=True)
    print("\n| section | what | figure |\n| --- | --- | --- |")
    for r in ROWS:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
