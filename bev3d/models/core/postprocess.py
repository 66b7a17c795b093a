"""SetPredictions -> detections: the last decoder layer's top-k (query, class) scores, NMS-free (set prediction)."""

import torch

from bev3d.models.core.matcher import CLASS_COSTS


class PostProcess:
    """Per image {"scores" (K,), "labels" (K,), "boxes" (K, ...)}, sorted by score, K <= max_detections.

    Sigmoid classes: top-k over every (query, class) pair, so a query may give several detections.
    Softmax classes (DETR): per query the best class other than no-object (the last logit), top-k over queries.
    The box coder decodes the boxes (2D: xyxy pixels of the batch's image sizes; 3D: LiDAR boxes) and may
    drop some (3D: centres outside post_center_range).
    """

    def __init__(self, coder, class_score="focal", max_detections=100, score_threshold=0.0):
        if class_score not in CLASS_COSTS:
            raise ValueError(f"class_score must be one of {CLASS_COSTS}, got {class_score!r}")
        self.coder, self.class_score = coder, class_score
        self.max_detections, self.score_threshold = max_detections, score_threshold

    @torch.no_grad()
    def __call__(self, outputs, batch):
        """outputs: SetPredictions; batch: the collated batch (what the coder needs to decode, e.g. image sizes)."""
        scores, labels, boxes, keep = self.select(outputs.logits[-1], outputs.boxes[-1], batch)
        return [{"scores": s[k].float(), "labels": lab[k], "boxes": b[k]}
                for s, lab, b, k in zip(scores, labels, boxes, keep)]

    def select(self, logits, boxes, batch):
        """The batched tensors before the per-image filtering (what an exported graph outputs): one decoder
        layer's logits (B, Q, K) and boxes (B, Q, D) -> scores, labels (B, k), decoded boxes (B, k, ...) and
        keep (B, k), True for the detections that __call__ returns."""
        B, Q, K = logits.shape
        if self.class_score == "softmax":
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (B, Q)
            scores, query = scores.topk(min(self.max_detections, Q), dim=1)
            labels = labels.gather(1, query)
        else:
            scores, flat = logits.sigmoid().flatten(1).topk(min(self.max_detections, Q * K), dim=1)  # (B, k)
            labels, query = flat % K, flat // K
        boxes = boxes.gather(1, query[..., None].expand(-1, -1, boxes.shape[-1]))
        boxes, keep = self.coder.decode(boxes, batch)
        return scores, labels, boxes, keep & (scores > self.score_threshold)
