"""2D detections from set predictions: normalised cxcywh boxes -> absolute xyxy pixels."""

import torch

from bev3d.models.box_ops import box_cxcywh_to_xyxy


def _to_pixels(boxes, sizes):
    """boxes (B, K, 4) normalised cxcywh, sizes (B, 2) as (H, W) -> (B, K, 4) xyxy pixels inside the image."""
    h, w = sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], -1)[:, None].to(boxes.dtype)
    return torch.min(box_cxcywh_to_xyxy(boxes).clamp(min=0, max=1) * scale, scale)


def postprocess_softmax(logits, boxes, sizes, max_detections=100, score_threshold=0.0):
    """DETR: per query the best class other than no-object (the last logit) -> list of per-image dicts."""
    prob = logits.softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)  # (B, Q)
    keep = min(max_detections, scores.shape[1])
    scores, order = scores.topk(keep, dim=1)
    labels = labels.gather(1, order)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    return _pack(scores, labels, _to_pixels(boxes, sizes), score_threshold)


def postprocess_sigmoid(logits, boxes, sizes, max_detections=100, score_threshold=0.0):
    """Deformable DETR: top-k over all (query, class) pairs of sigmoid scores; a query may give several
    detections with different classes."""
    B, Q, K = logits.shape
    scores, flat = logits.sigmoid().flatten(1).topk(min(max_detections, Q * K), dim=1)  # (B, k)
    labels = flat % K
    boxes = boxes.gather(1, (flat // K)[..., None].expand(-1, -1, 4))
    return _pack(scores, labels, _to_pixels(boxes, sizes), score_threshold)


def _pack(scores, labels, boxes, score_threshold):
    out = []
    for s, lab, b in zip(scores, labels, boxes):
        keep = s > score_threshold
        out.append({"scores": s[keep], "labels": lab[keep], "boxes": b[keep]})
    return out
