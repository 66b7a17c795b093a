"""DETR's encoder-decoder transformer (Carion et al. 2020): post-norm, positions added to q/k at every layer.

All tensors are batch-first: memory (B, S, C), queries (B, Q, C).
"""

import torch
import torch.nn as nn

from bev3d.models.transformer.attention import MultiheadAttention
from bev3d.models.transformer.utils import FFN


class TransformerEncoderLayer(nn.Module):
    def __init__(self, embed_dims=256, num_heads=8, ffn_dims=2048, dropout=0.1):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)

    def forward(self, src, pos=None, key_padding_mask=None):  # (B, S, C)
        src = self.norm(src + self.dropout(self.self_attn(src, query_pos=pos, key_padding_mask=key_padding_mask)))
        return self.ffn(src)


class TransformerDecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to memory, FFN; each followed by add & LayerNorm.

    `cross_attn` is the cross-attention's class (a MultiheadAttention whose attn_mask may be another kind of
    bias, e.g. PETR's ray bias)."""

    def __init__(self, embed_dims=256, num_heads=8, ffn_dims=2048, dropout=0.1, cross_attn=MultiheadAttention):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.cross_attn = cross_attn(embed_dims, num_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)

    def forward(self, tgt, memory, query_pos=None, pos=None, key_padding_mask=None, self_attn_mask=None,
                cross_attn_mask=None):
        """tgt (B, Q, C), memory (B, S, C), query_pos (B, Q, C), pos (B, S, C), key_padding_mask (B, S);
        masks as in MultiheadAttention."""
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, query_pos=query_pos, attn_mask=self_attn_mask)))
        attended = self.cross_attn(tgt, memory, memory, query_pos=query_pos, key_pos=pos,
                                   key_padding_mask=key_padding_mask, attn_mask=cross_attn_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.ffn(tgt)


class TransformerEncoder(nn.Module):
    def __init__(self, num_layers, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src, pos=None, key_padding_mask=None):
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


class TransformerDecoder(nn.Module):
    """Stack of decoder layers; returns every layer's output through the shared final LayerNorm."""

    def __init__(self, num_layers, embed_dims=256, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(embed_dims, **layer_kwargs) for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, tgt, memory, query_pos=None, pos=None, key_padding_mask=None, self_attn_mask=None):
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, pos, key_padding_mask, self_attn_mask)
            outs.append(self.norm(tgt))
        return torch.stack(outs)  # (num_layers, B, Q, C)


class Transformer(nn.Module):
    """DETR: encode the flattened feature map, decode `query_embed` against it.

    src (B, C, H, W), mask (B, H, W) True at padding, query_embed (Q, C) or (B, Q, C), pos (B, C, H, W)
    -> decoder outputs (num_decoder_layers, B, Q, C). `tgt` (B, Q, C) is the decoder's input content (zeros by
    default); `self_attn_mask` masks the queries' self-attention (query denoising).
    """

    def __init__(self, embed_dims=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, ffn_dims=2048,
                 dropout=0.1):
        super().__init__()
        kw = dict(num_heads=num_heads, ffn_dims=ffn_dims, dropout=dropout)
        self.embed_dims = embed_dims
        self.encoder = TransformerEncoder(num_encoder_layers, embed_dims=embed_dims, **kw)
        self.decoder = TransformerDecoder(num_decoder_layers, embed_dims=embed_dims, **kw)

    def forward(self, src, mask, query_embed, pos, tgt=None, self_attn_mask=None):
        B = src.shape[0]
        src = src.flatten(2).transpose(1, 2)  # (B, HW, C)
        pos = pos.flatten(2).transpose(1, 2)
        mask = mask.flatten(1)  # (B, HW)
        memory = self.encoder(src, pos, mask)
        query_pos = query_embed.expand(B, -1, -1)  # (B, Q, C)
        tgt = torch.zeros_like(query_pos) if tgt is None else tgt
        return self.decoder(tgt, memory, query_pos, pos, mask, self_attn_mask)
