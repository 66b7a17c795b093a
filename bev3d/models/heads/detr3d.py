"""DETR3D head (Wang et al. 2021, WangYueFt/detr3d): 3D reference points sample the camera features.

Each query owns a 3D reference point; every decoder layer projects it into all cameras, bilinearly
samples all FPN levels where it is visible and adds the weighted sum to the query. With refinement
each layer's predicted centre becomes the next layer's reference point.

Unlike the official code, the sampling weights are per level only, not per (camera index, level): a
camera's index carries no meaning of its own, and this keeps the head invariant to the camera order.
"""

import torch
import torch.nn as nn

from bev3d.models.heads.box_coder import denormalize_points
from bev3d.models.heads.common import PredictionBranches
from bev3d.models.heads.detr3d_sampling import project_to_cameras, sample_multiview
from bev3d.models.transformer.detr_transformer import TransformerDecoderLayer
from bev3d.models.transformer.utils import inverse_sigmoid


class DETR3DCrossAttention(nn.Module):
    def __init__(self, embed_dims, num_levels, pc_range, sampler="ms_deform_attn"):
        super().__init__()
        self.pc_range, self.sampler = pc_range, sampler
        self.attention_weights = nn.Linear(embed_dims, num_levels)
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
        weights = self.attention_weights(query + query_pos).sigmoid()  # (B, Q, L)
        points = denormalize_points(reference, self.pc_range)
        locations, visible = project_to_cameras(points, lidar2img, img_shape, pad_shape)  # (B, N, Q, 2), (B, N, Q)
        weights = weights[:, :, None, :] * visible.transpose(1, 2)[..., None].to(weights)  # (B, Q, N, L)
        sampled = sample_multiview(feats, locations, weights, self.sampler)
        return self.output_proj(sampled) + self.position_encoder(inverse_sigmoid(reference))


class DETR3DDecoderLayer(TransformerDecoderLayer):
    """DETR's post-norm decoder layer with DETR3D's cross-attention in place of global attention."""

    def __init__(self, embed_dims, num_heads, ffn_dims, dropout, num_levels, pc_range, sampler):
        super().__init__(embed_dims, num_heads, ffn_dims, dropout)
        self.cross_attn = DETR3DCrossAttention(embed_dims, num_levels, pc_range, sampler)

    def forward(self, tgt, query_pos, reference, feats, lidar2img, img_shape, pad_shape):
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, query_pos=query_pos)))
        attended = self.cross_attn(tgt, query_pos, reference, feats, lidar2img, img_shape, pad_shape)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.ffn(tgt)


class DETR3DHead(nn.Module):
    def __init__(self, num_classes, pc_range, num_queries=900, embed_dims=256, num_heads=8,
                 num_decoder_layers=6, ffn_dims=512, dropout=0.1, num_levels=4, with_box_refine=True,
                 sampler="ms_deform_attn"):
        super().__init__()
        self.num_levels, self.with_box_refine = num_levels, with_box_refine
        self.query_embedding = nn.Embedding(num_queries, embed_dims * 2)  # (position, content) halves
        self.reference_points = nn.Linear(embed_dims, 3)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.layers = nn.ModuleList(
            DETR3DDecoderLayer(embed_dims, num_heads, ffn_dims, dropout, num_levels, pc_range, sampler)
            for _ in range(num_decoder_layers))
        self.branches = PredictionBranches(embed_dims, num_classes, num_decoder_layers, pc_range,
                                           shared=not with_box_refine)

    def forward(self, feats, lidar2img, img_shape, pad_shape):
        """feats: list of (B, N, C, H_l, W_l); lidar2img (B, N, 4, 4); img_shape (B, 2) valid (H, W).

        Returns class logits (L, B, Q, num_classes) and box codes (L, B, Q, 10), centres in metres.
        """
        feats = feats[:self.num_levels]
        B = lidar2img.shape[0]
        query_pos, tgt = self.query_embedding.weight[None].expand(B, -1, -1).chunk(2, -1)  # (B, Q, C) each
        reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 3) fractions of pc_range
        cls_out, box_out = [], []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, query_pos, reference, feats, lidar2img, img_shape, pad_shape)
            logits, boxes, centres = self.branches(i, tgt, reference)
            cls_out.append(logits)
            box_out.append(boxes)
            if self.with_box_refine:
                # Gradients do not flow through the next layer's reference point (as in Deformable DETR).
                reference = centres.detach()
        return torch.stack(cls_out), torch.stack(box_out)
