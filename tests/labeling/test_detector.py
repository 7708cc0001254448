from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from distillery.engine.store import fingerprint
from distillery.labeling.detector import GroundingDinoTeacher, merge_agnostic
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import PresetError, TeacherPreset, labelset_spec


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class Scripted(GroundingDinoTeacher):
    """Forward returns, per chunk, one query per entry of ``script[chunk]`` =
    [(cxcywh, {prompt: logit})]; ``logit`` is one number for every token of the prompt's
    span or a list, one per token. Other queries and tokens get -10."""

    script: dict

    def forward(self, inputs, chunk):
        B, L = inputs["pixel_values"].shape[0], self.max_text_len
        logits, boxes = torch.full((B, 10, L), -10.0), torch.tensor([0.5, 0.5, 0.01, 0.01]).repeat(B, 10, 1)
        rows = {p: r for r, p in enumerate(self.chunks[chunk].prompt_ids)}
        for q, (box, spans) in enumerate(self.script.get(chunk, [])):
            boxes[:, q] = torch.tensor(box)
            for prompt, logit_ in spans.items():
                tokens = np.flatnonzero(self.chunks[chunk].positive_map[rows[prompt]])
                logits[:, q, torch.from_numpy(tokens)] = torch.tensor(logit_, dtype=torch.float32)
        return logits, boxes


def make(tiny_teachers, names, script, **kw):
    preset = TeacherPreset.load(tiny_teachers)
    onto = names if isinstance(names, Ontology) else Ontology.from_classes(names)
    t = Scripted(preset.detector.model, onto, device="cpu", **kw)
    t.script = script
    return t


def background(t: GroundingDinoTeacher, chunks) -> np.ndarray:
    """The soft vector of an instance built from queries of ``chunks`` with -10 on every
    token: sigmoid(-10) = 4.54e-5 on those chunks' classes, 0 on the others (no query)."""
    v = np.zeros(len(t.ontology.classes), np.float32)
    for k in chunks:
        v[list(t.chunks[k].prompt_ids)] = sig(-10.0)  # from_classes: prompt i is class i
    return v


BOX = [0.5, 0.5, 0.4, 0.4]  # cxcywh; on a 100x100 image xyxy [30, 30, 70, 70]
NEAR = [0.51, 0.5, 0.4, 0.4]  # xyxy [31, 30, 71, 70]: IoU 39*40 / (2*1600 - 39*40) = 0.951 with BOX
IMAGE = np.zeros((100, 100, 3), np.uint8)


def test_classes_in_late_chunks_are_detected_with_full_soft_vectors(tiny_teachers):
    names = [f"thing number {i}" for i in range(300)]
    t = make(tiny_teachers, names, {})
    assert len(t.chunks) >= 3
    last = len(t.chunks) - 1
    p = t.chunks[last].prompt_ids[-1]
    t.script = {last: [([0.5, 0.25, 0.2, 0.1], {p: 6.0})]}
    image = np.zeros((200, 400, 3), np.uint8)
    (det,) = t([image])
    assert det.scores.shape == (1, 300)
    expected = background(t, [last])
    expected[p] = sig(6.0)
    np.testing.assert_allclose(det.scores[0], expected, rtol=1e-5)
    # xyxy absolute pixels of the original 400x200 frame
    np.testing.assert_allclose(det.boxes[0], [160, 40, 240, 60], atol=1e-4)


def test_class_score_is_mean_token_probability_over_the_span_and_max_over_prompts(tiny_teachers):
    onto = Ontology.from_mapping({"traffic light": "signal", "stop light": "signal", "cat": "cat"})
    t = make(tiny_teachers, onto, {})
    (chunk,) = t.chunks
    assert [len(np.flatnonzero(r)) for r in chunk.positive_map] == [2, 2, 1]  # traffic|light, stop|light, cat
    # "traffic light": token probabilities 0.9 and 0.3 -> (0.9 + 0.3) / 2 = 0.6 (not the max 0.9, not the min 0.3)
    t.script = {0: [(BOX, {0: [logit(0.9), logit(0.3)]}), ([0.2, 0.2, 0.1, 0.1], {2: logit(0.7)})]}
    (det,) = t([IMAGE])
    order = np.argsort(det.boxes[:, 0])[::-1]  # the traffic light (x1 = 30) before the cat (x1 = 15)
    np.testing.assert_allclose(det.scores[order], [[0.6, sig(-10)], [sig(-10), 0.7]], rtol=1e-5)
    # both prompts of the class on one query: the class takes the better prompt,
    # max(mean(0.9, 0.3), mean(0.5, 0.5)) = 0.6, and max(0.6, mean(0.95, 0.55)) = 0.75
    for stop, expected in (([0.5, 0.5], 0.6), ([0.95, 0.55], 0.75)):
        t.script = {0: [(BOX, {0: [logit(0.9), logit(0.3)], 1: [logit(p) for p in stop]})]}
        (det,) = t([IMAGE])
        np.testing.assert_allclose(det.scores, [[expected, sig(-10)]], rtol=1e-5)


def test_same_object_in_two_chunks_is_one_instance_with_both_classes(tiny_teachers):
    names = [f"thing number {i}" for i in range(300)]
    t = make(tiny_teachers, names, {})
    a, b = t.chunks[0].prompt_ids[0], t.chunks[1].prompt_ids[0]
    t.script = {0: [(BOX, {a: 3.0})], 1: [(NEAR, {b: 1.0})]}
    (det,) = t([IMAGE])
    expected = background(t, [0, 1])
    expected[a], expected[b] = sig(3.0), sig(1.0)
    assert det.boxes.shape == (1, 4)
    np.testing.assert_allclose(det.boxes[0], [30, 30, 70, 70], atol=1e-4)  # the better box (chunk 0's)
    np.testing.assert_allclose(det.scores[0], expected, rtol=1e-5)
    # the better box in the later chunk: its box, the same vector
    t.script = {0: [(BOX, {a: 1.0})], 1: [(NEAR, {b: 3.0})]}
    (det,) = t([IMAGE])
    expected[a], expected[b] = sig(1.0), sig(3.0)
    np.testing.assert_allclose(det.boxes, [[31, 30, 71, 70]], atol=1e-4)
    np.testing.assert_allclose(det.scores[0], expected, rtol=1e-5)
    # same class twice in one chunk: one instance, the better score
    t.script = {0: [(BOX, {a: 3.0}), (NEAR, {a: 1.0})]}
    (det,) = t([IMAGE])
    expected = background(t, [0])
    expected[a] = sig(3.0)
    np.testing.assert_allclose(det.scores, [expected], rtol=1e-5)


def test_two_queries_with_different_argmax_on_one_object_are_one_instance(tiny_teachers):
    t = make(tiny_teachers, ["cat", "dog"], {0: [(BOX, {0: 2.0}), (NEAR, {1: 1.5})]})
    (det,) = t([IMAGE])
    np.testing.assert_allclose(det.boxes, [[30, 30, 70, 70]], atol=1e-4)
    np.testing.assert_allclose(det.scores, [[sig(2.0), sig(1.5)]], rtol=1e-5)


def test_distinct_objects_stay_distinct(tiny_teachers):
    # xyxy [10, 30, 50, 70] and [20, 30, 60, 70]: IoU 30*40 / (2*1600 - 30*40) = 0.6 < nms_iou 0.7
    left, right = [0.3, 0.5, 0.4, 0.4], [0.4, 0.5, 0.4, 0.4]
    for classes in ((0, 1), (0, 0)):
        t = make(tiny_teachers, ["cat", "dog"], {0: [(left, {classes[0]: 2.0}), (right, {classes[1]: 1.0})]})
        (det,) = t([IMAGE])
        np.testing.assert_allclose(det.boxes, [[10, 30, 50, 70], [20, 30, 60, 70]], atol=1e-4)
        expected = np.full((2, 2), sig(-10.0))
        expected[0, classes[0]], expected[1, classes[1]] = sig(2.0), sig(1.0)
        np.testing.assert_allclose(det.scores, expected, rtol=1e-5)


def test_a_removed_box_joins_the_best_kept_box_that_overlaps_it():
    # A and B overlap at IoU 32*40 / (3200 - 1280) = 0.667 (both kept); C overlaps each at
    # 36*40 / (3200 - 1440) = 0.818: NMS removes it on behalf of A, the better one.
    boxes = torch.tensor([[0, 0, 40, 40], [8, 0, 48, 40], [4, 0, 44, 40]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.1, 0.5]])
    keep, merged = merge_agnostic(boxes, scores, 0.7)
    assert keep.tolist() == [0, 1]
    np.testing.assert_allclose(merged.numpy(), [[0.9, 0.1, 0.5], [0.0, 0.8, 0.0]])
    keep, merged = merge_agnostic(boxes[:0], scores[:0], 0.7)
    assert keep.shape == (0,) and merged.shape == (0, 3)


def test_class_aware_option_keeps_one_box_per_class(tiny_teachers):
    names = [f"thing number {i}" for i in range(300)]
    t = make(tiny_teachers, names, {}, merge="class-aware")
    a, b = t.chunks[0].prompt_ids[0], t.chunks[1].prompt_ids[0]
    t.script = {0: [(BOX, {a: 3.0})], 1: [(NEAR, {b: 1.0})]}
    (det,) = t([IMAGE])
    # two classes, two instances; each has the other chunk's column filled in
    np.testing.assert_allclose(det.boxes, [[30, 30, 70, 70], [31, 30, 71, 70]], atol=1e-4)
    np.testing.assert_allclose(det.scores[:, [a, b]], [[sig(3.0), sig(1.0)]] * 2, rtol=1e-5)
    t.script = {0: [(BOX, {a: 3.0}), (NEAR, {a: 1.0})]}
    (det,) = t([IMAGE])
    np.testing.assert_allclose(det.boxes, [[30, 30, 70, 70]], atol=1e-4)
    with pytest.raises(ValueError, match="merge must be one of agnostic, class-aware, got 'nms'"):
        make(tiny_teachers, ["cat"], {}, merge="nms")


def test_merge_mode_is_in_the_preset_and_the_label_set_fingerprint(tiny_teachers, tmp_path):
    preset = TeacherPreset.load(tiny_teachers)
    assert preset.detector.merge == "agnostic"
    onto = Ontology.from_classes(["cat", "dog"])
    agnostic = labelset_spec(onto, preset)
    preset.detector.merge = "class-aware"
    aware = labelset_spec(onto, preset)
    assert agnostic["thresholds"]["merge"] == "agnostic" and aware["thresholds"]["merge"] == "class-aware"
    assert fingerprint(agnostic) != fingerprint(aware)
    data = yaml.safe_load(tiny_teachers.read_text())
    data["detector"].update(model=str(tiny_teachers.parent / "grounding-dino"), merge="nms")
    data["segmenter"]["checkpoint"] = str(tiny_teachers.parent / "sam_vit_tiny.pth")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(PresetError, match="detector.merge: must be one of agnostic, class-aware, got 'nms'") as e:
        TeacherPreset.load(bad)
    assert str(bad) in str(e.value)


def test_floor_and_zero_detections(tiny_teachers):
    t = make(tiny_teachers, ["cat", "dog"], {0: [([0.5, 0.5, 0.2, 0.2], {0: -3.5})]}, box_floor=0.05)
    (det,) = t([np.zeros((50, 60, 3), np.uint8)])
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0, 2)  # sigmoid(-3.5)=0.029 < 0.05
    t.box_floor = 0.02
    (det,) = t([np.zeros((50, 60, 3), np.uint8)])
    assert det.boxes.shape == (1, 4)
    assert t([]) == []


def test_real_forward_runs_batched_with_mixed_sizes(tiny_teachers):
    """Each detection is a query of the real model's raw output, converted by hand: box
    cxcywh * (w, h) of its own image, best class score the sigmoid of its class token."""
    preset = TeacherPreset.load(tiny_teachers)
    t = GroundingDinoTeacher(preset.detector.model, Ontology.from_classes(["cat", "dog"]), device="cpu",
                             image_size=preset.detector.image_size)
    images = [np.zeros((120, 200, 3), np.uint8), np.full((300, 100, 3), 128, np.uint8)]
    dets = t(images)
    tokens = t.processor.tokenizer.convert_ids_to_tokens(t._text[0]["input_ids"][0])
    assert tokens[1] == "cat" and tokens[3] == "dog"
    logits, raw = t.forward(t.preprocess(images), 0)
    for i, (det, (h, w)) in enumerate(zip(dets, [(120, 200), (300, 100)])):
        cx, cy, bw, bh = raw[i].unbind(1)
        xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
        xyxy = torch.minimum(xyxy.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32)).numpy()
        best = torch.sigmoid(logits[i][:, [1, 3]]).max(dim=1).values.numpy()
        expected_n = min(int((best >= 0.05).sum()), t.max_detections)
        assert 0 < len(det.boxes) <= expected_n and det.scores.shape == (len(det.boxes), 2)
        for box, score in zip(det.boxes, det.scores):
            same = (np.abs(xyxy - box).max(axis=1) < 1e-3) & (np.abs(best - score.max()) < 1e-5)
            assert same.any(), f"image {i}: detection {box} {score} is no query of the raw output"
        # best first: the first detection is the best query overall
        assert det.scores[0].max() == pytest.approx(best.max(), abs=1e-5)
