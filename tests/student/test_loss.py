"""The soft-label loss against stock ultralytics, and what soft targets, weights and ignore
regions do on hand-built batches."""

from __future__ import annotations

import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import SegmentationModel
from ultralytics.utils.loss import v8SegmentationLoss

from distillery.student.loss import SoftSegmentationLoss

NC = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SegmentationModel("yolov8n-seg.yaml", nc=NC, verbose=False)
    m.args = get_cfg()
    m.train()
    return m


@pytest.fixture(scope="module")
def preds(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.rand(2, 3, 128, 128))


def make_batch(extra_far_box=False):
    """Image 0: two instances; image 1: one. Masks at 1/4 resolution, overlap format."""
    b = {
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0], [1.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.3, 0.4], [0.7, 0.6, 0.2, 0.3], [0.5, 0.5, 0.6, 0.6]]),
    }
    masks = torch.zeros(2, 32, 32)
    masks[0, 6:18, 5:14] = 1
    masks[0, 14:23, 19:26] = 2
    masks[1, 6:26, 6:26] = 1
    b["masks"] = masks
    return b


def soft_keys(b, soft=None, weight=None, ignore=None):
    n = b["cls"].shape[0]
    onehot = torch.nn.functional.one_hot(b["cls"].view(-1).long(), NC).float()
    return dict(b, soft=onehot if soft is None else soft, weight=torch.ones(n) if weight is None else weight,
                ignore=torch.zeros(n, dtype=torch.bool) if ignore is None else ignore)


def test_parity_with_stock_ultralytics(model, preds):
    stock, _ = v8SegmentationLoss(model)(preds, make_batch())
    ours, _ = SoftSegmentationLoss(model)(preds, soft_keys(make_batch()))
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    assert stock[:4].abs().min() > 0  # every compared term is a real number, not a trivially equal zero
    # and without the extra keys it *is* the stock loss
    plain, _ = SoftSegmentationLoss(model)(preds, make_batch())
    torch.testing.assert_close(plain, stock, rtol=0, atol=0)


def test_parity_with_an_empty_image_and_no_overlap(model, preds):
    model.args.overlap_mask = False
    try:
        b = make_batch()
        b = {k: v[2:] if k in ("batch_idx", "cls", "bboxes") else v for k, v in b.items()}  # image 0 empty
        b["masks"] = torch.zeros(1, 32, 32)
        b["masks"][0, 6:26, 6:26] = 1
        stock, _ = v8SegmentationLoss(model)(preds, b)
        ours, _ = SoftSegmentationLoss(model)(preds, soft_keys(b))
        torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    finally:
        model.args.overlap_mask = True


def test_soft_target_lowers_the_loss_of_the_runner_up_class(model):
    """A prediction confident in class 2 where the target is class 0: a soft target that gives
    class 2 some mass costs less class loss than the one-hot target, and the gradient on the
    class-2 logit pushes it down less."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, 128, 128)
    b = make_batch()
    losses, grads = [], []
    for soft2 in (0.0, 0.4):
        p = model(x)
        scores = p["scores"].detach().clone().requires_grad_(True)
        with torch.no_grad():
            scores[:, 2] = 3.0  # every anchor leans to class 2
        p = dict(p, scores=scores)
        soft = torch.nn.functional.one_hot(b["cls"].view(-1).long(), NC).float()
        soft[0] = torch.tensor([1.0 - soft2, 0.0, soft2])  # instance 0 is class 0 (GT), teacher unsure
        loss, items = SoftSegmentationLoss(model)(p, soft_keys(b, soft=soft))
        losses.append(items["cls_loss"].item())
        (g,) = torch.autograd.grad(loss.sum(), scores)
        grads.append(g[:, 2].sum().item())
    assert losses[1] < losses[0]
    assert 0 < grads[1] < grads[0]  # positive gradient = push the class-2 logit down; less of it


def test_weights_scale_box_and_mask_loss_of_their_instance(model, preds):
    b = make_batch()
    full, _ = SoftSegmentationLoss(model)(preds, soft_keys(b))
    half, _ = SoftSegmentationLoss(model)(preds, soft_keys(b, weight=torch.tensor([0.5, 0.5, 0.5])))
    # box (0), seg (1), dfl (3) scale with a uniform weight; cls (2) does not
    torch.testing.assert_close(half[[0, 1, 3]], full[[0, 1, 3]] * 0.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half[2], full[2], rtol=0, atol=1e-6)
    zero_one, _ = SoftSegmentationLoss(model)(preds, soft_keys(b, weight=torch.tensor([0.0, 1.0, 1.0])))
    assert (zero_one[[0, 1, 3]] < full[[0, 1, 3]]).all()


def test_ignore_region_removes_the_loss_of_a_prediction_inside_it(model):
    """A confident false positive far from every GT: with an ignore box over it, its class
    loss is gone -- the same as if it had predicted background there -- and nothing else changes."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, 128, 128)
    p = model(x)
    b = make_batch()
    # the ignore region: a 4th instance in image 1, the bottom-right corner up to the edges (GT of image 1 is the centre box)
    bi = {**b, "batch_idx": torch.cat([b["batch_idx"], torch.tensor([1.0])]),
          "cls": torch.cat([b["cls"], torch.tensor([[0.0]])]),
          "bboxes": torch.cat([b["bboxes"], torch.tensor([[0.94, 0.94, 0.12, 0.12]])])}
    from ultralytics.utils.tal import make_anchors

    anchors, strides = make_anchors(p["feats"], model.stride, 0.5)
    pts = anchors * strides  # pixels
    inside = ((pts[:, 0] > 0.88 * 128) & (pts[:, 1] > 0.88 * 128)).nonzero().view(-1)
    assert len(inside) > 0
    scores = p["scores"].detach().clone()
    scores[1, :, inside] = 6.0  # a confident detection of every class there
    fp = dict(p, scores=scores)
    quiet = scores.clone()
    quiet[1, :, inside] = -30.0  # the same anchors predicting background
    ign = torch.tensor([False, False, False, True])
    with_ignore, _ = SoftSegmentationLoss(model)(fp, soft_keys(bi, ignore=ign))
    without, _ = SoftSegmentationLoss(model)(fp, soft_keys(b))
    background, _ = SoftSegmentationLoss(model)(dict(p, scores=quiet), soft_keys(b))
    assert with_ignore[2] < without[2] * 0.9  # the false positive's class loss was large
    torch.testing.assert_close(with_ignore[2], background[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_ignore[[0, 1, 3]], without[[0, 1, 3]], rtol=0, atol=1e-6)
