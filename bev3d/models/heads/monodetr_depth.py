"""MonoDETR's depth predictor: a foreground depth map over linear-increasing depth bins and the depth tokens that
the decoder's depth cross-attention reads."""

import torch.nn as nn
import torch.nn.functional as F

from bev3d.geometry import lid_index
from bev3d.models.core.box_coder_mono import lid_edges
from bev3d.models.transformer.detr_transformer import TransformerEncoderLayer


def conv_gn(in_channels, out_channels, kernel_size, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2),
                         nn.GroupNorm(32, out_channels))


def interpolate_embedding(index, table):
    """(...) continuous row indices in [0, rows - 1] -> (..., C) linear interpolation of the rows of `table`."""
    lo = index.floor().clamp(0, table.num_embeddings - 1)
    frac = (index - lo)[..., None]
    hi = (lo + 1).clamp(max=table.num_embeddings - 1)
    return table(lo.long()) * (1 - frac) + table(hi.long()) * frac


class DepthPredictor(nn.Module):
    """The first three feature levels (strides s, 2s, 4s) fused at the second's resolution -> depth-bin logits
    (K + 1 bins, the last one background) and depth tokens: one transformer encoder layer over the fused features
    plus a learned depth embedding per bin edge, interpolated at each cell's expected depth."""

    def __init__(self, embed_dims=256, num_bins=80, depth_min=1e-3, depth_max=60.0, num_heads=8, ffn_dims=256,
                 dropout=0.1):
        super().__init__()
        C = embed_dims
        self.num_bins, self.depth_min, self.depth_max = num_bins, depth_min, depth_max
        # the depth each bin stands for: its lower edge; the background bin stands for depth_max
        self.register_buffer("bin_depths", lid_edges(num_bins, depth_min, depth_max), persistent=False)
        self.downsample = conv_gn(C, C, 3, stride=2)
        self.proj = conv_gn(C, C, 1)
        self.upsample = conv_gn(C, C, 1)
        self.head = nn.Sequential(conv_gn(C, C, 3), nn.ReLU(inplace=True), conv_gn(C, C, 3), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(C, num_bins + 1, 1)
        self.encoder = TransformerEncoderLayer(C, num_heads, ffn_dims, dropout)
        self.depth_embed = nn.Embedding(num_bins + 1, C)

    def forward(self, feats, mask, pos):
        """feats: levels 0..2 (B, C, H_l, W_l); mask (B, H_1, W_1) True at padding and pos (B, C, H_1, W_1) of level 1
        -> depth logits (B, K + 1, H_1, W_1), depth tokens (B, H_1*W_1, C), expected depth (B, H_1, W_1)."""
        size = feats[1].shape[-2:]
        x = (self.downsample(feats[0]) + self.proj(feats[1]) +
             self.upsample(F.interpolate(feats[2], size=size, mode="bilinear", align_corners=False))) / 3
        x = self.head(x)
        logits = self.classifier(x)
        depth = (logits.softmax(1) * self.bin_depths.view(1, -1, 1, 1)).sum(1)  # (B, H, W)
        tokens = self.encoder(x.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2), mask.flatten(1))
        index = lid_index(depth, self.num_bins, self.depth_min, self.depth_max).clamp(0, self.num_bins)
        return logits, tokens + interpolate_embedding(index.flatten(1), self.depth_embed), depth
