"""Hungarian (optimal one-to-one) assignment of predictions to ground truth, for every head."""

import torch
from scipy.optimize import linear_sum_assignment

CLASS_COSTS = ("focal", "softmax")


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


class HungarianMatcher:
    """Cost = cost_class * class cost + sum over the box coder's costs of weight * cost, for a whole batch.

    The class cost is the focal cost (sigmoid classes) or -p(label) (softmax classes, DETR). `box_costs`
    weighs the coder's costs by name (2D: "bbox" L1 and "giou"; 3D: "bbox" L1 of the code).
    """

    def __init__(self, coder, cost_class=2.0, box_costs=None, class_cost="focal", focal_alpha=0.25, focal_gamma=2.0):
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
        box_costs = dict(box_costs or {})
        if cost_class == 0 and not any(box_costs.values()):
            raise ValueError("all matcher costs are 0")
        self.coder, self.cost_class, self.box_costs = coder, cost_class, box_costs
        self.class_cost, self.focal_alpha, self.focal_gamma = class_cost, focal_alpha, focal_gamma

    @torch.no_grad()
    def __call__(self, logits, boxes, labels, targets):
        """logits (B, Q, K), boxes (B, Q, D); per image labels (T_i,) and encoded target boxes (T_i, D)
        -> per image (query_index, target_index) int64 pairs of length min(Q, T_i)."""
        B, Q = logits.shape[:2]
        flat_logits = logits.flatten(0, 1).float()  # (B*Q, K)
        all_labels = torch.cat(labels)
        if self.class_cost == "focal":
            cost = self.cost_class * focal_class_cost(flat_logits, all_labels, self.focal_alpha, self.focal_gamma)
        else:
            cost = self.cost_class * -flat_logits.softmax(-1)[:, all_labels]
        for name, c in self.coder.match_costs(boxes.flatten(0, 1), torch.cat(targets).float()).items():
            cost = cost + self.box_costs.get(name, 0.0) * c
        return hungarian_assign(cost.view(B, Q, -1), [len(t) for t in labels])
