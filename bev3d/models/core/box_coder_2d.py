"""The 2D box coder: normalised cxcywh boxes (DETR), L1 + GIoU costs and losses, decoding to pixels."""

import torch
import torch.nn.functional as F

from bev3d.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class BoxCoder2D:
    """Targets and predictions are (N, 4) cxcywh in [0, 1] of the unpadded image; decoding gives xyxy pixels
    of the image size the batch names (`orig_size`, else `img_shape`)."""

    code_size = 4
    reference_size = 4  # denoising queries start from a noisy box

    def encode(self, boxes):
        return boxes.float()

    def match_costs(self, boxes, targets):
        """(N, 4) predictions, (T, 4) targets -> {"bbox": L1 (N, T), "giou": -GIoU (N, T)}."""
        boxes = boxes.float()
        return {"bbox": torch.cdist(boxes, targets, p=1),
                "giou": -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(targets))}

    def losses(self, boxes, targets, num_boxes):
        """(M, 4) matched predictions and targets -> {"loss_bbox", "loss_giou"} summed over boxes / num_boxes."""
        loss_bbox = F.l1_loss(boxes, targets, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(targets)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def decode(self, boxes, batch):
        """(B, K, 4) cxcywh -> (B, K, 4) xyxy pixels clipped to the image, and an all-True (B, K) keep mask."""
        sizes = batch.get("orig_size", batch.get("img_shape"))
        sizes = torch.as_tensor(sizes, dtype=torch.float32, device=boxes.device).view(-1, 2)
        h, w = sizes.unbind(-1)
        scale = torch.stack([w, h, w, h], -1)[:, None].to(boxes.dtype)  # (B, 1, 4)
        pixels = torch.min(box_cxcywh_to_xyxy(boxes).clamp(min=0, max=1) * scale, scale)
        return pixels, torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)

    def jitter(self, boxes, groups, noise):
        """(n, 4) boxes -> `groups` noisy boxes (G, n, 4) in [0, 1] (DN-DETR: the centre moves by up to `noise`
        half sizes, each size changes by up to `noise` times itself) and the norm of the centre move in half
        sizes (G, n)."""
        shift = (torch.rand(groups, len(boxes), 4) * 2 - 1) * noise
        scale = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], -1)  # (n, 4)
        return (boxes[None] + shift * scale).clamp(0, 1), shift[..., :2].norm(dim=-1)
