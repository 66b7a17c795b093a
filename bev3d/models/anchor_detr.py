"""Anchor DETR (Wang et al. 2022, megvii-research/AnchorDETR): object queries from anchor points.

Every query belongs to an anchor point (learned, initialised uniformly in [0, 1]^2, or a fixed grid) and to one of
`num_patterns` pattern embeddings, so that one anchor can predict several objects. A query's content is its
pattern embedding, its position an MLP of its anchor's sine embedding (g in the paper), and its box is predicted
relative to the anchor. The feature map's positions come from the same kind of MLP over the normalised pixel
centres. The encoder's self-attention and the decoder's cross-attention are row-column decoupled (RCDA,
bev3d.models.transformer.rcda) or standard; the decoder's self-attention is standard. One feature level (the
paper's C5 / DC5 models). Follows the batch contract in bev3d/models/detr.py.
"""

import math

import torch
import torch.nn as nn

from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.core.build import build_denoising
from bev3d.models.core.predictions import split_denoising
from bev3d.models.detr import SetDetector2D, boxes_around_points, check_config
from bev3d.models.necks import build_neck
from bev3d.models.transformer import FFN, MLP, MultiheadAttention
from bev3d.models.transformer.position_encoding import sine_embed, sine_embed_xy
from bev3d.models.transformer.rcda import RowColumnAttention


def pixel_centres(mask, dtype=torch.float32):
    """mask (B, H, W) True at padding -> normalised y (B, H) and x (B, W) of the pixel centres in the valid image."""
    y = (~mask[:, :, 0]).cumsum(1, dtype=dtype)
    x = (~mask[:, 0, :]).cumsum(1, dtype=dtype)
    return (y - 0.5) / y[:, -1:], (x - 0.5) / x[:, -1:]


def position_mlp(C):
    return nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C))


def rcda_attend(attn, query, query_pos, key, key_pos, mask):
    """RCDA of `query` (B, Q, C) over the map `key` (B, H, W, C), with (x, y) positions query_pos and key_pos."""
    return attn(query + query_pos[0], query + query_pos[1], key + key_pos[0], key + key_pos[1], key, mask)


class AnchorEncoderLayer(nn.Module):
    def __init__(self, embed_dims=256, num_heads=8, ffn_dims=1024, dropout=0.0, rcda=True):
        super().__init__()
        self.rcda = rcda
        self.self_attn = (RowColumnAttention if rcda else MultiheadAttention)(embed_dims, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)

    def forward(self, src, mask, pos):
        """src (B, H, W, C), mask (B, H, W); pos: (x, y) positions (B, H, W, C) each with RCDA, else (B, H, W, C)."""
        B, H, W, C = src.shape
        if self.rcda:
            attended = rcda_attend(self.self_attn, src.flatten(1, 2), [p.flatten(1, 2) for p in pos], src, pos, mask)
        else:
            attended = self.self_attn(src.flatten(1, 2), query_pos=pos.flatten(1, 2), key_padding_mask=mask.flatten(1))
        return self.ffn(self.norm(src + self.dropout(attended.view(B, H, W, C))))


class AnchorDecoderLayer(nn.Module):
    """Self-attention among the queries, cross-attention to the map (RCDA or standard), FFN; post-norm."""

    def __init__(self, embed_dims=256, num_heads=8, ffn_dims=1024, dropout=0.0, rcda=True):
        super().__init__()
        self.rcda = rcda
        self.self_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.cross_attn = (RowColumnAttention if rcda else MultiheadAttention)(embed_dims, num_heads, dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)

    def forward(self, tgt, query_pos, cross_query_pos, memory, mask, pos, self_attn_mask=None):
        """tgt, query_pos (B, Q, C); memory (B, H, W, C); cross_query_pos and pos as the encoder's pos."""
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, query_pos=query_pos, attn_mask=self_attn_mask)))
        if self.rcda:
            attended = rcda_attend(self.cross_attn, tgt, cross_query_pos, memory, pos, mask)
        else:
            flat = memory.flatten(1, 2)
            attended = self.cross_attn(tgt, flat, flat, query_pos=cross_query_pos, key_pos=pos.flatten(1, 2),
                                       key_padding_mask=mask.flatten(1))
        return self.ffn(self.norm2(tgt + self.dropout2(attended)))


class AnchorTransformer(nn.Module):
    """src (B, C, H, W), mask (B, H, W), query content (B, Q, C) and anchors (B, Q, 2) -> (L, B, Q, C).

    The positions are sine embeddings through `adapt_pos2d` (of (x, y)) and, for RCDA, `adapt_pos1d` (of x and
    y separately: each 1D attention compares positions along its own axis).
    """

    def __init__(self, embed_dims=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, ffn_dims=1024,
                 dropout=0.0, rcda=True):
        super().__init__()
        kw = dict(embed_dims=embed_dims, num_heads=num_heads, ffn_dims=ffn_dims, dropout=dropout, rcda=rcda)
        self.embed_dims, self.rcda = embed_dims, rcda
        self.encoder_layers = nn.ModuleList(AnchorEncoderLayer(**kw) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(AnchorDecoderLayer(**kw) for _ in range(num_decoder_layers))
        self.adapt_pos2d = position_mlp(embed_dims)
        self.adapt_pos1d = position_mlp(embed_dims) if rcda else None

    def forward(self, src, mask, tgt, reference, self_attn_mask=None):
        B, C, H, W = src.shape
        src = src.permute(0, 2, 3, 1)  # (B, H, W, C)
        y, x = pixel_centres(mask, torch.promote_types(src.dtype, torch.float32))
        query_pos = self.adapt_pos2d(sine_embed_xy(reference, C // 2))  # (B, Q, C)
        if self.rcda:
            pos_x = self.adapt_pos1d(sine_embed(x, C))[:, None].expand(B, H, W, C)
            pos_y = self.adapt_pos1d(sine_embed(y, C))[:, :, None].expand(B, H, W, C)
            pos = (pos_x, pos_y)
            cross_query_pos = [self.adapt_pos1d(sine_embed(reference[..., i], C)) for i in (0, 1)]
        else:
            grid = torch.stack([x[:, None].expand(B, H, W), y[:, :, None].expand(B, H, W)], -1)  # (B, H, W, 2)
            pos = self.adapt_pos2d(sine_embed_xy(grid, C // 2))
            cross_query_pos = query_pos
        for layer in self.encoder_layers:
            src = layer(src, mask, pos)
        outs = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, cross_query_pos, src, mask, pos, self_attn_mask)
            outs.append(tgt)
        return torch.stack(outs)


class AnchorDETR(SetDetector2D):
    """One class head and one box head shared by all decoder layers; the anchors are the same in every layer."""

    def __init__(self, backbone, neck, transformer, num_classes, num_anchors, num_patterns=3, anchors="learned"):
        super().__init__(backbone, neck, None)
        C = transformer.embed_dims
        self.transformer, self.num_patterns = transformer, num_patterns
        self.class_embed = nn.Linear(C, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))  # focal prior: p = 0.01
        self.bbox_embed = MLP(C, C, 4, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)  # first boxes start small
        self.pattern = nn.Embedding(num_patterns, C)
        if anchors == "learned":
            self.anchor = nn.Embedding(num_anchors, 2)
            nn.init.uniform_(self.anchor.weight, 0, 1)
        else:
            n = math.isqrt(num_anchors)
            centres = (torch.arange(n, dtype=torch.float32) + 0.5) / n
            grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).view(-1, 2)  # x-major (x, y)
            self.register_buffer("grid", grid, persistent=False)
            self.anchor = None

    def predict(self, img, mask, targets=None):
        feats, masks, _ = self.features(img, mask)
        B = img.shape[0]
        anchors = self.grid if self.anchor is None else self.anchor.weight  # (A, 2)
        # query p * A + a: pattern p at anchor a
        reference = anchors.repeat(self.num_patterns, 1)[None].expand(B, -1, -1)  # (B, Q, 2)
        tgt = self.pattern.weight.repeat_interleave(len(anchors), 0)[None].expand(B, -1, -1)  # (B, Q, C)
        dn = self.denoising_queries(targets, reference.shape[1], img.device)
        self_attn_mask = None
        if dn is not None:  # a copy is an anchor query at its noisy centre whose content embeds its label
            tgt = torch.cat([self.label_embed(dn.input_labels), tgt], 1)
            reference = torch.cat([dn.reference[..., :2], reference], 1)
            self_attn_mask = dn.attn_mask
        hidden = self.transformer(feats[-1], masks[-1], tgt, reference, self_attn_mask)  # (L, B, P + Q, C)
        boxes = boxes_around_points(self.bbox_embed(hidden), reference)
        return split_denoising(self.class_embed(hidden), boxes, dn)


def build(cfg):
    m, h = cfg.model, cfg.model.head
    check_config(cfg, focal=True, single_level=True)
    if h.num_patterns < 1 or h.num_queries % h.num_patterns:
        raise Bev3dError(f"model.head.num_queries ({h.num_queries}) must be a multiple of model.head.num_patterns "
                         f"({h.num_patterns}): every anchor point has one query per pattern.")
    num_anchors = h.num_queries // h.num_patterns
    if h.anchors == "grid" and math.isqrt(num_anchors) ** 2 != num_anchors:
        raise Bev3dError(f"model.head.anchors: grid needs a square number of anchor points, but num_queries / "
                         f"num_patterns = {num_anchors}: change model.head.num_queries or use anchors: learned.")
    transformer = AnchorTransformer(h.embed_dims, h.num_heads, h.num_encoder_layers, h.num_decoder_layers,
                                    h.ffn_dims, h.dropout, rcda=h.attention == "rcda")
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels)
    model = AnchorDETR(backbone, neck, transformer, h.num_classes, num_anchors, h.num_patterns, h.anchors)
    model.enable_denoising(build_denoising(cfg), h.num_classes, h.embed_dims, position=False)
    return model
