"""The one 3D box coder of bev3d: boxes <-> regression targets, and NMS-free decoding.

Boxes are `x y z w l h yaw vx vy` in the LiDAR frame (docs/conventions.md). The regression code is
`cx cy log(w) log(l) cz log(h) sin(yaw) cos(yaw) vx vy` (the official DETR3D/PETR layout). The heads
predict centres as sigmoid fractions of `pc_range` around their reference points; `denormalize_points`
maps them to metres, so the L1 loss (weight 0.25 in the official recipes) compares metres, as there.
"""

import torch

CODE_SIZE = 10


def normalize_points(points, pc_range):
    """(..., 3) metres -> (..., 3) fractions of pc_range [x0, y0, z0, x1, y1, z1]."""
    lo = points.new_tensor(pc_range[:3])
    hi = points.new_tensor(pc_range[3:])
    return (points - lo) / (hi - lo)


def denormalize_points(points, pc_range):
    """(..., 3) fractions of pc_range -> (..., 3) metres."""
    lo = points.new_tensor(pc_range[:3])
    hi = points.new_tensor(pc_range[3:])
    return points * (hi - lo) + lo


def encode(boxes):
    """(N, 9) boxes -> (N, 10) regression targets."""
    x, y, z, w, l, h, yaw, vx, vy = boxes.unbind(-1)
    return torch.stack([x, y, w.log(), l.log(), z, h.log(), yaw.sin(), yaw.cos(), vx, vy], -1)


def decode_boxes(code):
    """(..., 10) regression code -> (..., 9) boxes; the inverse of `encode`."""
    cx, cy, log_w, log_l, cz, log_h, sin, cos, vx, vy = code.unbind(-1)
    return torch.stack([cx, cy, cz, log_w.exp(), log_l.exp(), log_h.exp(), torch.atan2(sin, cos), vx, vy], -1)


def refine_centres(code, reference):
    """(..., 10) raw box output, (..., 3) reference points as inverse-sigmoid fractions of pc_range
    -> (..., 3) box centres as fractions of pc_range: the head predicts offsets in logit space."""
    return (torch.stack([code[..., 0], code[..., 1], code[..., 4]], -1) + reference).sigmoid()


def with_centres(code, centres, pc_range):
    """Replace the centre entries of a (..., 10) raw box output with `centres` (fractions) in metres."""
    centre = denormalize_points(centres, pc_range)
    return torch.cat([centre[..., :2], code[..., 2:4], centre[..., 2:3], code[..., 5:]], -1)


class NMSFreeDecoder:
    """Top-k over (query, class) pairs, score threshold and post-centre range: no NMS (set prediction)."""

    def __init__(self, num_classes, max_num=300, score_threshold=0.0, post_center_range=None):
        self.num_classes = num_classes
        self.max_num = max_num
        self.score_threshold = score_threshold
        self.post_center_range = post_center_range

    def __call__(self, cls_logits, bbox_code):
        """cls_logits (B, Q, C), bbox_code (B, Q, 10) with centres in metres -> list of B result dicts."""
        results = []
        for logits, code in zip(cls_logits, bbox_code):
            scores = logits.sigmoid().flatten()  # (Q*C,) query-major
            k = min(self.max_num, scores.numel())
            scores, index = scores.topk(k)
            labels = index % self.num_classes
            boxes = decode_boxes(code[index // self.num_classes])  # (k, 9)
            keep = scores > self.score_threshold
            if self.post_center_range is not None:
                rng = boxes.new_tensor(self.post_center_range)
                keep &= ((boxes[:, :3] >= rng[:3]) & (boxes[:, :3] <= rng[3:])).all(1)
            results.append({"boxes": boxes[keep].float(), "scores": scores[keep].float(), "labels": labels[keep]})
        return results
