"""Conditional DETR (Meng et al. 2021, Atten4Vis/ConditionalDETR): DETR with a conditional spatial query.

Each object query predicts a 2D reference point s (an MLP of its learned position, sigmoid). In the decoder
cross-attention the query of head m is [content_m ; spatial_m], concatenated rather than added: the spatial part
is the sine embedding of s scaled element-wise by an FFN of the decoder embedding (1 in the first layer), and
the keys are [content_m ; position_m] likewise. The content and spatial similarities then add up inside every
head, and the decoder embedding chooses which band around s each head looks at. Boxes are predicted relative to
s. Follows the batch contract in bev3d/models/detr.py; module names follow the official code (bev3d convert
--from conditional_detr).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.models.backbones import build_backbone
from bev3d.models.core.build import build_denoising
from bev3d.models.core.predictions import split_denoising
from bev3d.models.detr import SetDetector2D, boxes_around_points, check_config
from bev3d.models.necks import build_neck
from bev3d.models.transformer import FFN, MLP, TransformerEncoder, build_position_encoding
from bev3d.models.transformer.attention import merge_masks
from bev3d.models.transformer.position_encoding import sine_embed_xy


class ProjectedAttention(nn.Module):
    """Multi-head attention of queries, keys and values that the layer has projected itself:
    softmax(q_m . k_m / sqrt(d_qk)) v_m, then out_proj. Queries and keys may be wider per head than values."""

    def __init__(self, value_dims, num_heads, dropout=0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.out_proj = nn.Linear(value_dims, value_dims)

    def forward(self, q, k, v, attn_mask=None, key_padding_mask=None):
        """q (B, L, M * D_qk), k (B, S, M * D_qk), v (B, S, M * D_v), masks as in MultiheadAttention
        -> (B, L, M * D_v)."""
        B, L, _ = q.shape

        def heads(x):  # (B, N, M * D) -> (B, M, N, D)
            return x.view(B, x.shape[1], self.num_heads, -1).transpose(1, 2)

        mask = merge_masks(attn_mask, key_padding_mask, q.dtype)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))


def per_head_cat(a, b, num_heads):
    """(B, N, C) and (B, N, C) -> (B, N, 2C) with head m's slice [a_m ; b_m]."""
    B, N, C = a.shape
    return torch.cat([a.view(B, N, num_heads, -1), b.view(B, N, num_heads, -1)], -1).view(B, N, 2 * C)


class ConditionalDecoderLayer(nn.Module):
    """DETR's post-norm decoder layer with separate content and position projections. Only the first layer adds
    the query position to the cross-attention's content query (and the key position to its content key): later
    layers locate through the spatial query alone."""

    def __init__(self, embed_dims=256, num_heads=8, ffn_dims=2048, dropout=0.1, first=False):
        super().__init__()
        C = embed_dims
        self.num_heads = num_heads
        self.sa_qcontent_proj, self.sa_qpos_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.sa_kcontent_proj, self.sa_kpos_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.sa_v_proj = nn.Linear(C, C)
        self.self_attn = ProjectedAttention(C, num_heads, dropout)
        self.ca_qcontent_proj = nn.Linear(C, C)
        self.ca_qpos_proj = nn.Linear(C, C) if first else None
        self.ca_kcontent_proj, self.ca_kpos_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.ca_v_proj = nn.Linear(C, C)
        self.ca_qpos_sine_proj = nn.Linear(C, C)
        self.cross_attn = ProjectedAttention(C, num_heads, dropout)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.ffn = FFN(C, ffn_dims, dropout)

    def forward(self, tgt, memory, query_pos, query_sine_embed, pos, key_padding_mask=None, self_attn_mask=None):
        """tgt, query_pos, query_sine_embed (B, Q, C); memory, pos (B, S, C); key_padding_mask (B, S) -> (B, Q, C)."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt), self_attn_mask)))

        q, k, k_pos = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory), self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q, k = q + self.ca_qpos_proj(query_pos), k + k_pos
        q = per_head_cat(q, self.ca_qpos_sine_proj(query_sine_embed), self.num_heads)  # (B, Q, 2C)
        k = per_head_cat(k, k_pos, self.num_heads)  # (B, S, 2C)
        attended = self.cross_attn(q, k, self.ca_v_proj(memory), key_padding_mask=key_padding_mask)
        return self.ffn(self.norm2(tgt + self.dropout2(attended)))


class ConditionalDecoder(nn.Module):
    """Decoder layers, the shared final LayerNorm, and the two MLPs of the spatial query: `ref_point_head`
    (query position -> reference point logits) and `query_scale` (decoder embedding -> the transformation T)."""

    def __init__(self, num_layers, embed_dims=256, num_heads=8, ffn_dims=2048, dropout=0.1):
        super().__init__()
        C = embed_dims
        self.layers = nn.ModuleList(ConditionalDecoderLayer(C, num_heads, ffn_dims, dropout, first=i == 0)
                                    for i in range(num_layers))
        self.norm = nn.LayerNorm(C)
        self.query_scale = MLP(C, C, C, 2)
        self.ref_point_head = MLP(C, C, 2, 2)

    def forward(self, tgt, memory, query_pos, reference, pos, key_padding_mask=None, self_attn_mask=None):
        """reference (B, Q, 2) normalised (x, y) -> every layer's output (num_layers, B, Q, C)."""
        sine = sine_embed_xy(reference, tgt.shape[-1] // 2).to(tgt.dtype)  # (B, Q, C), the dtype of the layers
        outs = []
        for i, layer in enumerate(self.layers):
            query_sine_embed = sine if i == 0 else sine * self.query_scale(tgt)
            tgt = layer(tgt, memory, query_pos, query_sine_embed, pos, key_padding_mask, self_attn_mask)
            outs.append(self.norm(tgt))
        return torch.stack(outs)


class ConditionalTransformer(nn.Module):
    """DETR's encoder and the conditional decoder over one feature map."""

    def __init__(self, embed_dims=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, ffn_dims=2048,
                 dropout=0.1):
        super().__init__()
        self.embed_dims = embed_dims
        self.encoder = TransformerEncoder(num_encoder_layers, embed_dims=embed_dims, num_heads=num_heads,
                                          ffn_dims=ffn_dims, dropout=dropout)
        self.decoder = ConditionalDecoder(num_decoder_layers, embed_dims, num_heads, ffn_dims, dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, pos, tgt, query_pos, reference, self_attn_mask=None):
        """src, pos (B, C, H, W), mask (B, H, W); tgt, query_pos (B, Q, C), reference (B, Q, 2) -> (L, B, Q, C)."""
        src = src.flatten(2).transpose(1, 2)  # (B, HW, C)
        pos = pos.flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        memory = self.encoder(src, pos, mask)
        return self.decoder(tgt, memory, query_pos, reference, pos, mask, self_attn_mask)


class ConditionalDETR(SetDetector2D):
    """One class head and one box head shared by all decoder layers (as in the official code)."""

    def __init__(self, backbone, neck, transformer, position_encoding, num_classes, num_queries=300):
        super().__init__(backbone, neck, position_encoding)
        C = transformer.embed_dims
        self.transformer = transformer
        self.class_embed = nn.Linear(C, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))  # focal prior: p = 0.01
        self.bbox_embed = MLP(C, C, 4, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.query_embed = nn.Embedding(num_queries, C)

    def predict(self, img, mask, targets=None):
        feats, masks, pos = self.features(img, mask)
        query_pos = self.query_embed.weight[None].expand(img.shape[0], -1, -1)  # (B, Q, C)
        reference = self.transformer.decoder.ref_point_head(query_pos).sigmoid()  # (B, Q, 2)
        tgt = torch.zeros_like(query_pos)
        dn = self.denoising_queries(targets, query_pos.shape[1], img.device)
        self_attn_mask = None
        if dn is not None:  # a copy's reference point is its noisy box's centre
            dn_content, dn_pos = self.denoising_embeddings(dn)
            tgt, query_pos = torch.cat([dn_content, tgt], 1), torch.cat([dn_pos, query_pos], 1)
            reference = torch.cat([dn.reference[..., :2], reference], 1)
            self_attn_mask = dn.attn_mask
        hidden = self.transformer(feats[-1], masks[-1], pos[-1], tgt, query_pos, reference,
                                  self_attn_mask)  # (L, B, P + Q, C)
        boxes = boxes_around_points(self.bbox_embed(hidden), reference)
        return split_denoising(self.class_embed(hidden), boxes, dn)


def build(cfg):
    m, h = cfg.model, cfg.model.head
    check_config(cfg, focal=True, single_level=True)
    transformer = ConditionalTransformer(h.embed_dims, h.num_heads, h.num_encoder_layers, h.num_decoder_layers,
                                         h.ffn_dims, h.dropout)
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels)
    model = ConditionalDETR(backbone, neck, transformer, build_position_encoding(h.position_encoding, h.embed_dims),
                            h.num_classes, h.num_queries)
    model.enable_denoising(build_denoising(cfg), h.num_classes, h.embed_dims)
    return model
