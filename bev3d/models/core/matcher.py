"""Hungarian (optimal one-to-one) assignment of predictions to ground truth, shared by 2D and 3D heads."""

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from bev3d.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def hungarian_assign(cost, sizes=None):
    """Minimum-cost one-to-one assignment per image -> list of (pred_idx, gt_idx) int64 tensors.

    `cost` is either batched, (B, Q, sum(sizes)) where column block i belongs to image i (`sizes[i]`
    targets), or a list of per-image (Q, T_i) matrices. Pairs are sorted by pred_idx; an image
    without targets gets two empty tensors. Costs go to the CPU in float64 (scipy's dtype).
    """
    if sizes is None:
        blocks = [c.detach().to("cpu", torch.float64) for c in cost]
    else:
        if cost.shape[-1] != sum(sizes):
            raise ValueError(f"cost has {cost.shape[-1]} target columns but sizes sum to {sum(sizes)}")
        batched = cost.detach().to("cpu", torch.float64)
        blocks = [c[i] for i, c in enumerate(batched.split(list(sizes), -1))]
    out = []
    for c in blocks:
        # NaN/inf (from diverged predictions) would make scipy raise "cost matrix is infeasible".
        c = torch.nan_to_num(c, nan=1e8, posinf=1e8, neginf=-1e8).numpy()
        rows, cols = linear_sum_assignment(c)
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def focal_class_cost(logits, labels, alpha=0.25, gamma=2.0, eps=1e-8):
    """(Q, K) logits, (T,) labels -> (Q, T): the focal loss of calling each query each target's class
    minus the focal loss of calling it background (Deformable DETR's and mmdet's FocalLossCost)."""
    prob = logits.sigmoid()[:, labels]
    neg = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """Cost = w_class * class cost + w_bbox * L1(cxcywh) + w_giou * -GIoU, all targets of a batch at once.

    outputs: `pred_logits` (B, Q, K), `pred_boxes` (B, Q, 4) normalised cxcywh; targets: per image
    `labels` (T_i,), `boxes` (T_i, 4). The class cost is -p(label) (softmax, DETR) or the focal
    cost (sigmoid, Deformable DETR).
    """

    def __init__(self, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, use_focal=False, focal_alpha=0.25,
                 focal_gamma=2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.use_focal, self.focal_alpha, self.focal_gamma = use_focal, focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs, targets):
        logits = outputs["pred_logits"].flatten(0, 1).float()  # (B*Q, K)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()  # (B*Q, 4)
        B, Q = outputs["pred_logits"].shape[:2]
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        if self.use_focal:
            c_class = focal_class_cost(logits, tgt_labels, self.focal_alpha, self.focal_gamma)
        else:
            c_class = -logits.softmax(-1)[:, tgt_labels]
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou
        return hungarian_assign(cost.view(B, Q, -1), [len(t["boxes"]) for t in targets])


def build_matcher(matcher_cfg, loss_cfg):
    return HungarianMatcher(matcher_cfg.cost_class, matcher_cfg.cost_bbox, matcher_cfg.cost_giou,
                            use_focal=loss_cfg.use_focal, focal_alpha=loss_cfg.focal_alpha,
                            focal_gamma=loss_cfg.focal_gamma)
