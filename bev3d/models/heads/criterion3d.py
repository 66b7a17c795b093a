"""The 3D set loss of DETR3D/PETR: Hungarian matching, sigmoid focal + weighted L1, at every decoder layer."""

import torch
import torch.nn as nn

from bev3d.models.heads.box_coder import encode
from bev3d.models.losses import num_boxes_across_ranks, sigmoid_focal_loss


class SetCriterion3D(nn.Module):
    def __init__(self, num_classes, matcher, cls_weight=2.0, bbox_weight=0.25, alpha=0.25, gamma=2.0,
                 code_weights=(1.0,) * 8 + (0.2, 0.2)):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.cls_weight, self.bbox_weight, self.alpha, self.gamma = cls_weight, bbox_weight, alpha, gamma
        self.register_buffer("code_weights", torch.tensor(code_weights, dtype=torch.float32), persistent=False)

    def forward(self, cls_logits, box_code, gt_boxes, gt_labels):
        """cls_logits (L, B, Q, C), box_code (L, B, Q, 10); per-sample gt_boxes (N_i, 9), gt_labels (N_i,).

        Returns {"loss_cls", "loss_bbox"} for the last layer and "d{i}.loss_*" for the earlier ones.
        """
        num_boxes = num_boxes_across_ranks(gt_labels, cls_logits.device)
        target_codes = [encode(b.to(box_code.device, torch.float32)) for b in gt_boxes]
        gt_labels = [t.to(cls_logits.device) for t in gt_labels]
        losses = {}
        L = cls_logits.shape[0]
        for layer in range(L):
            prefix = "" if layer == L - 1 else f"d{layer}."
            loss_cls, loss_bbox = self._layer_loss(cls_logits[layer], box_code[layer], target_codes, gt_labels,
                                                   num_boxes)
            losses[prefix + "loss_cls"] = loss_cls
            losses[prefix + "loss_bbox"] = loss_bbox
        return losses

    def denoising_loss(self, cls_logits, box_code, denoising):
        """The loss of the denoising queries (see denoising.py), whose targets need no matching.

        cls_logits (L, B, P, C), box_code (L, B, P, 10) -> {"dn.loss_cls", "dn.loss_bbox"} for the last layer
        and "d{i}.dn.loss_*" for the earlier ones.
        """
        positive = denoising.valid & (denoising.labels < self.num_classes)  # (B, P)
        batch_idx, query_idx = positive.nonzero(as_tuple=True)
        labels = denoising.labels[batch_idx, query_idx]
        num_boxes = num_boxes_across_ranks([labels], cls_logits.device)
        losses = {}
        L = cls_logits.shape[0]
        for layer in range(L):
            prefix = "dn." if layer == L - 1 else f"d{layer}.dn."
            loss_cls, loss_bbox = self._loss(cls_logits[layer], box_code[layer], batch_idx, query_idx, labels,
                                             denoising.targets[batch_idx, query_idx], num_boxes, denoising.valid)
            losses[prefix + "loss_cls"] = loss_cls
            losses[prefix + "loss_bbox"] = loss_bbox
        return losses

    def _layer_loss(self, cls_logits, box_code, target_codes, gt_labels, num_boxes):
        device = cls_logits.device
        indices = [(q.to(device), g.to(device)) for q, g in self.matcher(cls_logits, box_code, target_codes, gt_labels)]
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        labels = torch.cat([t[g] for t, (_, g) in zip(gt_labels, indices)])
        matched_targets = torch.cat([t[g] for t, (_, g) in zip(target_codes, indices)])
        return self._loss(cls_logits, box_code, batch_idx, query_idx, labels, matched_targets, num_boxes)

    def _loss(self, cls_logits, box_code, batch_idx, query_idx, labels, targets, num_boxes, valid=None):
        """Focal loss over all queries (only where `valid` (B, Q), when given) and weighted L1 of the
        queries (batch_idx, query_idx) against their class `labels` and encoded boxes `targets` (M, 10)."""
        onehot = torch.zeros_like(cls_logits)  # (B, Q, C): all background ...
        onehot[batch_idx, query_idx, labels] = 1.0  # ... except each assigned query's class
        if valid is None:
            loss_cls = sigmoid_focal_loss(cls_logits, onehot, self.alpha, self.gamma, num_boxes)
        else:
            loss_cls = (sigmoid_focal_loss(cls_logits, onehot, self.alpha, self.gamma) * valid[..., None]).sum()
            loss_cls = loss_cls / num_boxes
        matched = box_code[batch_idx, query_idx]  # (M, 10)
        loss_bbox = ((matched - targets).abs() * self.code_weights).sum() / num_boxes
        return self.cls_weight * loss_cls, self.bbox_weight * loss_bbox
