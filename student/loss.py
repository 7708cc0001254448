"""Soft-label YOLOv8-seg loss: ultralytics' ``v8SegmentationLoss`` with three changes, made
by wrapping its own parts (assigner, BCE, box loss, mask loss), never by copying its loop.

1. **Soft class targets.** ultralytics' task-aligned assignment (Feng et al., TOOD, ICCV
   2021; ``ultralytics.utils.tal.TaskAlignedAssigner``) gives each positive anchor the target
   ``one_hot(class) * s`` with ``s`` its normalised alignment metric. Here the target is
   ``soft * s``, ``soft`` being the teacher's score vector of the assigned instance.
2. **Confidence weights.** Each instance's box (CIoU + DFL) and mask losses are weighted by
   its weight ``w`` (a mapping of teacher confidence, :mod:`distillery.student.data`): the box loss's
   per-anchor weight ``s`` becomes ``s * w``, the mask loss of each positive anchor is
   multiplied by ``w``. The normaliser stays ``sum(one_hot * s)`` as in ultralytics, so soft
   targets do not rescale the loss.
3. **Ignore regions.** Instances flagged ``ignore`` are removed from assignment (never
   positives) and an anchor whose point lies inside an ignore box (ultralytics'
   ``TaskAlignedAssigner.select_candidates_in_gts``) and that is not a positive gets no
   classification loss (never a negative).

With one-hot ``soft``, ``w == 1`` and no ignore regions every number equals stock ultralytics'
loss (tested to 1e-5).

Batch keys beyond ultralytics': ``soft`` float ``(n, C)``, ``weight`` float ``(n,)``, ``ignore``
bool ``(n,)``, aligned with ``cls`` / ``bboxes`` / ``batch_idx``; without them the loss is stock.
"""

from __future__ import annotations

import torch
from ultralytics.utils.loss import v8SegmentationLoss


class _Stash:
    """Per-call state shared by the wrapped parts (set in ``loss``, cleared after)."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.batch = None
        self.box_scores = None  # (B, A, C) one-hot * s * w for the box loss
        self.norm = None  # sum(one_hot * s), ultralytics' normaliser
        self.cls_keep = None  # (B, A, 1) 0 where an anchor is in an ignore region and not positive
        self.mask_w = []  # per image with positives: weights of its positive anchors


class SoftSegmentationLoss(v8SegmentationLoss):
    """See the module docstring. Construct like ``v8SegmentationLoss(model)``."""

    def __init__(self, model, tal_topk: int = 10, tal_topk2: int | None = None):
        super().__init__(model, tal_topk, tal_topk2)
        self._s = _Stash()
        self.assigner = _SoftAssigner(self.assigner, self)
        self.bce = _IgnoringBCE(self.bce, self._s)
        self.bbox_loss = _WeightedBboxLoss(self.bbox_loss, self._s)

    def loss(self, preds, batch):
        if "soft" not in batch:
            return super().loss(preds, batch)
        self._s.batch = batch
        try:
            return super().loss(preds, batch)
        finally:
            self._s.clear()

    def single_mask_loss(self, gt_mask, pred, proto, xyxy, area):
        """ultralytics' per-image mask loss with each positive anchor's term multiplied by its
        instance weight (dividing ``area`` by ``w``, so ``w == 1`` is bit-identical)."""
        if self._s.batch is None:
            return super().single_mask_loss(gt_mask, pred, proto, xyxy, area)
        w = self._s.mask_w.pop(0).to(area.dtype)
        return super().single_mask_loss(gt_mask, pred, proto, xyxy, area / w)

    def slot_rows(self, batch, batch_size: int) -> torch.Tensor:
        """``(B, M)`` batch row of each padded target slot (-1: padding), padded exactly as
        ultralytics' ``preprocess`` pads the targets (it is reused for that; the box columns
        it rescales are not used)."""
        n = batch["cls"].shape[0]
        rows = torch.arange(1, n + 1, device=self.device, dtype=torch.float32).view(-1, 1)
        t = torch.cat((batch["batch_idx"].view(-1, 1).to(self.device).float(), rows,
                       batch["bboxes"].to(self.device).float()), 1)
        return self.preprocess(t, batch_size, scale_tensor=torch.ones(4, device=self.device))[..., 0].round().long() - 1


class _SoftAssigner(torch.nn.Module):
    """ultralytics' ``TaskAlignedAssigner`` with ignore slots masked out of ``mask_gt`` and the
    returned one-hot targets turned soft; stashes the box weights, normaliser, per-anchor
    mask weights and the ignore-region class mask for the other wrapped parts."""

    def __init__(self, assigner, owner: SoftSegmentationLoss):
        super().__init__()
        self.inner = assigner
        self.owner = owner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **kw):
        s = self.owner._s
        if s.batch is None:
            return self.inner(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **kw)
        b, dev, B = s.batch, gt_bboxes.device, pd_scores.shape[0]
        rows = self.owner.slot_rows(b, B)  # (B, M)
        soft, weight = b["soft"].to(dev).float(), b["weight"].to(dev).float()
        ignore = b["ignore"].to(dev).bool()
        r = rows.clamp(min=0)
        slot_ignore = (rows >= 0) & ignore[r]  # (B, M)
        keep_gt = mask_gt * (~slot_ignore).unsqueeze(-1).to(mask_gt.dtype)
        tl, tb, ts, fg, tgi = self.inner(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, keep_gt, **kw)

        s.norm, s.cls_keep = ts.sum().clamp(min=1), None
        if rows.shape[1] == 0:  # no targets in this batch
            s.box_scores, s.mask_w = ts, []
            return tl, tb, ts, fg, tgi
        scale = ts.amax(-1, keepdim=True)  # (B, A, 1): s on positives, 0 elsewhere
        arow = r.gather(1, tgi.long())  # (B, A) batch row of the assigned instance
        fgf = fg.to(scale.dtype)
        soft_ts = soft[arow].to(scale.dtype) * scale * fgf.unsqueeze(-1)
        w = weight[arow].to(scale.dtype) * fgf  # (B, A)
        s.box_scores = ts * w.unsqueeze(-1)
        s.mask_w = [w[i][fg[i].bool()] for i in range(B) if fg[i].any()]
        if slot_ignore.any():
            inside = self.inner.select_candidates_in_gts(anc_points, gt_bboxes, slot_ignore.unsqueeze(-1).to(mask_gt.dtype))
            in_ignore = (inside.bool() & slot_ignore.unsqueeze(-1)).any(1)  # (B, A)
            s.cls_keep = (~(in_ignore & ~fg.bool())).unsqueeze(-1).to(pd_scores.dtype)
        return tl, tb, soft_ts.to(ts.dtype), fg, tgi


class _IgnoringBCE(torch.nn.Module):
    """``BCEWithLogits(reduction='none')`` whose result is zeroed for anchors in ignore regions
    and rescaled so that ultralytics' normaliser (computed from the soft targets) becomes
    ``sum(one_hot * s)``; exactly the inner BCE when nothing is soft or ignored."""

    def __init__(self, inner, stash: _Stash):
        super().__init__()
        self.inner, self.s = inner, stash

    def forward(self, pred, target):
        loss = self.inner(pred, target)
        if self.s.batch is None:
            return loss
        if self.s.cls_keep is not None:
            loss = loss * self.s.cls_keep
        soft_norm = target.sum().clamp(min=1)
        if not torch.equal(soft_norm, self.s.norm):
            loss = loss * (soft_norm / self.s.norm)
        return loss


class _WeightedBboxLoss(torch.nn.Module):
    """ultralytics' ``BboxLoss`` fed ``one_hot * s * w`` as per-anchor weights and ultralytics'
    one-hot normaliser, instead of the soft targets."""

    def __init__(self, inner, stash: _Stash):
        super().__init__()
        self.inner, self.s = inner, stash

    def forward(self, pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, target_scores_sum,
                fg_mask, *args):
        if self.s.batch is not None:
            target_scores, target_scores_sum = self.s.box_scores, self.s.norm
        return self.inner(pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, target_scores_sum,
                          fg_mask, *args)


