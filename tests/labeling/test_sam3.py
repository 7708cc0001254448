"""The grounded segmenter kind ``sam3`` (labeling/sam3.py): the tiny random teacher written by
`distillery teachers tiny --kind sam3` labels coco128 through `distillery label`; cached image
and text features give the plain forward's outputs; the label-set id names the kind and the
weights; wrong weights and unsupported uses fail in one line; and the geometry oracle
(tests/oracle.py: GT-derived raw outputs through the real processor, post-processing, merge,
store and COCO export) gives GT back, under every EXIF orientation too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from distillery.engine.cli import main
from distillery.engine.images import decode
from distillery.engine.job import StageSpec, run_label_job
from distillery.engine.store import LabelStore, fingerprint
from distillery.labeling.coco import records_to_coco
from distillery.labeling.kinds import build_grounded
from distillery.labeling.ontology import Ontology
from distillery.labeling.sam3 import Sam3Teacher
from distillery.labeling.teachers import GroundedStage, TeacherPreset, labelset_spec
from distillery.labeling.tiny_grounded import write_tiny_sam3
from tests.labeling.test_geometry import (INVERSE, box_ap, coco128_inputs, exif_oriented_inputs, overlapping_pairs,
                                          per_instance)
from tests.oracle import LOGIT, OracleSam3

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: three coco128 photos: 640x480 (8 instances), 640x426 (2 giraffes), 480x640 portrait
LABEL_IMAGES = ("000000000009.jpg", "000000000025.jpg", "000000000064.jpg")


@pytest.fixture(scope="module")
def sam3_preset(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-sam3")
    r = CliRunner().invoke(main, ["teachers", "tiny", str(d), "--kind", "sam3"])
    assert r.exit_code == 0 and "(sam3 grounded segmenter)" in r.output, r.output
    return d / "teachers.yaml"


def test_tiny_sam3_is_the_real_architecture(sam3_preset):
    preset = TeacherPreset.load(sam3_preset)
    assert yaml.safe_load(sam3_preset.read_text())["teacher"]["model"] == "sam3"
    assert preset.teacher.kind == "sam3" and not (sam3_preset.parent / "grounding-dino").exists()
    cfg = json.loads((sam3_preset.parent / "sam3" / "config.json").read_text())
    assert cfg["architectures"] == ["Sam3Model"] and cfg["model_type"] == "sam3"
    t = build_grounded(preset, Ontology.from_classes(["person", "dog"]))
    assert type(t) is Sam3Teacher and type(t.model).__name__ == "Sam3Model"
    assert type(t.processor).__name__ == "Sam3Processor" and t.processor.image_processor.size["height"] == 1008


def test_full_size_is_sam3_config_defaults():
    """`--size full` is ``Sam3Config()`` but for the text config's special token ids (the made-up
    tokenizer's): 840,376,374 parameters, counted on the meta device (the README's figure)."""
    from transformers import Sam3Config, Sam3Model

    from distillery.labeling.tiny import tiny_clip_tokenizer
    from distillery.labeling.tiny_grounded import sam3_config

    got, ref = sam3_config(tiny_clip_tokenizer(32), "full").to_dict(), Sam3Config().to_dict()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        got["text_config"].pop(k), ref["text_config"].pop(k)
    assert got == ref
    with torch.device("meta"):
        model = Sam3Model(sam3_config(tiny_clip_tokenizer(32), "full"))
    assert sum(p.numel() for p in model.parameters()) == 840_376_374


def test_tiny_sam3_labels_coco128_through_the_cli(sam3_preset, coco128, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes((coco128 / "images" / LABEL_IMAGES[0]).read_bytes()[:2000])  # a truncated JPEG
    paths = [str(coco128 / "images" / f) for f in LABEL_IMAGES] + [str(bad)]
    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["label", *paths, "--classes", "person,giraffe", "--store", str(store),
                                  "--teachers", str(sam3_preset), "--runner", "local", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "4 images processed this run" in r.output and "3 with labels" in r.output, r.output
    onto = Ontology.from_classes(["person", "giraffe"])
    ls = LabelStore(store).open()
    assert ls.id == fingerprint(labelset_spec(onto, TeacherPreset.load(sam3_preset)))
    listed = CliRunner().invoke(main, ["labels", "info", "--store", str(store)])
    assert listed.exit_code == 0 and listed.output.rstrip().endswith("from sam3"), listed.output  # the model folder
    records = {rec.path: rec for rec in ls.iter_records()}
    assert sorted(records) == sorted(paths)
    assert records[str(bad)].error is not None and len(records[str(bad)].boxes) == 0
    teacher = build_grounded(TeacherPreset.load(sam3_preset), onto)
    for p in paths[:3]:
        rec = records[p]
        w, h = Image.open(p).size
        n = len(rec.boxes)
        assert rec.error is None and (rec.width, rec.height) == (w, h) and 0 < n <= 20  # max_detections 20
        assert rec.boxes.dtype == rec.scores.dtype == rec.box_score.dtype == rec.mask_score.dtype == np.float32
        assert rec.boxes.shape == (n, 4) and rec.scores.shape == (n, 2) and rec.mask_score.shape == (n,)
        assert (rec.boxes[:, :2] >= 0).all() and (rec.boxes[:, 2] <= w).all() and (rec.boxes[:, 3] <= h).all()
        assert (rec.boxes[:, 2:] > rec.boxes[:, :2]).all()
        assert all(m["size"] == [h, w] for m in rec.masks)
        masks = mask_utils.decode(rec.masks).reshape(h, w, n)
        np.testing.assert_array_equal(masks.sum(axis=(0, 1)), mask_utils.area(rec.masks))
        # the stored labels are the teacher's: a fresh teacher of the preset gives the same, but for
        # a few mask pixels (one image here, three in the job's batch: float noise on random-weight
        # mask logits near the 0.5 threshold; measured IoU >= 0.99994)
        ((det, rles, score),) = teacher([decode(p).pixels])
        np.testing.assert_allclose(rec.boxes, det.boxes, atol=1e-4)
        np.testing.assert_allclose(rec.scores, det.scores, atol=1e-6)
        np.testing.assert_allclose(rec.mask_score, score, atol=1e-6)
        assert np.diag(np.asarray(mask_utils.iou(rec.masks, rles, [0] * n))).min() >= 0.999


def test_no_detection_gives_empty_arrays_of_the_right_shapes(sam3_preset, coco128):
    preset = TeacherPreset.load(sam3_preset)
    t = Sam3Teacher(preset.teacher.model, Ontology.from_classes(["person", "dog", "cat"]), device="cpu",
                    box_floor=1.0)  # random weights score about 0.25: nothing reaches 1
    ((det, rles, score),) = t([decode(str(coco128 / "images" / LABEL_IMAGES[1])).pixels])
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0, 3) and rles == [] and score.shape == (0,)
    assert det.boxes.dtype == det.scores.dtype == score.dtype == np.float32
    assert t([]) == []


def test_cached_image_and_text_features_equal_the_plain_forward(sam3_preset, coco128):
    """Per prompt, ``Sam3Model`` on cached ``get_vision_features`` / ``get_text_features`` outputs
    gives the plain ``model(pixel_values, input_ids, attention_mask)`` outputs within 1e-5; the
    image encoder runs once for all prompts instead of once per prompt."""
    model = TeacherPreset.load(sam3_preset).teacher.model
    onto = Ontology.from_classes(["person", "giraffe", "traffic light"])
    cached, plain = (Sam3Teacher(model, onto, device="cpu", reuse_image_features=r, max_detections=10)
                     for r in (True, False))
    calls = {}
    for name, t in (("cached", cached), ("plain", plain)):
        calls[name] = 0
        t.model.vision_encoder.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    ims = [decode(str(coco128 / "images" / f)).pixels for f in LABEL_IMAGES[:2]]
    a, b = cached.preprocess(ims), plain.preprocess(ims)
    xs, ys = [], []
    for p in range(3):
        xs.append(cached.forward(a, p))
        ys.append(plain.forward(b, p))
        for k in ("pred_logits", "presence_logits", "pred_boxes", "pred_masks"):
            torch.testing.assert_close(getattr(xs[-1], k), getattr(ys[-1], k), rtol=0, atol=1e-5)
    assert calls == {"cached": 1, "plain": 3}
    sizes = [im.shape[:2] for im in ims]
    got = cached.postprocess([cached.select(x, sizes) for x in xs], sizes)
    want = plain.postprocess([plain.select(y, sizes) for y in ys], sizes)
    for (d1, r1, s1), (d2, r2, s2) in zip(got, want):
        assert len(d1.boxes) == len(d2.boxes) == 10
        np.testing.assert_allclose(d1.boxes, d2.boxes, atol=1e-3)
        np.testing.assert_allclose(d1.scores, d2.scores, atol=1e-5)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
        assert np.diag(np.asarray(mask_utils.iou(r1, r2, [0] * len(r2)))).min() >= 0.999


def test_label_set_id_names_the_kind_and_the_weights(sam3_preset, tiny_teachers, tmp_path):
    onto = Ontology.from_classes(["person"])
    preset = TeacherPreset.load(sam3_preset)
    spec = labelset_spec(onto, preset)
    assert spec["teachers"]["teacher"]["type"] == "sam3" and "detector" not in spec["teachers"]
    sam3_id = fingerprint(spec)
    assert sam3_id != fingerprint(labelset_spec(onto, TeacherPreset.load(tiny_teachers)))  # grounding-dino + sam
    # the unused detector and segmenter are not in it
    unused = preset.model_copy(deep=True)
    unused.detector = unused.detector.model_copy(update={"model": "someone/else", "box_floor": 0.5})
    unused.segmenter = unused.segmenter.model_copy(update={"kind": "sam2", "model": "x"})
    assert fingerprint(labelset_spec(onto, unused)) == sam3_id
    # other weights of the same kind (seed 1), or another clean-up: other ids
    other = preset.model_copy(deep=True)
    other.teacher = other.teacher.model_copy(update={"model": str(write_tiny_sam3(tmp_path / "seed1", seed=1))})
    cleanup = preset.model_copy(deep=True)
    cleanup.teacher = cleanup.teacher.model_copy(update={"min_region_area": 0})
    ids = {sam3_id, fingerprint(labelset_spec(onto, other)), fingerprint(labelset_spec(onto, cleanup))}
    assert len(ids) == 3


def test_wrong_weights_and_long_prompts_fail_in_one_line(sam3_preset, coco128, tmp_path):
    from distillery.labeling.tiny import write_tiny_hf_segmenter

    sam2 = write_tiny_hf_segmenter("sam2", tmp_path / "sam2")
    image = str(coco128 / "images" / LABEL_IMAGES[0])
    for model, message in ((str(sam2), "is a 'sam2' model, not the 'sam3' that teacher.kind sam3 loads"),
                           ("no-such-dir", "teacher.model 'no-such-dir' (kind sam3) cannot be loaded as a Sam3Model")):
        p = tmp_path / "p.yaml"
        p.write_text(yaml.safe_dump({"teacher": {"kind": "sam3", "model": model}}))
        r = CliRunner().invoke(main, ["label", image, "--classes", "cat", "--store", str(tmp_path / "s"),
                                      "--teachers", str(p)])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            Sam3Teacher(model, Ontology.from_classes(["cat"]), device="cpu")
        assert "\n" not in str(e.value)
    long = "a prompt far too long for the thirty two text positions of the sam three text encoder"
    r = CliRunner().invoke(main, ["label", image, "--classes", long, "--store", str(tmp_path / "s"),
                                  "--teachers", str(sam3_preset)])
    assert r.exit_code == 1 and "SAM 3's text encoder takes at most 32: shorten it" in r.output, r.output
    assert not (tmp_path / "s").exists()


def test_finetune_refuses_a_grounded_preset(sam3_preset, tmp_path):
    (tmp_path / "store" / "labelsets").mkdir(parents=True)
    r = CliRunner().invoke(main, ["teachers", "finetune", "--teachers", str(sam3_preset), "--store",
                                  str(tmp_path / "store"), "--out", str(tmp_path / "ft")])
    assert r.exit_code == 1 and "fine-tuning is not supported for teacher.kind sam3" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "ft").exists()


# -- geometry oracle ---------------------------------------------------------------------------

class OracleSam3Stage(GroundedStage):
    teacher_class = OracleSam3

    def __init__(self, preset, ontology, gt):
        super().__init__(preset, ontology)
        self.teacher.gt = gt


def run_sam3_oracle(preset_path, paths, gt, onto, store):
    preset = TeacherPreset.load(preset_path)
    # the tiny preset caps instances at 20 (coco128 has up to 42); SAM's clean-up would drop GT's small parts
    preset.teacher = preset.teacher.model_copy(update={"max_detections": 300, "min_region_area": 0})
    ls = LabelStore(store).create(labelset_spec(onto, preset))
    stage = StageSpec(OracleSam3Stage, {"preset": preset.to_dict(), "ontology": onto.to_dict(), "gt": gt}, batch_size=4)
    summary = run_label_job(paths, ls, [stage], runner="local", progress=False)
    assert summary.processed == len(paths) and not summary.errors
    return ls


def sig(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def check_sam3_geometry(ls, gt_coco: dict, image_ids: list[int], tag: str) -> None:
    """Every GT instance comes back once, with its box (box AP >= 0.99) and mask (IoU median
    >= 0.95, 5th percentile >= 0.85), and a soft vector that is, per the oracle's logits
    (tests/oracle.py), sigmoid(10)^2 for its class, and sigmoid(-10) * sigmoid(+-10) for the
    other classes (presence +10 where the image holds that class)."""
    assert not overlapping_pairs(gt_coco, image_ids)  # no GT pair for the merge to join
    pred = records_to_coco(ls.iter_records(), ls.classes)
    rows = per_instance(pred, gt_coco, image_ids)
    n_pred = sum(len(rec.boxes) for rec in ls.iter_records())
    assert n_pred == len(rows) and all(r[1] >= 0.999 for r in rows), (n_pred, len(rows))
    ap = box_ap(pred, gt_coco, image_ids)
    mask = np.array([r[2] for r in rows])
    print(f"{tag}: {n_pred} instances for {len(rows)} GT, box AP {ap:.4f}, mask IoU median {np.median(mask):.4f} "
          f"p5 {np.percentile(mask, 5):.4f} min {mask.min():.4f}")
    assert ap >= 0.99 and np.median(mask) >= 0.95 and np.percentile(mask, 5) >= 0.85
    col = {c["id"]: j for j, c in enumerate(sorted(gt_coco["categories"], key=lambda c: c["id"]))}
    by_name = {im["file_name"]: im["id"] for im in gt_coco["images"]}
    for rec in ls.iter_records():
        i = by_name[rec.path.rsplit("/", 1)[-1]]
        g = [a for a in gt_coco["annotations"] if a["image_id"] == i and not a["iscrowd"]]
        if not g:
            assert len(rec.boxes) == 0 and rec.scores.shape == (0, len(col))
            continue
        gt_boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                 for a in g])
        present = {col[a["category_id"]] for a in g}
        for box, soft in zip(rec.boxes, rec.scores):
            match = g[int(box_iou(torch.from_numpy(box[None]).double(), gt_boxes.double())[0].argmax())]
            expected = np.array([sig(-LOGIT) * sig(LOGIT if c in present else -LOGIT) for c in range(len(col))])
            expected[col[match["category_id"]]] = sig(LOGIT) ** 2
            np.testing.assert_allclose(soft, expected, rtol=1e-4, atol=1e-7)


def test_oracle_geometry_on_coco128(sam3_preset, coco128, coco128_gt, tmp_path):
    """The coco128 images without GT boxes overlapping above 0.7 (the merge joins such pairs; 8 of
    128 images have one): 120 images, 2 with no instance (empty records)."""
    pairs = {im["id"] for im in coco128_gt["images"] if overlapping_pairs(coco128_gt, [im["id"]])}
    images = [im for im in coco128_gt["images"] if im["id"] not in pairs]
    assert len(images) == 120
    onto, gt, paths = coco128_inputs(coco128, coco128_gt, images)
    ls = run_sam3_oracle(sam3_preset, paths, gt, onto, tmp_path / "store")
    check_sam3_geometry(ls, coco128_gt, [im["id"] for im in images], "sam3 oracle, coco128")


@pytest.mark.parametrize("orientation", sorted(INVERSE))
def test_oracle_geometry_under_exif_orientation(orientation, sam3_preset, coco128, coco128_gt, tmp_path):
    """EXIF orientations 2-8 on a wide (640x248) and a portrait (480x640) photo: the decoded frame is
    the original one and boxes, masks and scores land on the GT."""
    classes, images, gt, paths, _ = exif_oriented_inputs(coco128, coco128_gt, (597, 64), orientation, tmp_path)
    ls = run_sam3_oracle(sam3_preset, paths, gt, Ontology.from_classes(classes), tmp_path / "store")
    check_sam3_geometry(ls, coco128_gt, [im["id"] for im in images], f"sam3 oracle, EXIF {orientation}")
