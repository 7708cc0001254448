from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.labeling.detector import GroundingDinoTeacher
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import TeacherPreset


class Scripted(GroundingDinoTeacher):
    """Forward returns, per chunk, one box per entry of ``script[chunk]`` = [(cxcywh, prompt, logit)]."""

    script: dict

    def forward(self, inputs, chunk):
        B, L = inputs["pixel_values"].shape[0], self.max_text_len
        logits, boxes = torch.full((B, 10, L), -10.0), torch.tensor([0.5, 0.5, 0.01, 0.01]).repeat(B, 10, 1)
        rows = {p: r for r, p in enumerate(self.chunks[chunk].prompt_ids)}
        for q, (box, prompt, logit) in enumerate(self.script.get(chunk, [])):
            boxes[:, q] = torch.tensor(box)
            logits[:, q, torch.from_numpy(self.chunks[chunk].positive_map[rows[prompt]] > 0)] = logit
        return logits, boxes


def make(tiny_teachers, names, script, **kw):
    preset = TeacherPreset.load(tiny_teachers)
    t = Scripted(preset.detector.model, Ontology.from_classes(names), device="cpu", **kw)
    t.script = script
    return t


def test_classes_in_late_chunks_are_detected_with_full_soft_vectors(tiny_teachers):
    names = [f"thing number {i}" for i in range(300)]
    t = make(tiny_teachers, names, {})
    assert len(t.chunks) >= 3
    last = len(t.chunks) - 1
    p = t.chunks[last].prompt_ids[-1]
    t.script = {last: [([0.5, 0.25, 0.2, 0.1], p, 6.0)]}
    image = np.zeros((200, 400, 3), np.uint8)
    (det,) = t([image])
    assert det.scores.shape == (1, 300)
    assert int(det.scores[0].argmax()) == p
    assert det.scores[0, p] == pytest.approx(torch.sigmoid(torch.tensor(6.0)).item(), abs=1e-6)
    # xyxy absolute pixels of the original 400x200 frame
    np.testing.assert_allclose(det.boxes[0], [160, 40, 240, 60], atol=1e-4)


def test_chunk_merge_fills_other_chunks_columns_and_nms(tiny_teachers):
    names = [f"thing number {i}" for i in range(300)]
    t = make(tiny_teachers, names, {})
    a, b = t.chunks[0].prompt_ids[0], t.chunks[1].prompt_ids[0]
    box = [0.5, 0.5, 0.4, 0.4]
    near = [0.51, 0.5, 0.4, 0.4]  # IoU ~0.95 with box
    t.script = {0: [(box, a, 3.0)], 1: [(near, b, 1.0)]}
    (det,) = t([np.zeros((100, 100, 3), np.uint8)])
    # two chunks, two classes: class-aware NMS keeps both boxes, each with both columns
    assert len(det.boxes) == 2
    top = det.scores[det.scores.max(axis=1).argmax()]
    assert top[a] == pytest.approx(float(torch.sigmoid(torch.tensor(3.0))), abs=1e-6)
    assert top[b] == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))), abs=1e-6)
    # same class twice in one chunk: NMS keeps the better one
    t.script = {0: [(box, a, 3.0), (near, a, 1.0)]}
    (det,) = t([np.zeros((100, 100, 3), np.uint8)])
    assert len(det.boxes) == 1 and det.scores[0, a] == pytest.approx(float(torch.sigmoid(torch.tensor(3.0))))


def test_floor_and_zero_detections(tiny_teachers):
    t = make(tiny_teachers, ["cat", "dog"], {0: [([0.5, 0.5, 0.2, 0.2], 0, -3.5)]}, box_floor=0.05)
    (det,) = t([np.zeros((50, 60, 3), np.uint8)])
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0, 2)  # sigmoid(-3.5)=0.029 < 0.05
    t.box_floor = 0.02
    (det,) = t([np.zeros((50, 60, 3), np.uint8)])
    assert det.boxes.shape == (1, 4)
    assert t([]) == []


def test_real_forward_runs_batched_with_mixed_sizes(tiny_teachers):
    preset = TeacherPreset.load(tiny_teachers)
    t = GroundingDinoTeacher(preset.detector.model, Ontology.from_classes(["cat", "dog"]), device="cpu",
                             image_size=preset.detector.image_size)
    dets = t([np.zeros((120, 200, 3), np.uint8), np.full((300, 100, 3), 128, np.uint8)])
    for det, (h, w) in zip(dets, [(120, 200), (300, 100)]):
        assert det.scores.shape[1] == 2
        assert (det.boxes[:, [0, 2]] <= w).all() and (det.boxes[:, [1, 3]] <= h).all() and (det.boxes >= 0).all()
        assert (det.scores.max(axis=1) >= 0.05).all()
