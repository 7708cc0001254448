"""LoRA on Grounding DINO: where adapters go, what trains, and that saving, reloading and
merging (the label-time path) keep the outputs."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from distillery.labeling.detector import GroundingDinoTeacher
from distillery.labeling.finetune.data import TrainImage
from distillery.labeling.finetune.detector import (
    FROZEN_PREFIXES, LORA_LEAVES, CaptionSampler, Collate, detection_model, grounding_dino_loss, make_trainable,
    parameter_counts, peft_ready, training_loss,
)
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import TeacherPreset

SIZE = {"shortest_edge": 96, "longest_edge": 144}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tiny_teachers) -> str:
    return TeacherPreset.load(tiny_teachers).detector.model


def load(base_dir):
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    return AutoProcessor.from_pretrained(base_dir), GroundingDinoForObjectDetection.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def batch(base_dir, coco128):
    from distillery.engine.images import decode

    processor, _ = load(base_dir)
    onto = Ontology.from_classes(["person", "dog", "red block"])
    sampler = CaptionSampler(onto, processor.tokenizer)
    items = []
    for i, (name, boxes, classes) in enumerate([("000000000009.jpg", [[1, 187, 612, 473], [311, 4, 631, 232]], [0, 1]),
                                                 ("000000000025.jpg", [[385, 60, 600, 357]], [2])]):
        d = decode(str(coco128 / "images" / name))
        im = TrainImage(name, name, d.height, d.width, np.asarray(boxes, np.float32), np.asarray(classes), ("a",) * 2,
                        (None,) * 2, np.zeros((0, 4), np.float32), False)
        items.append((d.pixels, sampler.target(im, random.Random(i))))
    return Collate(processor, SIZE)(items)


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_lora_adapts_encoder_decoder_linears_only(base_dir):
    _, model = load(base_dir)
    peft_model = make_trainable(model, "lora", rank=4)
    adapted = [n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(re.match(r"model\.(encoder|decoder)\.layers\.\d+\.", n) for n in adapted)
    assert {n.rsplit(".", 1)[1] for n in adapted} == set(LORA_LEAVES)  # every listed leaf exists and is adapted
    assert not [n for n in adapted if "bbox_embed" in n or n.startswith(FROZEN_PREFIXES)]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_lora_is_about_one_and_a_half_percent_of_grounding_dino_tiny():
    """The released grounding-dino-tiny architecture (transformers' default config), built on the meta device."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(GroundingDinoConfig())
    base = parameter_counts(model)["total"]
    counts = parameter_counts(make_trainable(model, "lora", rank=16))
    print(f"grounding-dino-tiny: {base:,} parameters; LoRA r=16 adds {counts['trainable']:,} "
          f"({100 * counts['fraction']:.2f}% of {counts['total']:,})")
    assert counts["total"] == base + counts["trainable"]
    assert 0.013 <= counts["fraction"] <= 0.018


def test_heads_and_full_train_what_they_say(base_dir):
    _, model = load(base_dir)
    heads = {n for n, p in make_trainable(model, "heads").named_parameters() if p.requires_grad}
    assert heads and all(re.match(r"(model\.decoder\.)?bbox_embed\.|model\.encoder_output_bbox_embed\.", n)
                         for n in heads)
    assert any(n.startswith("model.encoder_output_bbox_embed.") for n in heads)
    _, model = load(base_dir)
    full = make_trainable(model, "full")
    for n, p in full.named_parameters():
        assert p.requires_grad == (not n.startswith(FROZEN_PREFIXES)), n


def test_heads_learn_and_the_encoder_proposal_head_only_through_proposal_loss(base_dir, batch):
    _, model = load(base_dir)
    heads = make_trainable(model, "heads").train()
    detection_model(heads).loss_function = grounding_dino_loss
    loss, parts = training_loss(heads, batch)
    loss.backward()
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "loss_ce_0"} <= set(parts)
    grads = {n: p.grad for n, p in heads.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # the last box layers start at zero (Deformable DETR's init), so at step 1 only they move
    assert grads["model.encoder_output_bbox_embed.layers.2.weight"].any()
    assert grads["model.decoder.bbox_embed.0.layers.2.weight"].any()
    # transformers' own encoder loss scores detached proposals: its proposal box head gets nothing
    _, model = load(base_dir)
    stock = make_trainable(model, "heads").train()
    stock(**batch).loss.backward()
    assert stock.model.encoder_output_bbox_embed.layers[0].weight.grad is None


def test_lora_invariants_init_gradients_frozen_base_save_reload_merge(base_dir, batch, tmp_path):
    from peft import PeftModel

    _, base = load(base_dir)
    with torch.no_grad():
        ref = base(**inputs(batch))
    _, model = load(base_dir)
    lora = make_trainable(model, "lora", rank=8).eval()
    with torch.no_grad():
        out = lora(**inputs(batch))
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.pred_boxes, ref.pred_boxes), "B = 0 at init"

    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    detection_model(lora).loss_function = grounding_dino_loss
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = lora(**batch).loss
        loss.backward()
        with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
        assert with_grad == {n for n, p in lora.named_parameters() if p.requires_grad}
        assert all(".lora_" in n for n in with_grad)
        opt.step()
    for n, p in lora.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"base weight {n} changed"
    lora.eval()
    with torch.no_grad():
        trained = lora(**inputs(batch))
    assert (trained.logits.nan_to_num(0, 0, 0) - ref.logits.nan_to_num(0, 0, 0)).abs().max() > 1e-3, "it learned"

    lora.save_pretrained(tmp_path / "adapter")
    n = parameter_counts(lora)["trainable"]
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    print(f"adapter: {n:,} parameters, {size:,} bytes")
    assert 4 * n <= size <= 4 * n + 65536  # float32 weights plus the safetensors header

    _, fresh = load(base_dir)
    reloaded = PeftModel.from_pretrained(peft_ready(fresh), tmp_path / "adapter").eval()
    _, fresh = load(base_dir)
    merged = PeftModel.from_pretrained(peft_ready(fresh), tmp_path / "adapter").merge_and_unload().eval()
    teacher = GroundingDinoTeacher(base_dir, Ontology.from_classes(["x"]), device="cpu",
                                   adapter=str(tmp_path / "adapter"))
    with torch.no_grad():
        for other in (reloaded, merged, teacher.model):
            got = other(**inputs(batch))
            torch.testing.assert_close(got.logits, trained.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.pred_boxes, trained.pred_boxes, atol=1e-5, rtol=0)
    assert not [n for n, _ in teacher.model.named_parameters() if "lora_" in n], "merged at label time"
