"""SAM mask-decoder fine-tuning on coco128 photos with the tiny (random-weight) SAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import sigmoid_focal_loss

from distillery.engine.images import decode
from distillery.engine.record import LabelRecord
from distillery.labeling.coco import coco_to_records
from distillery.labeling.finetune.sam import (
    EmbeddingCache,
    SamFinetuneError,
    SamSample,
    finetune_sam,
    jitter_boxes,
    mask_miou,
    predict_masks,
    sam_loss,
    samples_from_records,
)
from distillery.labeling.segmenter import SamTeacher, load_sam
from distillery.labeling.tiny import write_tiny_sam

# Four coco128 photos whose five objects fill their boxes well (mask / box area > 0.6):
# a decoder trained from random weights gets past box-shaped masks in a few hundred
# steps. Measured (CPU, seed 0): mIoU 0.126 before, 0.794 after 60 epochs (180 steps).
TRAIN_IDS = (42, 78, 400, 502)


def coco_samples(coco128, coco128_gt, ids) -> list[SamSample]:
    sub = dict(coco128_gt, images=[im for im in coco128_gt["images"] if im["id"] in ids],
               annotations=[a for a in coco128_gt["annotations"] if a["image_id"] in ids])
    _, records, _ = coco_to_records(sub, coco128 / "images")
    return samples_from_records(records)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft-sam")
    return {"dir": d, "base": write_tiny_sam(d / "base.pth", seed=0), "emb": d / "emb"}


@pytest.fixture(scope="module")
def trained(work, coco128, coco128_gt):
    """One training run shared by the tests below (60 epochs of 3 steps, batch 2)."""
    train = coco_samples(coco128, coco128_gt, TRAIN_IDS)
    out, state = work["dir"] / "trained.pth", work["dir"] / "trained.state"
    history = finetune_sam("vit_tiny", str(work["base"]), train, [], out, epochs=60, lr=3e-3, batch=2, seed=0,
                           device="cpu", state_path=state, embedding_dir=work["emb"])
    return {"train": train, "out": out, "state": state, "history": history}


def test_training_raises_mask_miou_from_below_02_to_06(work, trained):
    train = trained["train"]
    assert (len(train), sum(len(s.boxes) for s in train)) == (4, 5)
    base, tuned = load_sam("vit_tiny", str(work["base"])), load_sam("vit_tiny", str(trained["out"]))
    # same frozen encoder, so the training run's embedding files serve both
    cache = EmbeddingCache(base, work["emb"], torch.device("cpu"))
    assert EmbeddingCache(tuned, work["emb"], torch.device("cpu")).dir == cache.dir
    assert len(list(cache.dir.glob("*.pt"))) == 4
    before = mask_miou(base, train, "cpu", cache=cache)
    after = mask_miou(tuned, train, "cpu", cache=cache)
    assert before < 0.2 and after >= 0.6, (before, after)
    epochs = trained["history"]["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, 61)) and {e["steps"] for e in epochs} == {3}
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert epochs[-1]["val_miou"] is None and trained["history"]["train_instances"] == 5


def test_only_the_mask_decoder_changes_by_default(work, trained):
    base = torch.load(work["base"], weights_only=True)
    tuned = torch.load(trained["out"], weights_only=True)
    assert base.keys() == tuned.keys()
    for k in base:
        if k.startswith("mask_decoder."):
            assert not torch.equal(base[k], tuned[k]), k
        else:
            assert torch.equal(base[k], tuned[k]), k
    assert trained["history"]["trained"] == ["mask_decoder"]


def test_checkpoint_loads_and_labels_like_the_trained_model(work, trained):
    # the model as training left it: base weights + the decoder of the last epoch's state
    model = load_sam("vit_tiny", str(work["base"]))
    state = torch.load(trained["state"], weights_only=True)
    model.mask_decoder.load_state_dict(state["modules"]["mask_decoder"])
    # the labelling path: load_sam -> build_sam_vit_tiny(checkpoint=...) and SamPredictor
    # (without the small-region clean-up, which predict_masks does not do)
    teacher = SamTeacher("vit_tiny", str(trained["out"]), device="cpu", min_region_area=0)
    for k, v in model.state_dict().items():
        assert torch.equal(teacher.sam.state_dict()[k], v), k
    assert_labels_like_the_trained_model(teacher, model, EmbeddingCache(model, work["emb"], torch.device("cpu")),
                                         trained["train"][:2])


def assert_labels_like_the_trained_model(teacher, model, cache, samples) -> None:
    """The labelling teacher's masks for each sample's boxes equal the in-memory trained model's
    (``predict_masks``), pixel for pixel, and are not empty."""
    for s in samples:
        rles, _ = teacher(decode(s.path).pixels, s.boxes)
        ours = predict_masks(model, cache, s)
        labelled = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
        assert ours.shape == labelled.shape == (len(s.boxes), s.height, s.width)
        assert ours.any() and np.array_equal(ours, labelled)


def test_box_jitter_std_is_10_percent_of_side_capped_at_20px():
    n = 20000
    # 100 x 400 box: sigma 10 px for x, 40 -> capped at 20 px for y; far from the frame edges
    box = np.array([[1000.0, 1000.0, 1100.0, 1400.0]], np.float32)
    out = jitter_boxes(np.repeat(box, n, 0), np.random.default_rng(7), (4000, 4000))
    expected = box + np.random.default_rng(7).standard_normal((n, 4)) * np.array([10.0, 20.0, 10.0, 20.0])
    np.testing.assert_allclose(out, expected, atol=1e-3)
    std = (out - box).std(0)
    np.testing.assert_allclose(std, [10, 20, 10, 20], rtol=0.03)
    # a small box near the corner: noise 10% of 20 px = 2 px, clipped to the frame, corners ordered
    small = jitter_boxes(np.array([[1.0, 1.0, 21.0, 21.0]] * n), np.random.default_rng(0), (30, 40))
    assert small.min() == 0.0 and (small[:, 2] >= small[:, 0]).all() and (small[:, 3] >= small[:, 1]).all()
    np.testing.assert_allclose(small[:, 2].std(), 2.0, rtol=0.03)


def test_loss_is_20_focal_plus_dice_plus_iou_mse():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[-2.0, -0.5], [-1.0, -4.0]]]])
    targets = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    iou_pred = torch.tensor([[0.7], [0.4]])
    out = sam_loss(logits, targets, iou_pred)
    focal = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none").flatten(1).mean(1)
    p = torch.sigmoid(logits).flatten(1).double()
    t = targets.flatten(1).double()
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    # mask 0 predicts {(0,0), (1,0)} vs target {(0,0), (0,1)}: IoU 1/3; mask 1: both empty -> 1
    mse = torch.tensor([(0.7 - 1 / 3) ** 2, (0.4 - 1.0) ** 2], dtype=torch.float64)
    np.testing.assert_allclose(out["loss"].detach().numpy(), (20 * focal.double() + dice + mse).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["iou_mse"].numpy(), mse.numpy(), rtol=1e-6)


def test_resume_after_one_epoch_equals_two_epochs_in_one_go(work, coco128, coco128_gt):
    train = coco_samples(coco128, coco128_gt, TRAIN_IDS[:2])
    d, kw = work["dir"], dict(lr=1e-3, batch=1, seed=3, train_prompt_encoder=True, device="cpu",
                              embedding_dir=work["emb"])
    whole = finetune_sam("vit_tiny", str(work["base"]), train, train, d / "whole.pth", epochs=2, **kw)
    finetune_sam("vit_tiny", str(work["base"]), train, train, d / "first.pth", epochs=1, state_path=d / "r.state", **kw)
    seen = []
    resumed = finetune_sam("vit_tiny", str(work["base"]), train, train, d / "resumed.pth", epochs=2,
                           resume_state=d / "r.state", state_path=d / "r.state", on_epoch=seen.append, **kw)
    assert [e["epoch"] for e in seen] == [2] and resumed["epochs"] == whole["epochs"]
    a, b = torch.load(d / "whole.pth", weights_only=True), torch.load(d / "resumed.pth", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    base = torch.load(work["base"], weights_only=True)
    assert not torch.equal(a["prompt_encoder.point_embeddings.2.weight"], base["prompt_encoder.point_embeddings.2.weight"])
    assert torch.equal(a["image_encoder.patch_embed.proj.weight"], base["image_encoder.patch_embed.proj.weight"])
    with pytest.raises(SamFinetuneError, match="lr was 0.001, this run has 0.002"):
        finetune_sam("vit_tiny", str(work["base"]), train, [], d / "x.pth", epochs=3,
                     resume_state=d / "r.state", **{**kw, "lr": 2e-3})


def test_samples_from_records_keeps_chosen_non_crowd_instances_and_checks_frames(coco128, work):
    path = str(coco128 / "images" / "000000000042.jpg")
    h, w = 478, 640  # image 42's EXIF-corrected frame (COCO: height 478, width 640)
    arrays = np.zeros((4, h, w), np.uint8)
    for a, (y, x) in zip(arrays, [(10, 10), (100, 100), (200, 200), (300, 300)]):
        a[y : y + 20, x : x + 30] = 1
    masks = [mask_utils.encode(np.asfortranarray(a)) for a in arrays]
    boxes = np.array([[10, 10, 40, 30], [100, 100, 130, 120], [200, 200, 200, 220], [300, 300, 330, 320]], np.float32)
    rec = LabelRecord(image_id="", path=path, width=w, height=h, num_classes=1, boxes=boxes, masks=masks,
                      iscrowd=np.array([False, True, False, False]))
    failed = LabelRecord.failed("/nowhere.jpg", "missing: file not found", 1)
    out = samples_from_records([rec, failed], lambda r: np.array([True, True, True, False]))
    # crowd (1), zero-width box (2) and the filtered-out instance (3) are dropped
    assert len(out) == 1 and out[0].boxes.tolist() == [[10, 10, 40, 30]] and out[0].masks == masks[:1]
    with pytest.raises(SamFinetuneError, match=r"instance_filter returned shape \(2,\), expected \(4,\)"):
        samples_from_records([rec], lambda r: np.ones(2, bool))
    wrong = SamSample(path, w, h, boxes[:1], [mask_utils.encode(np.zeros((w, h), np.uint8, order="F"))])  # H, W swapped
    cache = EmbeddingCache(load_sam("vit_tiny", str(work["base"])), None, torch.device("cpu"))
    with pytest.raises(SamFinetuneError, match=r"decoded frame is 478x640 \(HxW\), the sample says 640x478"):
        cache(wrong)
