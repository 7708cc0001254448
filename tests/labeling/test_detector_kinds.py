"""Detector kinds other than Grounding DINO: ``mm-grounding-dino`` and ``owlv2``.

Each kind's tiny random teacher (``distillery teachers tiny --kind``) labels coco128 photos
through ``distillery label``; its geometry oracle (tests/oracle.py: GT-derived raw outputs
through the kind's real processor, post-processing, SAM oracle, store and COCO export) gives
GT back; OWLv2's box rule agrees with transformers' own post-processing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision.ops import clip_boxes_to_image

from distillery.engine.cli import main
from distillery.engine.images import decode
from distillery.engine.job import StageSpec, run_label_job
from distillery.engine.store import LabelStore
from distillery.labeling.coco import records_to_coco
from distillery.labeling.kinds import build_detector
from distillery.labeling.mm_grounding_dino import MMGroundingDinoTeacher
from distillery.labeling.ontology import Ontology, OntologyError
from distillery.labeling.owlv2 import Owlv2Teacher
from distillery.labeling.teachers import DetectStage, TeacherPreset, labelset_spec
from tests.labeling.test_geometry import INVERSE, OracleSegmentStage, check_geometry, coco128_inputs, exif_oriented_inputs
from tests.oracle import OracleMMDetector, OracleOwlv2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ("mm-grounding-dino", "owlv2")
CLASSES = {"mm-grounding-dino": MMGroundingDinoTeacher, "owlv2": Owlv2Teacher}
#: coco128 images without GT boxes overlapping above 0.7 (W x H): 640x426, 640x248, 480x640, 428x640
IMAGES = (74, 597, 64, 283)


@pytest.fixture(scope="module")
def kind_presets(tmp_path_factory) -> dict:
    """kind -> the preset `distillery teachers tiny DIR --kind KIND` wrote."""
    out = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(kind)
        r = CliRunner().invoke(main, ["teachers", "tiny", str(d), "--kind", kind])
        assert r.exit_code == 0 and f"({kind} detector, sam segmenter)" in r.output, r.output
        out[kind] = d / "teachers.yaml"
    return out


def test_tiny_teachers_are_the_real_architectures(kind_presets):
    arch = {"mm-grounding-dino": "MMGroundingDinoForObjectDetection", "owlv2": "Owlv2ForObjectDetection"}
    onto = Ontology.from_classes(["person", "dog"])
    for kind, path in kind_presets.items():
        preset = TeacherPreset.load(path)
        assert preset.detector.kind == kind
        assert json.loads((path.parent / kind / "config.json").read_text())["architectures"] == [arch[kind]]
        assert not (path.parent / "grounding-dino").exists()
        det = build_detector(preset, onto)
        assert type(det) is CLASSES[kind] and type(det.model).__name__ == arch[kind]


def test_each_kind_labels_coco128_through_the_cli(kind_presets, tiny_teachers, coco128, tmp_path):
    lst = tmp_path / "two.txt"
    lst.write_text("\n".join(str(coco128 / "images" / n) for n in ["000000000009.jpg", "000000000025.jpg"]))
    store = tmp_path / "store"
    r = CliRunner()
    ids = {}
    for kind, preset in kind_presets.items():
        out = r.invoke(main, ["label", str(lst), "--classes", "person,giraffe", "--store", str(store),
                              "--teachers", str(preset), "--runner", "local", "--quiet", "--name", kind])
        assert out.exit_code == 0, out.output
        assert "2 images processed this run" in out.output and "errors: none" in out.output, out.output
        ls = LabelStore(store).open(kind)
        ids[kind] = ls.id
        recs = list(ls.iter_records())
        assert len(recs) == 2 and all(rec.error is None for rec in recs)
        assert sum(len(rec.boxes) for rec in recs) > 0  # random weights: saturated scores, boxes everywhere
        for rec in recs:
            assert rec.scores.shape == (len(rec.boxes), 2) and len(rec.masks) == len(rec.boxes)
            assert (rec.boxes[:, 2] <= rec.width).all() and (rec.boxes[:, 3] <= rec.height).all()
            assert (rec.boxes[:, :2] >= 0).all() and (rec.boxes[:, 2:] > rec.boxes[:, :2]).all()
    gd = LabelStore(store).create(labelset_spec(Ontology.from_classes(["person", "giraffe"]),
                                                TeacherPreset.load(tiny_teachers))).id
    assert len({*ids.values(), gd}) == 3, (ids, gd)  # the kind is in the fingerprint


def test_owlv2_boxes_match_transformers_post_processing(kind_presets, coco128):
    """Same raw outputs as ``Owlv2ForObjectDetection`` called the documented way, and the same boxes
    and scores as ``Owlv2Processor.post_process_grounded_object_detection`` (clipped to the frame)."""
    preset = TeacherPreset.load(kind_presets["owlv2"])
    onto = Ontology.from_classes(["person", "dog", "baseball glove"])
    t = Owlv2Teacher(preset.detector.model, onto, device="cpu", box_floor=0.0, nms_iou=1.0, max_detections=10**6,
                     queries_per_call=2)  # two query batches
    assert t.query_batches == [[0, 1], [2]]
    ims = [decode(str(coco128 / "images" / n)).pixels for n in ("000000000597.jpg", "000000000064.jpg")]
    inputs = t.processor(text=[list(onto.prompts)] * 2, images=ims, return_tensors="pt")
    with torch.inference_mode():
        ref = t.model(**inputs)
    mine = t.preprocess(ims)
    raw = [t.forward(mine, k) for k in range(2)]
    torch.testing.assert_close(torch.cat([raw[0][0], raw[1][0]], dim=2), ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw[0][1], ref.pred_boxes)
    want = t.processor.post_process_grounded_object_detection(ref, threshold=-1.0,
                                                              target_sizes=[im.shape[:2] for im in ims])
    for det, w, im in zip(t.postprocess(raw, [im.shape[:2] for im in ims]), want, ims):
        h, wd = im.shape[:2]
        boxes = clip_boxes_to_image(w["boxes"], (h, wd))
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        got = np.c_[det.boxes, det.scores.max(axis=1)]
        exp = np.c_[boxes[ok].numpy(), w["scores"][ok].numpy()]
        assert len(got) == len(exp) > 20  # of 100 patch boxes, 60 (640x248) and 49 (480x640) overlap the photo
        np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], exp[np.lexsort(exp.T[::-1])], rtol=1e-5, atol=1e-3)


def test_owlv2_processor_pads_bottom_right_to_a_square(kind_presets, coco128):
    """The rule the box scale rests on: a 640x248 photo fills the top 248/640 of OWLv2's square
    input; the rest is the zero pad (normalised: -mean/std per channel)."""
    t = Owlv2Teacher(TeacherPreset.load(kind_presets["owlv2"]).detector.model, Ontology.from_classes(["a"]),
                     device="cpu")
    px = t.preprocess([decode(str(coco128 / "images" / "000000000597.jpg")).pixels])["pixel_values"][0]
    side = px.shape[-1]
    proc = t.processor.image_processor
    pad = (-torch.tensor(proc.image_mean) / torch.tensor(proc.image_std))[:, None, None]
    edge = 248 / 640 * side  # 62 of 160 rows
    below = px[:, int(edge) + 3:, :]
    torch.testing.assert_close(below, pad.expand_as(below), rtol=0, atol=1e-5)
    assert (px[:, int(edge) - 3, :] - pad).abs().max() > 0.1  # photo, not pad, above the edge
    assert (px[:, :, -3:] - pad).abs().max() > 0.1  # full width: no pad on the right


def test_owlv2_refuses_settings_it_cannot_honour(kind_presets, coco128, tmp_path):
    model = TeacherPreset.load(kind_presets["owlv2"]).detector.model
    onto = Ontology.from_classes(["cat"])
    with pytest.raises(ValueError, match="image_size does not apply to kind owlv2"):
        Owlv2Teacher(model, onto, device="cpu", image_size={"shortest_edge": 10, "longest_edge": 20})
    with pytest.raises(ValueError, match="takes no LoRA adapter"):
        Owlv2Teacher(model, onto, device="cpu", adapter="somewhere")
    with pytest.raises(OntologyError, match="at most 16: shorten it"):
        Owlv2Teacher(model, Ontology.from_classes(["a very long prompt that will not fit sixteen tokens"]),
                     device="cpu")
    # `distillery label` says so before any label set exists
    out = CliRunner().invoke(main, ["label", str(coco128 / "images" / "000000000009.jpg"), "--classes",
                                    "a very long prompt that will not fit sixteen tokens", "--store",
                                    str(tmp_path / "s"), "--teachers", str(kind_presets["owlv2"]), "--quiet"])
    assert out.exit_code == 1 and "is 31 tokens with the start/end tokens" in out.output, out.output
    assert "Traceback" not in out.output and not (tmp_path / "s").exists()


def test_mm_grounding_dino_reuses_image_features_across_chunks(kind_presets, coco128):
    model = TeacherPreset.load(kind_presets["mm-grounding-dino"]).detector.model
    onto = Ontology.from_classes([f"thing number {i}" for i in range(300)])  # over 256 tokens: 2+ chunks
    size = {"shortest_edge": 320, "longest_edge": 512}
    cached, plain = (MMGroundingDinoTeacher(model, onto, device="cpu", image_size=size, reuse_image_features=r)
                     for r in (True, False))
    assert len(cached.chunks) >= 2
    im = [decode(str(coco128 / "images" / "000000000009.jpg")).pixels]
    got, want = cached(im)[0], plain(im)[0]
    assert cached.image_cache.calls["backbone"] == 1 and len(want.boxes) > 0
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-4)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


def test_mm_grounding_dino_loads_a_lora_adapter(kind_presets, tmp_path):
    """A peft adapter (the fine-tuning code's LoRA targets) loads onto MM-Grounding-DINO and is merged:
    each targeted weight becomes W + (alpha / r) B A (Hu et al. 2021, eq. 3)."""
    from transformers import MMGroundingDinoForObjectDetection

    from distillery.labeling.finetune.detector import make_trainable

    model = TeacherPreset.load(kind_presets["mm-grounding-dino"]).detector.model
    base = MMGroundingDinoForObjectDetection.from_pretrained(model)
    peft = make_trainable(MMGroundingDinoForObjectDetection.from_pretrained(model), "lora", rank=2)
    name, lora = next((n, m) for n, m in peft.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B)
    torch.manual_seed(0)
    torch.nn.init.normal_(lora.lora_B["default"].weight, std=0.1)  # peft starts B at 0: a no-op adapter
    peft.save_pretrained(tmp_path / "adapter")
    t = MMGroundingDinoTeacher(model, Ontology.from_classes(["cat"]), device="cpu", adapter=str(tmp_path / "adapter"))
    path = name.split("base_model.model.", 1)[1]
    delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"]
    merged = t.model.get_submodule(path).weight
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(merged, base.get_submodule(path).weight + delta, rtol=1e-5, atol=1e-6)


class OracleKindStage(DetectStage):
    def __init__(self, preset, ontology, gt):
        super().__init__(preset, ontology)
        self.teacher.gt = gt


class OracleMMStage(OracleKindStage):
    teacher_class = OracleMMDetector


class OracleOwlv2Stage(OracleKindStage):
    teacher_class = OracleOwlv2


STAGES = {"mm-grounding-dino": OracleMMStage, "owlv2": OracleOwlv2Stage}


def run_kind_oracle(kind, preset_path, paths, gt, onto, store):
    preset = TeacherPreset.load(preset_path)
    preset.detector.max_detections = 300  # the tiny preset caps boxes at 20
    ls = LabelStore(store).create(labelset_spec(onto, preset))
    pd = preset.to_dict()
    stages = [StageSpec(STAGES[kind], {"preset": pd, "ontology": onto.to_dict(), "gt": gt}, batch_size=4),
              StageSpec(OracleSegmentStage, {"preset": pd, "num_classes": len(onto.classes), "gt": gt}, batch_size=4)]
    summary = run_label_job(paths, ls, stages, runner="local", progress=False)
    assert summary.processed == len(paths) and not summary.errors
    return records_to_coco(ls.iter_records(), ls.classes)


@pytest.mark.parametrize("kind", KINDS)
def test_oracle_geometry_of_each_kind(kind, kind_presets, coco128, coco128_gt, tmp_path):
    images = [im for im in coco128_gt["images"] if im["id"] in IMAGES]
    onto, gt, paths = coco128_inputs(coco128, coco128_gt, images)
    pred = run_kind_oracle(kind, kind_presets[kind], paths, gt, onto, tmp_path / "store")
    ap = check_geometry(pred, coco128_gt, list(IMAGES), f"{kind} oracle")
    assert ap >= 0.99, ap


@pytest.mark.parametrize("orientation", sorted(INVERSE))
@pytest.mark.parametrize("kind", KINDS)
def test_oracle_geometry_of_each_kind_under_exif_rotation(kind, orientation, kind_presets, coco128, coco128_gt,
                                                          tmp_path):
    """EXIF orientations 2-8 (mirrored, rotated, transposed; 5-8 store the wide 640x248 photo tall):
    the decoded frame is the original one and the kind's boxes land on the GT."""
    classes, images, gt, paths, _ = exif_oriented_inputs(coco128, coco128_gt, (597, 64), orientation, tmp_path)
    pred = run_kind_oracle(kind, kind_presets[kind], paths, gt, Ontology.from_classes(classes), tmp_path / "store")
    ap = check_geometry(pred, coco128_gt, [im["id"] for im in images], f"{kind} oracle, EXIF {orientation}")
    assert ap >= 0.99, ap
