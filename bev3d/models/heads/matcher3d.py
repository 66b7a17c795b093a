"""One-to-one assignment of 3D box predictions to ground truth (DETR3D/PETR's Hungarian matcher)."""

import torch

from bev3d.models.matcher import focal_class_cost, hungarian_assign


class HungarianMatcher3D:
    """Focal class cost + L1 cost on the first 8 code dims (centre, log-size, sin/cos; not velocity)."""

    def __init__(self, cost_class=2.0, cost_bbox=0.25, alpha=0.25, gamma=2.0):
        self.cost_class, self.cost_bbox, self.alpha, self.gamma = cost_class, cost_bbox, alpha, gamma

    @torch.no_grad()
    def __call__(self, cls_logits, box_code, target_codes, target_labels):
        """cls_logits (B, Q, C), box_code (B, Q, 10), per-sample target codes (N_i, 10) and labels (N_i,)
        -> per sample (query_index, target_index) int64 pairs of length min(Q, N_i)."""
        B, Q = cls_logits.shape[:2]
        labels = torch.cat(target_labels)
        codes = torch.cat(target_codes).float()
        cost = self.cost_class * focal_class_cost(cls_logits.flatten(0, 1).float(), labels, self.alpha, self.gamma)
        cost = cost + self.cost_bbox * torch.cdist(box_code.flatten(0, 1)[:, :8].float(), codes[:, :8], p=1)
        return hungarian_assign(cost.view(B, Q, -1), [len(t) for t in target_labels])
