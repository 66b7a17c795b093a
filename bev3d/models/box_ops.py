"""2D box conversions and overlaps. Boxes are (..., 4) tensors: cxcywh or xyxy (x right, y down)."""

import torch


def box_cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(b):
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_area(b):  # xyxy (..., 4) -> (...)
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a, b):
    """Pairwise IoU of xyxy boxes a (N, 4), b (M, 4) -> iou (N, M), union (N, M)."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None] - inter
    return inter / union, union


def generalized_box_iou(a, b):
    """Pairwise GIoU (Rezatofighi et al. 2019) of xyxy boxes a (N, 4), b (M, 4) -> (N, M) in [-1, 1]."""
    if not ((a[:, 2:] >= a[:, :2]).all() and (b[:, 2:] >= b[:, :2]).all()):
        raise ValueError("generalized_box_iou needs xyxy boxes with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull
