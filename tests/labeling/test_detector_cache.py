"""One image-backbone pass per image batch: the cached path equals transformers' plain call,
chunk by chunk, with and without a LoRA adapter, and runs the Swin backbone once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.engine.images import decode
from distillery.labeling.detector import GroundingDinoTeacher
from distillery.labeling.detector_cache import ImageFeatureCache
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import TeacherPreset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: 300 classes of 3 words: over the 256-token caption, so several prompt chunks
ONTOLOGY = Ontology.from_classes([f"thing number {i}" for i in range(300)])


@pytest.fixture(scope="module")
def photos(coco128) -> list[np.ndarray]:
    """Two coco128 photos of different sizes (padding in the batch: a real pixel mask)."""
    paths = sorted((coco128 / "images").glob("*.jpg"))[:2]
    images = [decode(str(p)).pixels for p in paths]
    assert images[0].shape != images[1].shape
    return images


def teachers(tiny_teachers, **kw) -> tuple[GroundingDinoTeacher, GroundingDinoTeacher]:
    d = TeacherPreset.load(tiny_teachers).detector
    make = lambda reuse: GroundingDinoTeacher(d.model, ONTOLOGY, device="cpu", image_size=d.image_size,  # noqa: E731
                                              reuse_image_features=reuse, **kw)
    return make(True), make(False)


def count_calls(module: torch.nn.Module) -> list[int]:
    n = [0]
    module.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def text(t: GroundingDinoTeacher, chunk: int, batch: int) -> dict:
    """The tokenized caption of ``chunk`` for a batch of ``batch`` images, as the teacher passes it."""
    return {k: v.expand(batch, -1) for k, v in t._text[chunk].items()}


def assert_same(cached: GroundingDinoTeacher, plain: GroundingDinoTeacher, photos) -> None:
    """Raw outputs of every chunk and the merged detections agree within 1e-5."""
    k = len(cached.chunks)
    assert k >= 2
    swin_cached = count_calls(cached.model.model.backbone.conv_encoder.model)
    swin_plain = count_calls(plain.model.model.backbone.conv_encoder.model)
    got, want = cached(photos), plain(photos)
    assert (swin_cached[0], swin_plain[0]) == (1, k)  # once per image batch vs once per chunk
    assert cached.image_cache.calls["backbone"] == 1
    assert cached.image_cache.calls["input_proj_vision.3"] == 1  # the extra level, on the cached map
    for g, w in zip(got, want):
        assert len(w.boxes) > 0
        np.testing.assert_allclose(g.boxes, w.boxes, atol=1e-5, rtol=0)
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-5, rtol=0)
    inputs = cached.preprocess(photos)
    with cached.image_cache.reuse():
        raw = [cached.forward(inputs, c) for c in range(k)]
    for c in range(k):
        for a, b in zip(raw[c], plain.forward(inputs, c)):
            torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), atol=1e-5, rtol=0)
    assert raw[0][0][0, :, 0].ne(raw[1][0][0, :, 0]).any(), "chunks differ: the text is not cached"


def test_cached_chunks_equal_the_plain_model_call(tiny_teachers, photos):
    cached, plain = teachers(tiny_teachers)
    assert_same(cached, plain, photos)
    # after the block the model is the plain transformers model again (training uses it)
    backbone = cached.model.model.backbone
    assert "forward" not in backbone.__dict__
    swin = count_calls(backbone.conv_encoder.model)
    inputs = cached.preprocess(photos)
    with torch.inference_mode():
        for c in range(2):
            cached.model(**inputs, **text(cached, c, 2))
    assert swin[0] == 2


def test_cached_chunks_equal_the_plain_call_with_a_lora_adapter(tiny_teachers, photos, tmp_path):
    from transformers import GroundingDinoForObjectDetection

    from distillery.labeling.finetune.detector import make_trainable

    base = TeacherPreset.load(tiny_teachers).detector.model
    lora = make_trainable(GroundingDinoForObjectDetection.from_pretrained(base), "lora", rank=4)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter something to change
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    cached, plain = teachers(tiny_teachers, adapter=str(tmp_path / "adapter"))
    assert_same(cached, plain, photos)
    base_teacher, _ = teachers(tiny_teachers)
    inputs = cached.preprocess(photos)
    adapted, unadapted = cached.forward(inputs, 0)[0], base_teacher.forward(inputs, 0)[0]
    assert (adapted.nan_to_num(0, 0, 0) - unadapted.nan_to_num(0, 0, 0)).abs().max() > 1e-2, "the adapter is applied"


def test_a_new_image_batch_in_one_block_is_computed_not_reused(tiny_teachers, photos):
    cached, _ = teachers(tiny_teachers)
    a, b = cached.preprocess(photos[:1]), cached.preprocess(photos[1:])
    with torch.inference_mode():
        want = [cached.model(**x, **text(cached, 0, 1)).pred_boxes for x in (a, b)]
    with torch.inference_mode(), cached.image_cache.reuse():
        got = [cached.model(**x, **text(cached, 0, 1)).pred_boxes for x in (a, b, a)]
        with pytest.raises(RuntimeError, match="already active"):
            with cached.image_cache.reuse():
                pass
    assert cached.image_cache.calls["backbone"] == 2  # a, b; the second a is reused
    for g, w in zip(got, [*want, want[0]]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="expected a transformers Grounding DINO model, got Linear"):
        ImageFeatureCache(torch.nn.Linear(2, 2))
