"""DETR (Carion et al. 2020): ResNet -> 1x1 projection -> transformer -> class and box per object query.

The batch contract of every 2D model (see docs/models.md, "2D core"): batch["img"] (B, 3, H, W) normalised
and padded, batch["mask"] (B, H, W) True at padding -> SetPredictions with logits (L, B, Q, K) and boxes
(L, B, Q, 4) normalised cxcywh of the unpadded image. Targets (for the criterion) are per image
{"labels" (T,) int64, "boxes" (T, 4) cxcywh in [0, 1]}.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.core.predictions import SetPredictions
from bev3d.models.necks import build_neck
from bev3d.models.transformer import MLP, Transformer, build_position_encoding


class SetDetector2D(nn.Module):
    """What DETR and Deformable DETR share: features + padding masks + positions."""

    def __init__(self, backbone, neck, position_encoding):
        super().__init__()
        self.backbone, self.neck, self.position_encoding = backbone, neck, position_encoding

    def features(self, img, mask):
        """img (B, 3, H, W), mask (B, H, W) -> per level features (B, C, H_l, W_l), masks, positions."""
        feats = self.neck(self.backbone(img))
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool() for f in feats]
        pos = [self.position_encoding(m).to(f.dtype) for f, m in zip(feats, masks)]
        return feats, masks, pos

    def forward(self, batch, targets=None):
        img = batch["img"]
        mask = batch.get("mask")
        if mask is None:
            mask = torch.zeros(img.shape[0], *img.shape[-2:], dtype=torch.bool, device=img.device)
        return self.predict(img, mask)


class DETR(SetDetector2D):
    def __init__(self, backbone, neck, transformer, position_encoding, num_logits, num_queries=100):
        super().__init__(backbone, neck, position_encoding)
        C = transformer.embed_dims
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, C)
        self.class_embed = nn.Linear(C, num_logits)
        self.bbox_embed = MLP(C, C, 4, 3)

    def predict(self, img, mask):
        feats, masks, pos = self.features(img, mask)
        hidden = self.transformer(feats[-1], masks[-1], self.query_embed.weight, pos[-1])  # (L, B, Q, C)
        return SetPredictions(self.class_embed(hidden), self.bbox_embed(hidden).sigmoid())


def check_config(cfg):
    """Raise Bev3dError for 2D settings the models cannot run with."""
    h = cfg.model.head
    if h.embed_dims % h.num_heads:
        raise Bev3dError(f"model.head.embed_dims ({h.embed_dims}) must be divisible by model.head.num_heads "
                         f"({h.num_heads}).")
    if cfg.model.denoising.groups > 0:
        raise Bev3dError(f"model.denoising is not available for model.type {cfg.model.type}; set "
                         f"model.denoising.groups: 0.")


def build(cfg):
    m, h = cfg.model, cfg.model.head
    check_config(cfg)
    transformer = Transformer(h.embed_dims, h.num_heads, h.num_encoder_layers, h.num_decoder_layers, h.ffn_dims,
                              h.dropout)
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels)
    # softmax classes have a last "no object" logit
    num_logits = h.num_classes + (0 if m.loss.use_focal else 1)
    return DETR(backbone, neck, transformer, build_position_encoding(h.position_encoding, h.embed_dims), num_logits,
                h.num_queries)
