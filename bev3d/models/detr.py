"""DETR (Carion et al. 2020): ResNet -> 1x1 projection -> transformer -> class and box per object query.

The batch contract of every 2D model (see docs/models.md, "2D core"):
  batch["img"] (B, 3, H, W) normalised and padded, batch["mask"] (B, H, W) True at padding,
  train: batch["targets"] per image {"labels" (T,) int64, "boxes" (T, 4) cxcywh in [0, 1] of the unpadded image}
         -> dict of scalar losses;
  eval:  batch["orig_size"] (else batch["img_shape"]) per image (H, W) to scale boxes to
         -> list of {"scores" (K,), "labels" (K,), "boxes" (K, 4) xyxy pixels}.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.models.backbones import build_backbone
from bev3d.models.losses import build_criterion
from bev3d.models.necks import build_neck
from bev3d.models.postprocess import postprocess_softmax
from bev3d.models.transformer import MLP, Transformer, build_position_encoding


class SetDetector2D(nn.Module):
    """What DETR and Deformable DETR share: features + padding masks + positions, loss or detections."""

    def __init__(self, backbone, neck, position_encoding, criterion, max_detections=100, score_threshold=0.0):
        super().__init__()
        self.backbone, self.neck, self.position_encoding = backbone, neck, position_encoding
        self.criterion = criterion
        self.max_detections, self.score_threshold = max_detections, score_threshold

    def features(self, img, mask):
        """img (B, 3, H, W), mask (B, H, W) -> per level features (B, C, H_l, W_l), masks, positions."""
        feats = self.neck(self.backbone(img))
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool() for f in feats]
        pos = [self.position_encoding(m).to(f.dtype) for f, m in zip(feats, masks)]
        return feats, masks, pos

    def forward(self, batch):
        img = batch["img"]
        mask = batch.get("mask")
        if mask is None:
            mask = torch.zeros(img.shape[0], *img.shape[-2:], dtype=torch.bool, device=img.device)
        outputs = self.predict(img, mask)
        if self.training:
            targets = [{k: t[k].to(img.device) for k in ("labels", "boxes")} for t in batch["targets"]]
            return self.criterion(outputs, targets)
        sizes = batch.get("orig_size", batch.get("img_shape"))
        sizes = torch.as_tensor(sizes, dtype=torch.float32, device=img.device).view(-1, 2)
        return self.postprocess(outputs["pred_logits"], outputs["pred_boxes"], sizes, self.max_detections,
                                self.score_threshold)

    @staticmethod
    def stack_outputs(logits, boxes, aux_loss):
        """Per-layer (L, B, Q, K) logits and (L, B, Q, 4) boxes -> the criterion's dict (last layer + aux)."""
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


class DETR(SetDetector2D):
    postprocess = staticmethod(postprocess_softmax)

    def __init__(self, backbone, neck, transformer, position_encoding, criterion, num_classes, num_queries=100,
                 aux_loss=True, **kwargs):
        super().__init__(backbone, neck, position_encoding, criterion, **kwargs)
        C = transformer.embed_dims
        self.transformer, self.aux_loss = transformer, aux_loss
        self.query_embed = nn.Embedding(num_queries, C)
        self.class_embed = nn.Linear(C, num_classes + 1)  # last logit: no object
        self.bbox_embed = MLP(C, C, 4, 3)

    def predict(self, img, mask):
        feats, masks, pos = self.features(img, mask)
        hidden = self.transformer(feats[-1], masks[-1], self.query_embed.weight, pos[-1])  # (L, B, Q, C)
        return self.stack_outputs(self.class_embed(hidden), self.bbox_embed(hidden).sigmoid(), self.aux_loss)


def build(cfg):
    m, h = cfg.model, cfg.model.head
    transformer = Transformer(h.embed_dims, h.num_heads, h.num_encoder_layers, h.num_decoder_layers, h.ffn_dims,
                              h.dropout)
    return DETR(build_backbone(m.backbone), build_neck(m.neck), transformer,
                build_position_encoding(h.position_encoding, h.embed_dims), build_criterion(m, h.num_classes),
                h.num_classes, h.num_queries, h.aux_loss, max_detections=m.max_detections,
                score_threshold=m.score_threshold)
