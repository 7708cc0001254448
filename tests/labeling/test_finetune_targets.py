"""Grounding DINO training targets: GT -> targets -> labelling's post-processing gives GT back;
class <-> token spans; the loss's ignore regions."""

from __future__ import annotations

import contextlib
import copy
import io
import random

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distillery.engine.store import LabelStore
from distillery.labeling.coco import import_coco
from distillery.labeling.detector import GroundingDinoTeacher
from distillery.labeling.finetune.data import TrainImage, select_training_data
from distillery.labeling.finetune.detector import CaptionError, CaptionSampler, grounding_dino_loss
from distillery.labeling.ontology import Ontology, build_chunks
from distillery.labeling.teachers import TeacherPreset

LOGIT = 10.0


def teacher(tiny_teachers, ontology, **kw) -> GroundingDinoTeacher:
    return GroundingDinoTeacher(TeacherPreset.load(tiny_teachers).detector.model, ontology, device="cpu", **kw)


def decode_targets(t: GroundingDinoTeacher, target, height: int, width: int, extra: int = 5):
    """Raw outputs a perfect detector would give for ``target`` (query j: the j-th box, logits +10 on
    its class row's tokens; ``extra`` empty queries), through labelling's post-processing."""
    n, L = len(target.boxes), t.max_text_len
    logits = torch.full((1, n + extra, L), -LOGIT)
    boxes = torch.tensor([0.5, 0.5, 0.05, 0.05]).repeat(1, n + extra, 1)
    for j, (row, box) in enumerate(zip(target.class_labels, target.boxes)):
        logits[0, j, torch.from_numpy(target.label_map[row] > 0)] = LOGIT
        boxes[0, j] = torch.from_numpy(box)
    t.use_chunks([target.chunk])
    (det,) = t.postprocess([(logits, boxes)], [(height, width)])
    return det


def test_coco128_gt_through_targets_and_postprocessing_gives_box_ap_1(coco128, coco128_gt, tiny_teachers, tmp_path):
    ls, _ = import_coco(LabelStore(tmp_path / "store"), str(coco128 / "annotations.json"), str(coco128 / "images"))
    data = select_training_data(ls, val_fraction=0.0)
    assert data.counts["used_train"] == 128 and data.counts["positives"] == sum(
        not a["iscrowd"] for a in coco128_gt["annotations"])
    t = teacher(tiny_teachers, data.ontology, nms_iou=1.0, max_detections=300)  # NMS off: targets alone
    sampler = CaptionSampler(data.ontology, t.processor.tokenizer, t.max_text_len)
    ids = {im["file_name"]: im["id"] for im in coco128_gt["images"]}
    cat = {c["name"]: c["id"] for c in coco128_gt["categories"]}
    results, captions = [], set()
    for i, im in enumerate(data.images):
        flip = i % 2 == 1  # mirrored targets, decoded, mirrored back: the flip is exact too
        target = sampler.target(im, random.Random(i), flip=flip)
        assert target.chunk.num_tokens <= 256 and len(target.class_of_row) <= 80
        captions.add(target.chunk.text)
        det = decode_targets(t, target, im.height, im.width)
        boxes = det.boxes.copy()
        if flip:
            boxes[:, [0, 2]] = im.width - boxes[:, [2, 0]]
        for b, s in zip(boxes, det.scores):
            results.append({"image_id": ids[im.path.rsplit("/", 1)[1]], "score": float(s.max()),
                            "category_id": cat[data.ontology.classes[int(s.argmax())]],
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    assert len(captions) > 100, "each image gets its own shuffled caption"
    gt = COCO()
    gt.dataset = copy.deepcopy(coco128_gt)
    gt.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    print(f"coco128 GT -> targets -> post-processing: box AP {ev.stats[0]:.6f}, AP50 {ev.stats[1]:.6f}")
    assert ev.stats[0] == pytest.approx(1.0, abs=1e-9)


ONTOLOGY = {"red block": "red block", "Orange Block": "orange block", "Traffic Light": "traffic light",
            "light": "light", "person": "person", "pedestrian": "person", "st. bernard": "st. bernard",
            **{f"thing number {i}": f"thing {i}" for i in range(300)}}


@pytest.fixture(scope="module")
def chunked(tiny_teachers):
    return teacher(tiny_teachers, Ontology.from_mapping(ONTOLOGY))


@pytest.mark.parametrize("name", ["red block", "orange block", "traffic light", "light", "person", "st. bernard",
                                  "thing 0", "thing 299"])
def test_class_tokens_for_multiword_shared_word_mixed_case_and_chunked_ontologies(chunked, name):
    t, onto = chunked, chunked.ontology
    assert len(build_chunks(onto, t.processor.tokenizer, 256)) >= 3, "labelling chunks this ontology"
    tok = t.processor.tokenizer
    sampler = CaptionSampler(onto, tok, t.max_text_len, max_classes=80)
    k = onto.classes.index(name)
    im = TrainImage("x", "x.jpg", 100, 200, np.array([[20, 10, 60, 90]], np.float32), np.array([k]), ("i",), (None,),
                    np.zeros((0, 4), np.float32), False)
    target = sampler.target(im, random.Random(7))
    assert k in target.class_of_row and len(set(target.class_of_row)) == len(target.class_of_row) <= 80
    assert 250 <= target.chunk.num_tokens <= 256, "negatives fill the caption up to the text encoder's limit"
    ids = tok(target.chunk.text)["input_ids"]
    row = target.label_map[target.class_labels[0]]
    got = [ids[i] for i in np.flatnonzero(row)]
    prompts = [p for p, c in zip(onto.prompts, onto.prompt_class) if c == k]
    words = [w for p in prompts for w in tok(p.replace(".", " "), add_special_tokens=False)["input_ids"]]
    assert sorted(got) == sorted(words)  # every prompt of the class, nothing else (no dots, no neighbours)
    others = np.delete(target.label_map, target.class_labels[0], axis=0)
    assert not others[:, row > 0].any(), "no other class shares a token with it"
    (det,) = [decode_targets(t, target, 100, 200)]
    assert det.scores.shape == (1, len(onto.classes)) and int(det.scores[0].argmax()) == k
    assert det.scores[0, k] == pytest.approx(float(torch.sigmoid(torch.tensor(LOGIT))), abs=1e-6)
    np.testing.assert_allclose(det.boxes[0], [20, 10, 60, 90], atol=1e-3)


def test_captions_are_seeded_and_hold_every_positive(chunked):
    onto, tok = chunked.ontology, chunked.processor.tokenizer
    sampler = CaptionSampler(onto, tok, 256, max_classes=80)
    pos = [0, 4, 200, 305]
    a, ka = sampler.caption(pos, random.Random(1))
    b, kb = sampler.caption(pos, random.Random(1))
    c, kc = sampler.caption(pos, random.Random(2))
    assert a.text == b.text and ka == kb and a.text != c.text
    assert set(pos) <= set(ka) and len(set(ka)) == len(ka) and a.num_tokens <= 256
    few = CaptionSampler(onto, tok, 256, max_classes=3)
    assert len(few.caption([0], random.Random(0))[1]) == 3
    tight = CaptionSampler(onto, tok, 16, max_classes=80)
    with pytest.raises(CaptionError, match="at most 16"):
        tight.check(list(range(10)))


def test_unmatched_queries_in_ignore_regions_get_no_class_loss(tiny_teachers):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(TeacherPreset.load(tiny_teachers).detector.model)
    L = config.max_text_len
    label_map = torch.zeros(1, L)
    label_map[0, 1:3] = 1
    text_mask = torch.zeros(1, 3, L, dtype=torch.bool)
    text_mask[..., :6] = True
    logits = torch.full((1, 3, L), -float("inf"))
    logits[..., :6] = torch.tensor([[-6.0, 6.0, 6.0, -6.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
                                    [1.0, -2.0, 0.5, 1.5, -1.0, 0.0]])
    boxes = torch.tensor([[[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.1, 0.1], [0.5, 0.2, 0.1, 0.1]]])
    target = {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.25, 0.25, 0.2, 0.2]]), "label_map": label_map}

    def loss(lg, bx, tm, ignore):
        t = {**target, "ignore_boxes": torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4)}
        return grounding_dino_loss(lg, [t], "cpu", bx, config, None, tm, outputs_class=lg[None], outputs_coord=bx[None],
                                   encoder_logits=lg, encoder_pred_boxes=bx)[1]

    none = loss(logits, boxes, text_mask, [])
    ignored = loss(logits, boxes, text_mask, [[0.75, 0.75, 0.2, 0.2]])  # query 1 lies inside it
    dropped = loss(logits[:, [0, 2]], boxes[:, [0, 2]], text_mask[:, [0, 2]], [])  # as if query 1 did not exist
    assert ignored["loss_ce"] < none["loss_ce"]
    assert ignored["loss_ce"].item() == pytest.approx(dropped["loss_ce"].item(), rel=1e-6)
    assert ignored["loss_giou"].item() == pytest.approx(none["loss_giou"].item(), rel=1e-6)
    # a matched query keeps its class loss even inside an ignore region
    around_positive = loss(logits, boxes, text_mask, [[0.25, 0.25, 0.3, 0.3]])
    assert around_positive["loss_ce"].item() == pytest.approx(none["loss_ce"].item(), rel=1e-6)
