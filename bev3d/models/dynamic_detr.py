"""Dynamic DETR (Dai et al. 2021): a convolutional dynamic encoder and a decoder whose cross-attention reads RoIs.

Follows the batch contract in bev3d/models/detr.py. There is no official code: this follows the paper, and
docs/models.md ("Dynamic DETR") lists where it had to be interpreted. The encoder replaces self-attention over all
tokens with convolutions: every pyramid level gathers itself and its two neighbours through deformable convs whose
offsets come from that level, weights them per scale and channel (squeeze-excitation) and sums. The decoder is
DETR's with the cross-attention replaced: each query's box reads 7x7 RoIAlign features from the level its size
picks, and the query generates the 1x1 conv that mixes them (Sparse R-CNN's dynamic interaction). Every layer
refines the boxes of the layer before (detached), as Deformable DETR's refinement.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.backbones.dcn import modulated_deform_conv2d
from bev3d.models.box_ops import box_cxcywh_to_xyxy
from bev3d.models.core.predictions import SetPredictions
from bev3d.models.detr import SetDetector2D, check_config
from bev3d.models.necks import build_neck
from bev3d.models.sparse_rcnn import DynamicInteraction, feature_strides, image_whwh
from bev3d.models.transformer import FFN, MLP, MultiheadAttention, inverse_sigmoid
from bev3d.models.transformer.deformable_transformer import proposal_pos_embed
from bev3d.ops.roi_align import multiscale_roi_align


class DynamicEncoderBlock(nn.Module):
    """list of (B, C, H_l, W_l) -> the same shapes. Level l reads level l - 1 (a stride-2 deformable conv), itself and
    level l + 1 (upsampled, then a deformable conv), all with the offsets and masks that one conv predicts from
    level l, so the three land on level l's grid aligned by the same sampling; each aligned map is scaled by
    hard-sigmoid channel weights from a squeeze-excitation of itself (scale-wise channel attention), and the ReLU of
    their mean is the new level l."""

    def __init__(self, embed_dims=256, norm_groups=16):
        super().__init__()
        C = embed_dims
        self.conv_offset = nn.Conv2d(C, 27, 3, padding=1)  # (dy, dx) x 9 taps, then 9 mask logits (mmcv's layout)
        nn.init.zeros_(self.conv_offset.weight)  # a regular 3x3 grid at first
        nn.init.zeros_(self.conv_offset.bias)
        # the deformable convs' weights: from the finer level, the same level, the coarser level
        self.finer, self.same, self.coarser = (nn.Parameter(torch.empty(C, C, 3, 3)) for _ in range(3))
        for w in (self.finer, self.same, self.coarser):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.norms = nn.ModuleList(nn.GroupNorm(norm_groups, C) for _ in range(3))
        self.se = nn.Sequential(nn.Linear(C, C // 4), nn.ReLU(inplace=True), nn.Linear(C // 4, C))

    def forward(self, feats):
        out = []
        for lvl, x in enumerate(feats):
            o1, o2, m = self.conv_offset(x).chunk(3, dim=1)
            deform = {"offset": torch.cat([o1, o2], 1), "mask": m.sigmoid(), "padding": 1}
            aligned = [self.norms[1](modulated_deform_conv2d(x, weight=self.same, **deform))]
            if lvl > 0:
                aligned.append(self.norms[0](modulated_deform_conv2d(feats[lvl - 1], weight=self.finer, stride=2,
                                                                     **deform)))
            if lvl < len(feats) - 1:
                up = F.interpolate(feats[lvl + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
                aligned.append(self.norms[2](modulated_deform_conv2d(up, weight=self.coarser, **deform)))
            weights = [F.hardsigmoid(self.se(a.mean((2, 3))))[..., None, None] for a in aligned]  # (B, C, 1, 1)
            out.append(F.relu(sum(w * a for w, a in zip(weights, aligned)) / len(aligned)))
        return out


class DynamicDecoderLayer(nn.Module):
    """DETR's post-norm decoder layer whose cross-attention is the query-conditioned dynamic conv over its RoI."""

    def __init__(self, embed_dims=256, num_heads=8, ffn_dims=2048, dropout=0.0, dynamic_dims=16, roi_size=7):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.interact = DynamicInteraction(embed_dims, dynamic_dims, roi_size, num_convs=1)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)

    def forward(self, tgt, query_pos, roi):
        """tgt, query_pos (B, Q, C), roi (B, Q, C, S, S) -> (B, Q, C)."""
        B, Q, C = tgt.shape
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, query_pos=query_pos)))
        roi = roi.flatten(3).transpose(2, 3).reshape(B * Q, -1, C)  # (B Q, S*S, C)
        interacted = self.interact((tgt + query_pos).reshape(B * Q, C), roi).view(B, Q, C)
        return self.ffn(self.norm2(tgt + self.dropout2(interacted)))


class DynamicDETR(SetDetector2D):
    def __init__(self, backbone, neck, encoder, decoder, num_classes, num_queries=300, embed_dims=256, roi_size=7,
                 sampling_ratio=2):
        super().__init__(backbone, neck, None)
        C = embed_dims
        self.encoder, self.decoder = encoder, decoder
        self.roi_size, self.sampling_ratio = roi_size, sampling_ratio
        self.query_content = nn.Embedding(num_queries, C)
        # Initial boxes, cxcywh as logits: centres spread uniformly over the image, half its size.
        self.query_boxes = nn.Embedding(num_queries, 4)
        with torch.no_grad():
            self.query_boxes.weight[:, :2] = inverse_sigmoid(torch.rand(num_queries, 2))
            self.query_boxes.weight[:, 2:] = 0.0
        self.box_pos = MLP(2 * C, C, C, 2)  # sine embedding of a query's box -> its query position
        self.class_embed = nn.ModuleList(nn.Linear(C, num_classes) for _ in decoder)
        self.bbox_embed = nn.ModuleList(MLP(C, C, 4, 3) for _ in decoder)
        for cls, box in zip(self.class_embed, self.bbox_embed):
            nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))  # focal prior: p = 0.01
            nn.init.zeros_(box.layers[-1].weight)  # each layer starts from the box it was given
            nn.init.zeros_(box.layers[-1].bias)

    def predict(self, img, mask, targets=None):
        # channels-last maps: RoIAlign reads their cells as rows without a copy
        feats = self.neck(self.backbone(img.contiguous(memory_format=torch.channels_last)))
        strides = feature_strides(img, feats)
        for block in self.encoder:
            feats = block(feats)
        whwh = image_whwh(mask)  # boxes are relative to the valid image; RoIs in its (= the padded map's) pixels
        B, C = img.shape[0], self.query_content.embedding_dim
        tgt = self.query_content.weight[None].expand(B, -1, -1)  # (B, Q, C)
        box_logits = self.query_boxes.weight[None].expand(B, -1, -1)  # (B, Q, 4)
        logits, boxes = [], []
        for layer, cls, box in zip(self.decoder, self.class_embed, self.bbox_embed):
            ref = box_logits.sigmoid()
            query_pos = self.box_pos(proposal_pos_embed(ref, C // 2))
            roi = multiscale_roi_align(feats, strides, box_cxcywh_to_xyxy(ref) * whwh[:, None], self.roi_size,
                                       self.sampling_ratio, aligned=True)  # (B, Q, C, S, S)
            tgt = layer(tgt, query_pos, roi)
            box_logits = box(tgt) + box_logits
            logits.append(cls(tgt))
            boxes.append(box_logits.sigmoid())
            box_logits = box_logits.detach()
        return SetPredictions(torch.stack(logits), torch.stack(boxes))


def build(cfg):
    m, h = cfg.model, cfg.model.head
    check_config(cfg, denoising=False, focal=True, fpn=True)
    if h.embed_dims % 16:
        raise Bev3dError(f"model.head.embed_dims ({h.embed_dims}) must be a multiple of 16 (the encoder's "
                         f"GroupNorm groups).")
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels)
    encoder = nn.ModuleList(DynamicEncoderBlock(h.embed_dims) for _ in range(h.num_encoder_layers))
    decoder = nn.ModuleList(DynamicDecoderLayer(h.embed_dims, h.num_heads, h.ffn_dims, h.dropout, h.dynamic_dims,
                                                h.roi_size) for _ in range(h.num_decoder_layers))
    return DynamicDETR(backbone, neck, encoder, decoder, h.num_classes, h.num_queries, h.embed_dims, h.roi_size,
                       h.sampling_ratio)
