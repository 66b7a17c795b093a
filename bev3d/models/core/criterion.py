"""Set prediction losses (DETR / Deformable DETR) and the sigmoid focal loss the 3D heads share."""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bev3d.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from bev3d.models.matcher import build_matcher


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, num_boxes=None):
    """Focal loss (Lin et al. 2017) of logits against {0, 1} targets of the same shape.

    Elementwise when `num_boxes` is None, else summed and divided by `num_boxes` (the number of
    ground-truth boxes, so the loss does not scale with the number of queries). alpha < 0 disables
    the class balancing.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss if num_boxes is None else loss.sum() / num_boxes


def num_boxes_across_ranks(labels, device):
    """Number of targets in `labels` (a list of per-image tensors) averaged over DDP ranks, at least 1:
    every rank divides by the same number, so gradients match single-process training."""
    count = torch.tensor(float(sum(len(t) for t in labels)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


class SetCriterion(nn.Module):
    """Hungarian-matched set loss at the final layer, every auxiliary decoder layer and the two-stage proposals.

    outputs: `pred_logits` (B, Q, K or K+1), `pred_boxes` (B, Q, 4) normalised cxcywh, optional
    `aux_outputs` (list of such dicts, first layer first) and `enc_outputs` (two-stage proposals,
    class-agnostic). targets: per image `labels` (T_i,) int64 and `boxes` (T_i, 4) normalised cxcywh.

    Returns weighted losses `loss_cls`, `loss_bbox`, `loss_giou` (+ `d{i}.` for auxiliary layer i,
    `enc.` for proposals) and the unweighted, gradient-free `cardinality_error` (a log value, not a loss).
    """

    def __init__(self, num_classes, matcher, cls_weight=1.0, bbox_weight=5.0, giou_weight=2.0, use_focal=False,
                 focal_alpha=0.25, focal_gamma=2.0, no_object_weight=0.1):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.cls_weight, self.bbox_weight, self.giou_weight = cls_weight, bbox_weight, giou_weight
        self.use_focal, self.focal_alpha, self.focal_gamma = use_focal, focal_alpha, focal_gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight  # down-weights the many unmatched (no-object) queries
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(self, outputs, targets):
        num_boxes = num_boxes_across_ranks([t["labels"] for t in targets], outputs["pred_logits"].device)
        losses = self._layer_losses(outputs, targets, num_boxes, "")
        losses["cardinality_error"] = self._cardinality(outputs["pred_logits"], targets)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._layer_losses(aux, targets, num_boxes, f"d{i}."))
        if outputs.get("enc_outputs") is not None:
            # Proposals are scored for objectness only: every target counts as class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._layer_losses(outputs["enc_outputs"], binary, num_boxes, "enc."))
        return losses

    def _layer_losses(self, outputs, targets, num_boxes, prefix):
        indices = self.matcher(outputs, targets)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]  # (B, Q, K'), (B, Q, 4)
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        labels = torch.cat([t["labels"][g.to(t["labels"].device)] for t, (_, g) in zip(targets, indices)])
        matched_boxes = torch.cat([t["boxes"][g.to(t["boxes"].device)] for t, (_, g) in zip(targets, indices)])

        if self.use_focal:
            onehot = torch.zeros_like(logits)
            onehot[batch_idx, query_idx, labels] = 1.0
            loss_cls = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, num_boxes)
        else:
            classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
            classes[batch_idx, query_idx] = labels
            loss_cls = F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight.to(logits.dtype))

        pred = boxes[batch_idx, query_idx]  # (M, 4)
        loss_bbox = F.l1_loss(pred, matched_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(matched_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {prefix + "loss_cls": self.cls_weight * loss_cls, prefix + "loss_bbox": self.bbox_weight * loss_bbox,
                prefix + "loss_giou": self.giou_weight * loss_giou}

    @torch.no_grad()
    def _cardinality(self, logits, targets):
        """Mean |number of predicted objects - number of targets| per image."""
        if self.use_focal:
            count = (logits.sigmoid().amax(-1) > 0.5).sum(1)
        else:
            count = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        expected = torch.tensor([len(t["labels"]) for t in targets], device=logits.device)
        return (count.float() - expected.float()).abs().mean()


def build_criterion(model_cfg, num_classes):
    loss = model_cfg.loss
    return SetCriterion(num_classes, build_matcher(model_cfg.matcher, loss), loss.cls_weight, loss.bbox_weight,
                        loss.giou_weight, loss.use_focal, loss.focal_alpha, loss.focal_gamma, loss.no_object_weight)
