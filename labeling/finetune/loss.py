"""The Grounding DINO fine-tuning loss.

transformers' own (``loss/loss_grounding_dino.py``: Hungarian matching, sigmoid focal
loss on the tokens, L1 + GIoU on boxes) on the final decoder layer and every earlier one,
with three changes. The class <-> token map is each target's ``label_map``
(:class:`distillery.labeling.finetune.detector.DetectionTarget`: labelling's token spans) rather than the one
transformers derives from the delimiters (which splits a prompt such as ``st. bernard`` in
two and cannot join the prompts of one class). The two-stage encoder proposals are scored
as mmdetection's DINO does (:func:`proposal_loss`): transformers computes that loss on
detached queries and boxes (``modeling_grounding_dino.py``, ``target = ... .detach()``), so it
trains neither the encoder nor its proposal heads. Ignore regions: an *unmatched* query
whose predicted box lies at least half inside an ignore region (intersection over the
prediction's area >= 0.5, mmdetection's ``ignore_iof_thr`` idea) is left out of the
classification loss; matched queries and box losses are unchanged. Every other unmatched
query learns "no object", which is why the data must be exhaustively reviewed (:mod:`distillery.labeling.finetune.data`).
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert

#: Intersection over the predicted box's area from which an unmatched query counts as inside an ignore region.
IGNORE_IOF = 0.5


def _ignore_aware_criterion():
    from transformers.loss.loss_grounding_dino import GroundingDinoImageLoss

    class IgnoreAwareImageLoss(GroundingDinoImageLoss):
        """transformers' criterion; unmatched queries inside ignore regions get no class loss."""

        def loss_labels(self, outputs, targets, indices, num_boxes):
            text_mask = outputs["text_mask"].clone()
            pred = box_convert(outputs["pred_boxes"].detach(), "cxcywh", "xyxy")
            for b, (t, (src, _)) in enumerate(zip(targets, indices)):
                ign = t.get("ignore_boxes")
                if ign is None or not len(ign):
                    continue
                ign = box_convert(ign, "cxcywh", "xyxy")
                lt = torch.maximum(pred[b, :, None, :2], ign[None, :, :2])
                rb = torch.minimum(pred[b, :, None, 2:], ign[None, :, 2:])
                inter = (rb - lt).clamp(min=0).prod(-1)
                area = (pred[b, :, 2:] - pred[b, :, :2]).clamp(min=1e-12).prod(-1)
                inside = (inter / area[:, None]).amax(1) >= IGNORE_IOF
                inside[src] = False  # matched queries keep their loss
                text_mask[b, inside] = False
            return super().loss_labels({**outputs, "text_mask": text_mask}, targets, indices, num_boxes)

    return IgnoreAwareImageLoss


def grounding_dino_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, outputs_class=None,
                        outputs_coord=None, encoder_logits=None, encoder_pred_boxes=None):
    """Drop-in for transformers' ``GroundingDinoForObjectDetectionLoss`` (set it as the model's
    ``loss_function``) for the decoder: the same matcher, losses and weights on the final layer
    and every earlier one, with each target's ``label_map`` in place of ``label_maps`` and
    ignore regions honoured (module docstring). The encoder proposals are scored by
    :func:`proposal_loss` instead: transformers' version of that loss runs on detached
    queries and boxes and trains nothing but the text side. Returns ``(loss, loss_dict, aux)``."""
    from transformers.loss.loss_for_object_detection import _set_aux_loss

    label_maps = tuple(t["label_map"] for t in labels)
    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps, "text_mask": text_mask}
    aux = _set_aux_loss(outputs_class, outputs_coord)
    for a in aux:
        a.update(label_maps=label_maps, text_mask=text_mask)
    outputs["auxiliary_outputs"] = aux
    loss_dict = _criterion(config, device)(outputs, labels)
    weights = _weights(config)
    for i in range(len(aux)):
        weights.update({f"{k}_{i}": w for k, w in _weights(config).items()})
    loss = sum(loss_dict[k] * w for k, w in weights.items() if k in loss_dict)
    return loss, loss_dict, aux


def _criterion(config, device):
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher

    matcher = GroundingDinoHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                            giou_cost=config.giou_cost)
    return _ignore_aware_criterion()(matcher=matcher, focal_alpha=config.focal_alpha,
                                     losses=["labels", "boxes", "cardinality"]).to(device)


def _weights(config) -> dict:
    """transformers' loss weights (its class weight is fixed at 2.0)."""
    return {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}


def proposal_loss(outputs, labels, attention_mask, config) -> tuple[torch.Tensor, dict]:
    """The two-stage encoder-proposal loss as mmdetection's DINO computes it (``pre_decoder``):
    the ``num_queries`` encoder positions with the highest class logit, their class logits
    and boxes (``sigmoid`` of the encoder box logits), both with gradients, through the same
    criterion and weights as the decoder. Padded positions (infinite box logits) are never
    selected.

    Args:
        outputs: the model's output (``enc_outputs_class`` ``(B, HW, L)``, ``enc_outputs_coord_logits``
            ``(B, HW, 4)``); labels: the targets; attention_mask: ``(B, T)`` of the captions.

    Returns:
        ``(weighted loss, {name + "_enc": value})``.
    """
    cls, coord = outputs.enc_outputs_class, outputs.enc_outputs_coord_logits
    if cls is None:  # not a two-stage model
        return torch.zeros((), device=outputs.logits.device), {}
    score = cls.max(-1).values.masked_fill(~torch.isfinite(coord).all(-1), float("-inf"))
    k = min(int(config.num_queries), score.shape[1])
    top = torch.topk(score, k, dim=1).indices
    logits = torch.gather(cls, 1, top[..., None].expand(-1, -1, cls.shape[-1]))
    boxes = torch.gather(coord, 1, top[..., None].expand(-1, -1, 4)).sigmoid()
    text_mask = torch.zeros_like(logits, dtype=torch.bool)
    text_mask[:, :, : attention_mask.shape[1]] = attention_mask[:, None, :].bool()
    label_maps = tuple(t["label_map"] for t in labels)
    enc = {"logits": logits, "pred_boxes": boxes, "label_maps": label_maps, "text_mask": text_mask}
    loss_dict = {f"{k}_enc": v for k, v in _criterion(config, logits.device)(enc, labels).items()}
    loss = sum(loss_dict[f"{k}_enc"] * w for k, w in _weights(config).items())
    return loss, loss_dict


def diverged_weights(named_parameters) -> str | None:
    """Why trained weights must not be saved, or None: the message naming how many of
    ``named_parameters`` (``(name, tensor)`` pairs) hold NaN or infinity, e.g. after a last
    step whose update diverged after its loss was checked."""
    bad = [n for n, p in named_parameters if not torch.isfinite(p).all()]
    if not bad:
        return None
    return f"{len(bad)} trained weight tensor(s) hold NaN or infinity (e.g. {bad[0]}); nothing was saved: lower --lr"

