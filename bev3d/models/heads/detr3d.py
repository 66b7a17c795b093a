"""DETR3D head (Wang et al. 2021, WangYueFt/detr3d): 3D reference points sample the camera features.

Each query owns a 3D reference point; every decoder layer projects it into all cameras, bilinearly
samples all FPN levels where it is visible and adds the weighted sum to the query. With refinement
each layer's predicted centre becomes the next layer's reference point.

By default, unlike the official code, the sampling weights are per level only, not per (camera index,
level): a camera's index carries no meaning of its own, and this keeps the head invariant to the camera
order. `attention_weights="camera_level"` is the official layout, which released checkpoints need.

Query denoising (not in the official DETR3D): the noisy copies start from their noisy centres with zero
content; their query positions come from an MLP of the centres' sine embedding, as PETR's queries do.
"""

import torch
import torch.nn as nn

from bev3d.constants import CAMERAS
from bev3d.errors import Bev3dError
from bev3d.models import detector
from bev3d.models.core.box_coder_3d import denormalize_points
from bev3d.models.core.predictions import split_denoising
from bev3d.models.heads.common import PredictionBranches, sine_embed_points
from bev3d.models.heads.detr3d_sampling import project_to_cameras, sample_multiview
from bev3d.models.transformer.detr_transformer import TransformerDecoderLayer
from bev3d.models.transformer.utils import inverse_sigmoid


class DETR3DCrossAttention(nn.Module):
    """`num_cams` None: one sampling weight per level; else one per (camera index, level), row
    camera * num_levels + level of `attention_weights` (the official layout)."""

    def __init__(self, embed_dims, num_levels, pc_range, sampler="ms_deform_attn", num_cams=None,
                 projection="padded_valid"):
        super().__init__()
        self.pc_range, self.sampler, self.num_cams, self.projection = pc_range, sampler, num_cams, projection
        self.attention_weights = nn.Linear(embed_dims, num_levels * (num_cams or 1))
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.position_encoder = nn.Sequential(
            nn.Linear(3, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True),
            nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, query_pos, reference, feats, lidar2img, img_shape, pad_shape):
        """query, query_pos (B, Q, C); reference (B, Q, 3) fractions of pc_range -> (B, Q, C) (no residual)."""
        weights = self.attention_weights(query + query_pos).sigmoid()  # (B, Q, L) or (B, Q, N*L)
        if self.num_cams is None:
            weights = weights[:, :, None, :]  # (B, Q, 1, L): the same for every camera
        else:
            B, Q, N = *weights.shape[:2], lidar2img.shape[1]
            if N != self.num_cams:
                raise ValueError(f"this head has sampling weights for {self.num_cams} cameras, the batch has {N}")
            weights = weights.view(B, Q, N, -1)  # (B, Q, N, L): row camera * L + level
        points = denormalize_points(reference, self.pc_range)
        locations, visible = project_to_cameras(points, lidar2img, img_shape, pad_shape, projection=self.projection)
        weights = weights * visible.transpose(1, 2)[..., None].to(weights)  # (B, Q, N, L)
        sampled = sample_multiview(feats, locations, weights, self.sampler)
        return self.output_proj(sampled) + self.position_encoder(inverse_sigmoid(reference))


class DETR3DDecoderLayer(TransformerDecoderLayer):
    """DETR's post-norm decoder layer with DETR3D's cross-attention in place of global attention."""

    def __init__(self, embed_dims, num_heads, ffn_dims, dropout, num_levels, pc_range, sampler, num_cams=None,
                 projection="padded_valid"):
        super().__init__(embed_dims, num_heads, ffn_dims, dropout)
        self.cross_attn = DETR3DCrossAttention(embed_dims, num_levels, pc_range, sampler, num_cams, projection)

    def forward(self, tgt, query_pos, reference, feats, lidar2img, img_shape, pad_shape, self_attn_mask=None):
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, query_pos=query_pos, attn_mask=self_attn_mask)))
        attended = self.cross_attn(tgt, query_pos, reference, feats, lidar2img, img_shape, pad_shape)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.ffn(tgt)


class DETR3DHead(nn.Module):
    def __init__(self, num_classes, pc_range, num_queries=900, embed_dims=256, num_heads=8,
                 num_decoder_layers=6, ffn_dims=512, dropout=0.1, num_levels=4, with_box_refine=True,
                 sampler="ms_deform_attn", denoising=False, num_cams=None, projection="padded_valid"):
        super().__init__()
        self.num_levels, self.with_box_refine = num_levels, with_box_refine
        self.query_embedding = nn.Embedding(num_queries, embed_dims * 2)  # (position, content) halves
        self.reference_points = nn.Linear(embed_dims, 3)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.layers = nn.ModuleList(
            DETR3DDecoderLayer(embed_dims, num_heads, ffn_dims, dropout, num_levels, pc_range, sampler, num_cams,
                               projection)
            for _ in range(num_decoder_layers))
        self.branches = PredictionBranches(embed_dims, num_classes, num_decoder_layers, pc_range,
                                           shared=not with_box_refine)
        self.num_queries = num_queries
        self.denoising_pos = None
        if denoising:
            self.denoising_pos = nn.Sequential(nn.Linear(embed_dims * 3 // 2, embed_dims), nn.ReLU(inplace=True),
                                               nn.Linear(embed_dims, embed_dims))

    def forward(self, feats, lidar2img, img_shape, pad_shape, denoising=None):
        """feats: list of (B, N, C, H_l, W_l); lidar2img (B, N, 4, 4); img_shape (B, 2) valid (H, W);
        denoising: DenoisingQueries or None -> SetPredictions (L layers, box codes with centres in metres)."""
        feats = feats[:self.num_levels]
        B = lidar2img.shape[0]
        query_pos, tgt = self.query_embedding.weight[None].expand(B, -1, -1).chunk(2, -1)  # (B, Q, C) each
        reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 3) fractions of pc_range
        self_attn_mask = None
        if denoising is not None:
            if self.denoising_pos is None:
                raise ValueError("this DETR3DHead was built without denoising=True")
            C = tgt.shape[-1]
            dn_pos = self.denoising_pos(sine_embed_points(denoising.reference, C // 2))  # (B, P, C)
            query_pos = torch.cat([dn_pos, query_pos], 1)
            tgt = torch.cat([tgt.new_zeros(dn_pos.shape), tgt], 1)
            reference = torch.cat([denoising.reference, reference], 1)  # (B, P + Q, 3)
            self_attn_mask = denoising.attn_mask
        cls_out, box_out = [], []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, query_pos, reference, feats, lidar2img, img_shape, pad_shape, self_attn_mask)
            logits, boxes, centres = self.branches(i, tgt, reference)
            cls_out.append(logits)
            box_out.append(boxes)
            if self.with_box_refine:
                # Gradients do not flow through the next layer's reference point (as in Deformable DETR).
                reference = centres.detach()
        return split_denoising(torch.stack(cls_out), torch.stack(box_out), denoising)


def build_head(cfg):
    m, h = cfg.model, cfg.model.head
    if m.neck.out_channels != h.embed_dims:
        raise Bev3dError(f"DETR3D samples the neck features directly: model.neck.out_channels "
                         f"({m.neck.out_channels}) must equal model.head.embed_dims ({h.embed_dims}).")
    if h.num_levels > m.neck.num_outs:
        raise Bev3dError(f"model.head.num_levels ({h.num_levels}) exceeds the neck's levels "
                         f"(model.neck.num_outs = {m.neck.num_outs}).")
    return DETR3DHead(h.num_classes, m.pc_range, num_queries=h.num_queries, embed_dims=h.embed_dims,
                      num_heads=h.num_heads, num_decoder_layers=h.num_decoder_layers, ffn_dims=h.ffn_dims,
                      dropout=h.dropout, num_levels=h.num_levels, with_box_refine=h.with_box_refine,
                      sampler=h.sampler, denoising=m.denoising.groups > 0,
                      num_cams=len(CAMERAS) if h.attention_weights == "camera_level" else None,
                      projection=h.projection)


def build(cfg):
    """Config -> MultiViewDetector with a DETR3D head."""
    return detector.build(cfg, build_head)
