"""MonoDETR (Zhang et al. 2022, ZrrSkywalker/MonoDETR): depth-guided monocular DETR, run on every camera of the rig.

Each camera image is its own detection problem: Deformable DETR's encoder over its feature levels, a depth
predictor (heads/monodetr_depth.py) whose foreground depth map is supervised by the boxes' depths, and a decoder
whose every layer attends to the depth tokens, to the other queries, then deformably to the visual memory around
the query's projected 3D centre. The boxes are mono codes (bev3d.models.core.box_coder_mono); the post-processor
lifts them to the LiDAR frame and merges the cameras of a sample.
"""

import copy
import math

import torch
import torch.nn as nn

from bev3d.errors import Bev3dError
from bev3d.models import detector
from bev3d.models.core.box_coder_mono import NUM_BINS
from bev3d.models.core.predictions import CameraMapPredictions, SetPredictions
from bev3d.models.heads.monodetr_depth import DepthPredictor
from bev3d.models.heads.petr import padding_mask
from bev3d.models.transformer import MLP, DeformableDecoderLayer, DeformableEncoder, MSDeformAttn, \
    MultiheadAttention, PositionEmbeddingSine, inverse_sigmoid
from bev3d.models.transformer.deformable_transformer import flatten_levels


class DepthGuidedDecoderLayer(nn.Module):
    """Depth cross-attention to the depth tokens (add & norm), then Deformable DETR's decoder layer: self-attention,
    deformable cross-attention to the visual memory, FFN."""

    def __init__(self, embed_dims=256, ffn_dims=256, dropout=0.1, num_levels=4, num_heads=8, num_points=4):
        super().__init__()
        self.depth_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dims)
        self.visual = DeformableDecoderLayer(embed_dims, ffn_dims, dropout, num_levels, num_heads, num_points)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask,
                depth_tokens, depth_padding_mask):
        # the depth tokens are keys and values (they carry the depth embedding), as in the official layer
        tgt = self.norm(tgt + self.dropout(self.depth_attn(tgt, depth_tokens, key_padding_mask=depth_padding_mask)))
        return self.visual(tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask)


class Branches(nn.Module):
    """One decoder layer's predictions: class logits and the mono code (u v from the reference point in logit
    space, l t r b, depth and its log-variance, log sizes, heading-bin logits and residuals)."""

    def __init__(self, embed_dims, num_classes):
        super().__init__()
        C = embed_dims
        self.cls = nn.Linear(C, num_classes)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))  # focal prior: p = 0.01
        self.box = MLP(C, C, 6, 3)
        nn.init.zeros_(self.box.layers[-1].weight)
        nn.init.zeros_(self.box.layers[-1].bias)
        nn.init.constant_(self.box.layers[-1].bias[2:], -2.0)  # the first 2D boxes start small
        self.depth = MLP(C, C, 2, 2)
        self.size = MLP(C, C, 3, 2)
        self.angle = MLP(C, C, 2 * NUM_BINS, 2)

    def forward(self, hidden, reference):
        """hidden (B, Q, C), reference (B, Q, 2) in [0, 1] -> logits (B, Q, K), code (B, Q, CODE_SIZE)."""
        box = self.box(hidden)
        centre = (box[..., :2] + inverse_sigmoid(reference)).sigmoid()
        raw_depth, log_variance = self.depth(hidden).unbind(-1)
        # depth = 1 / sigmoid - 1 covers (0, inf) with fine steps near the camera (the official parametrisation)
        depth = 1 / (raw_depth.sigmoid() + 1e-6) - 1
        code = torch.cat([centre, box[..., 2:].sigmoid(), depth[..., None], log_variance[..., None],
                          self.size(hidden), self.angle(hidden)], -1)
        return self.cls(hidden), code


class MonoDETRHead(nn.Module):
    def __init__(self, num_classes, num_queries=50, embed_dims=256, num_heads=8, num_encoder_layers=3,
                 num_decoder_layers=3, ffn_dims=256, dropout=0.1, num_levels=4, num_points=4, with_box_refine=True,
                 depth_bins=80, depth_min=1e-3, depth_max=60.0, attn_backend="auto"):
        super().__init__()
        C = embed_dims
        self.num_queries, self.with_box_refine = num_queries, with_box_refine
        kw = dict(embed_dims=C, ffn_dims=ffn_dims, dropout=dropout, num_levels=num_levels, num_heads=num_heads,
                  num_points=num_points)
        self.encoder = DeformableEncoder(num_encoder_layers, **kw)
        self.layers = nn.ModuleList(DepthGuidedDecoderLayer(**kw) for _ in range(num_decoder_layers))
        self.level_embed = nn.Parameter(torch.empty(num_levels, C))
        self.query_embed = nn.Embedding(num_queries, 2 * C)  # (position, content) per query
        self.reference_points = nn.Linear(C, 2)
        for p in list(self.encoder.parameters()) + list(self.layers.parameters()) + \
                list(self.reference_points.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
                m.backend = attn_backend
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        # Deformable DETR's sine encoding measures positions from pixel centres (offset -0.5)
        self.position_encoding = PositionEmbeddingSine(C // 2, normalize=True, offset=-0.5)
        self.depth_predictor = DepthPredictor(C, depth_bins, depth_min, depth_max, num_heads, ffn_dims, dropout)
        branches = Branches(C, num_classes)
        # with refinement every layer has its own branches (as in Deformable DETR); without, one shared set
        self.branches = nn.ModuleList(copy.deepcopy(branches) for _ in range(num_decoder_layers)) if with_box_refine \
            else nn.ModuleList([branches])

    def forward(self, feats, lidar2img, img_shape, pad_shape, denoising=None):
        """feats: list of (B, N, C, H_l, W_l); img_shape (B, 2) valid (H, W) -> SetPredictions over the B * N camera
        images (sample-major), mono codes, with the depth map of every image."""
        N = feats[0].shape[1]
        srcs = [f.flatten(0, 1) for f in feats]  # (B*N, C, H_l, W_l)
        valid_hw = img_shape.repeat_interleave(N, 0)  # (B*N, 2)
        masks = [padding_mask(valid_hw, pad_shape, s.shape[-2:]) for s in srcs]
        pos = [self.position_encoding(m) for m in masks]
        src, mask, pos_flat, shapes, starts, valid_ratios = flatten_levels(srcs, masks, pos, self.level_embed)
        memory = self.encoder(src, pos_flat, shapes, starts, valid_ratios, mask)
        depth_logits, depth_tokens, _ = self.depth_predictor(srcs[:3], masks[1], pos[1])
        depth_mask = masks[1].flatten(1)

        BN, C = memory.shape[0], memory.shape[-1]
        query_pos, tgt = self.query_embed.weight[None].expand(BN, -1, -1).split(C, -1)  # (BN, Q, C) each
        reference = self.reference_points(query_pos).sigmoid()  # (BN, Q, 2) projected centres in [0, 1]
        logits, codes = [], []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, query_pos, reference[:, :, None] * valid_ratios[:, None], memory, shapes, starts, mask,
                        depth_tokens, depth_mask)
            cls, code = self.branches[min(i, len(self.branches) - 1)](tgt, reference)
            logits.append(cls)
            codes.append(code)
            if self.with_box_refine:
                # the next layer samples around this layer's centres; no gradient through them (Deformable DETR)
                reference = code[..., :2].detach()
        return SetPredictions(torch.stack(logits), torch.stack(codes),
                              depth_map=CameraMapPredictions(depth_logits, valid_ratios[:, 1]))


def build_head(cfg):
    m, h = cfg.model, cfg.model.head
    if m.denoising.groups:
        raise Bev3dError("MonoDETR has no query denoising: set model.denoising.groups: 0.")
    if m.neck.num_outs != h.num_levels or m.neck.out_channels != h.embed_dims:
        raise Bev3dError(f"MonoDETR reads {h.num_levels} neck levels of {h.embed_dims} channels (model.head."
                         f"num_levels, embed_dims) but the neck gives {m.neck.num_outs} of {m.neck.out_channels}: "
                         f"set model.neck.num_outs and out_channels to match.")
    if h.num_levels < 3:
        raise Bev3dError(f"MonoDETR's depth predictor fuses three feature levels: model.head.num_levels is "
                         f"{h.num_levels}.")
    if cfg.data.train_view != "per_camera" or cfg.data.flip:
        raise Bev3dError("MonoDETR trains on single cameras without flips (a flipped image is a mirrored camera, "
                         "which the local yaw does not describe): set data.train_view: per_camera and data.flip: "
                         "false.")
    return MonoDETRHead(h.num_classes, h.num_queries, h.embed_dims, h.num_heads, h.num_encoder_layers,
                        h.num_decoder_layers, h.ffn_dims, h.dropout, h.num_levels, h.num_points, h.with_box_refine,
                        h.depth_bins, h.depth_min, h.depth_max, h.attn_backend)


def build(cfg):
    """Config -> MultiViewDetector with a MonoDETR head (every camera image detected on its own)."""
    return detector.build(cfg, build_head)
