"""The one 3D box coder of bev3d: boxes <-> regression targets, matching costs, losses, NMS-free decoding.

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


class BoxCoder3D:
    """The core's view of 3D boxes: targets (N, 9) encode to the (N, 10) code the heads predict.

    Matching costs L1 on the first 8 code entries (not velocity); the loss is L1 weighted per entry by
    `code_weights`. Decoding keeps the boxes whose centre lies in `post_center_range`.
    """

    code_size = CODE_SIZE
    reference_size = 3  # denoising queries start from a centre (fractions of pc_range)

    def __init__(self, pc_range, code_weights=(1.0,) * 8 + (0.2, 0.2), post_center_range=None):
        if len(code_weights) != CODE_SIZE:
            raise ValueError(f"code_weights needs {CODE_SIZE} entries (one per code entry), got {len(code_weights)}")
        self.pc_range, self.code_weights = list(pc_range), list(code_weights)
        self.post_center_range = post_center_range

    def encode(self, boxes):
        return encode(boxes.float())

    def match_costs(self, boxes, targets):
        """(N, 10) predictions, (T, 10) encoded targets -> {"bbox": (N, T)}."""
        return {"bbox": torch.cdist(boxes[:, :8].float(), targets[:, :8], p=1)}

    def losses(self, boxes, targets, num_boxes):
        """(M, 10) matched predictions and encoded targets -> {"loss_bbox"} summed over boxes / num_boxes."""
        weights = boxes.new_tensor(self.code_weights)
        return {"loss_bbox": ((boxes - targets).abs() * weights).sum() / num_boxes}

    def decode(self, boxes, batch):
        """(B, K, 10) codes -> (B, K, 9) LiDAR boxes and (B, K) True where the centre is in post_center_range."""
        boxes = decode_boxes(boxes).float()
        keep = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
        if self.post_center_range is not None:
            rng = boxes.new_tensor(self.post_center_range)
            keep = ((boxes[..., :3] >= rng[:3]) & (boxes[..., :3] <= rng[3:])).all(-1)
        return boxes, keep

    def jitter(self, boxes, groups, noise):
        """(n, 9) boxes -> `groups` noisy centres (G, n, 3) as fractions of pc_range, each moved by up to
        `noise` half extents along x, y, z, and the norm of that move in half extents (G, n)."""
        # half extents along x, y, z as if the yaw were 0: the noise scale, not a box
        half = torch.stack([boxes[:, 4], boxes[:, 3], boxes[:, 5]], -1) / 2  # (n, 3) l, w, h
        shift = (torch.rand(groups, len(boxes), 3) * 2 - 1) * noise  # in half extents
        centres = boxes[None, :, :3] + shift * half
        return normalize_points(centres, self.pc_range).clamp(0, 1), shift.norm(dim=-1)
