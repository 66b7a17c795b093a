"""Sparse R-CNN (Sun et al. 2021): learned proposal boxes and features, refined by iterative RoI stages.

Follows the batch contract in bev3d/models/detr.py. The proposal boxes (N, 4) and features (N, C) are parameters;
each of the stages reads every box's 7x7 RoIAlign features from the FPN level the box's size picks, lets the
proposals attend to each other, mixes each proposal's RoI features with convs whose parameters the proposal's own
feature generates (dynamic instance interaction), and predicts classes and box deltas. Every stage is one layer of
SetPredictions; the next stage starts from its boxes (detached). Layout and box transform follow the official
code (PeizeSun/SparseR-CNN, projects/SparseRCNN/sparsercnn/head.py), so `bev3d convert --from sparse_rcnn` maps
its checkpoints one to one.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from bev3d.models.core.predictions import SetPredictions
from bev3d.models.detr import SetDetector2D, check_config
from bev3d.models.necks import build_neck
from bev3d.models.transformer import FFN, MultiheadAttention
from bev3d.ops.roi_align import multiscale_roi_align

SCALE_CLAMP = math.log(100000.0 / 16)  # Detectron2's limit on dw, dh before exp


class DynamicInteraction(nn.Module):
    """Each proposal's feature generates the weights of `num_convs` 1x1 convs (C -> d, then d -> C) that run on its
    own RoI features, each followed by LayerNorm and ReLU; the result is flattened and projected back to C (the
    seed note's pseudo-code, with the official code's last LayerNorm and ReLU). One conv (C -> d) is the lighter
    form Dynamic DETR's decoder uses."""

    def __init__(self, embed_dims=256, dynamic_dims=64, roi_size=7, num_convs=2):
        super().__init__()
        if num_convs not in (1, 2):
            raise Bev3dError(f"dynamic instance interaction has 1 or 2 dynamic convs, got {num_convs}.")
        dims = [embed_dims, dynamic_dims, embed_dims][:num_convs + 1]
        self.shapes = list(zip(dims, dims[1:]))  # (in, out) of each conv
        self.dynamic_layer = nn.Linear(embed_dims, sum(i * o for i, o in self.shapes))
        self.norms = nn.ModuleList(nn.LayerNorm(o) for _, o in self.shapes)
        self.out_layer = nn.Linear(dims[-1] * roi_size**2, embed_dims)
        self.out_norm = nn.LayerNorm(embed_dims)

    def forward(self, proposals, roi):
        """proposals (N, C), roi (N, S*S, C) -> (N, C)."""
        params = self.dynamic_layer(proposals).split([i * o for i, o in self.shapes], -1)
        x = roi
        for p, (i, o), norm in zip(params, self.shapes, self.norms):
            x = F.relu(norm(torch.bmm(x, p.view(-1, i, o))))  # (N, S*S, o)
        return F.relu(self.out_norm(self.out_layer(x.flatten(1))))


def linear_ln_relu(dims, n):
    """n x (Linear without bias, LayerNorm, ReLU): the official class and box branches."""
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(dims, dims, bias=False), nn.LayerNorm(dims),
                                                        nn.ReLU(inplace=True))])


def apply_deltas(deltas, boxes, weights=(2.0, 2.0, 1.0, 1.0)):
    """Faster R-CNN's box transform: deltas (..., 4) (dx, dy, dw, dh) on xyxy boxes (..., 4) -> xyxy boxes."""
    wh = boxes[..., 2:] - boxes[..., :2]
    centre = boxes[..., :2] + 0.5 * wh
    d = deltas / deltas.new_tensor(weights)
    centre = centre + d[..., :2] * wh
    wh = d[..., 2:].clamp(max=SCALE_CLAMP).exp() * wh
    return torch.cat([centre - 0.5 * wh, centre + 0.5 * wh], -1)


class SparseRCNNStage(nn.Module):
    """Self-attention among the proposals, dynamic instance interaction with their RoI features, FFN (each with
    add & LayerNorm), then the class branch and the box-delta branch."""

    def __init__(self, embed_dims=256, num_heads=8, ffn_dims=2048, dropout=0.0, num_classes=80, dynamic_dims=64,
                 roi_size=7, num_cls_layers=1, num_reg_layers=3):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.interact = DynamicInteraction(embed_dims, dynamic_dims, roi_size)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)
        self.cls_branch = linear_ln_relu(embed_dims, num_cls_layers)
        self.reg_branch = linear_ln_relu(embed_dims, num_reg_layers)
        self.class_logits = nn.Linear(embed_dims, num_classes)
        self.bbox_delta = nn.Linear(embed_dims, 4)

    def forward(self, proposals, roi, boxes):
        """proposals (B, N, C), roi (B, N, C, S, S), boxes (B, N, 4) xyxy pixels
        -> logits (B, N, K), boxes (B, N, 4) xyxy pixels, proposals (B, N, C)."""
        B, N, C = proposals.shape
        proposals = self.norm1(proposals + self.dropout1(self.self_attn(proposals)))
        roi = roi.flatten(3).transpose(2, 3).reshape(B * N, -1, C)  # (B N, S*S, C)
        interacted = self.interact(proposals.reshape(B * N, C), roi).view(B, N, C)
        proposals = self.ffn(self.norm2(proposals + self.dropout2(interacted)))
        logits = self.class_logits(self.cls_branch(proposals))
        return logits, apply_deltas(self.bbox_delta(self.reg_branch(proposals)), boxes), proposals


def image_whwh(mask):
    """mask (B, H, W), True at padding -> (B, 4) valid (W, H, W, H) in pixels."""
    w = (~mask[:, 0, :]).sum(1)
    h = (~mask[:, :, 0]).sum(1)
    return torch.stack([w, h, w, h], -1).float()


def feature_strides(img, feats):
    """Input pixels per cell of each map (powers of two: the padded input is a multiple of the coarsest stride)."""
    return [2 ** round(math.log2(img.shape[-1] / f.shape[-1])) for f in feats]


class SparseRCNN(SetDetector2D):
    def __init__(self, backbone, neck, stages, num_proposals=100, embed_dims=256, roi_size=7, sampling_ratio=2):
        super().__init__(backbone, neck, None)
        self.stages = stages
        self.roi_size, self.sampling_ratio = roi_size, sampling_ratio
        self.init_proposal_features = nn.Embedding(num_proposals, embed_dims)
        self.init_proposal_boxes = nn.Embedding(num_proposals, 4)  # cxcywh in [0, 1]: the whole image at first
        nn.init.constant_(self.init_proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.init_proposal_boxes.weight[:, 2:], 1.0)
        for p in self.stages.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for stage in self.stages:
            nn.init.constant_(stage.class_logits.bias, -math.log((1 - 0.01) / 0.01))  # focal prior: p = 0.01
            nn.init.zeros_(stage.bbox_delta.weight)  # each stage starts from the boxes it was given
            nn.init.zeros_(stage.bbox_delta.bias)

    def predict(self, img, mask, targets=None):
        # channels-last maps: RoIAlign reads their cells as rows without a copy
        feats = self.neck(self.backbone(img.contiguous(memory_format=torch.channels_last)))
        strides = feature_strides(img, feats)
        whwh = image_whwh(mask)  # boxes are relative to the valid image; RoIs in its (= the padded map's) pixels
        B = img.shape[0]
        boxes = box_cxcywh_to_xyxy(self.init_proposal_boxes.weight)[None] * whwh[:, None]  # (B, N, 4)
        proposals = self.init_proposal_features.weight[None].expand(B, -1, -1)
        logits, outputs = [], []
        for stage in self.stages:
            roi = multiscale_roi_align(feats, strides, boxes, self.roi_size, self.sampling_ratio, aligned=True)
            stage_logits, pred, proposals = stage(proposals, roi, boxes)
            logits.append(stage_logits)
            outputs.append(box_xyxy_to_cxcywh(pred / whwh[:, None]))
            boxes = pred.detach()
        return SetPredictions(torch.stack(logits), torch.stack(outputs))


def build(cfg):
    m, h = cfg.model, cfg.model.head
    check_config(cfg, denoising=False, focal=True, fpn=True)
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels)
    stage = SparseRCNNStage(h.embed_dims, h.num_heads, h.ffn_dims, h.dropout, h.num_classes, h.dynamic_dims,
                            h.roi_size)
    stages = nn.ModuleList(copy.deepcopy(stage) for _ in range(h.num_decoder_layers))
    return SparseRCNN(backbone, neck, stages, h.num_queries, h.embed_dims, h.roi_size, h.sampling_ratio)
