"""2D positional encodings of feature maps: sine (DETR / Deformable DETR) and learned."""

import math

import torch
import torch.nn as nn


class PositionEmbeddingSine(nn.Module):
    """mask (B, H, W), True at padding -> (B, 2*num_feats, H, W), channels [y-part, x-part].

    Coordinates are the cumulative count of valid pixels, so padding does not shift positions; with
    `normalize` they are divided by the valid extent and scaled to [0, 2*pi]. `offset` = -0.5 gives
    Deformable DETR's pixel-centre variant, 0 DETR's.
    """

    def __init__(self, num_feats=128, temperature=10000, normalize=True, scale=2 * math.pi, offset=0.0,
                 eps=1e-6):
        super().__init__()
        self.num_feats, self.temperature, self.normalize = num_feats, temperature, normalize
        self.scale, self.offset, self.eps = scale, offset, eps

    def forward(self, mask):
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)  # (B, H, W)
        x = not_mask.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos_x = x[..., None] / dim_t  # (B, H, W, F)
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """mask (B, H, W) -> (B, 2*num_feats, H, W) from learned row and column tables (H, W <= size)."""

    def __init__(self, num_feats=128, size=50):
        super().__init__()
        self.row_embed = nn.Embedding(size, num_feats)
        self.col_embed = nn.Embedding(size, num_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask):
        B, H, W = mask.shape
        x = self.col_embed(torch.arange(W, device=mask.device))  # (W, F)
        y = self.row_embed(torch.arange(H, device=mask.device))  # (H, F)
        pos = torch.cat((x[None].expand(H, W, -1), y[:, None].expand(H, W, -1)), dim=-1)
        return pos.permute(2, 0, 1)[None].expand(B, -1, -1, -1)


def build_position_encoding(kind, embed_dims, offset=0.0):
    """"sine" | "learned" -> module producing embed_dims channels."""
    if kind == "sine":
        return PositionEmbeddingSine(embed_dims // 2, normalize=True, offset=offset)
    if kind == "learned":
        return PositionEmbeddingLearned(embed_dims // 2)
    raise ValueError(f"position encoding must be 'sine' or 'learned', got {kind!r}")


def sine_embed(values, num_feats, temperature=10000, scale=2 * math.pi):
    """(...) values in [0, 1] -> (..., num_feats) [sin, cos, sin, ...] at DETR's frequencies (one coordinate)."""
    dtype = torch.promote_types(values.dtype, torch.float32)  # at least float32: angles up to 2 pi
    dim_t = torch.arange(num_feats, dtype=dtype, device=values.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = values[..., None].to(dtype) * scale / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_embed_xy(points, num_feats):
    """(..., 2) normalised (x, y) -> (..., 2 * num_feats) as [y-part, x-part], the channel order of
    PositionEmbeddingSine, so that a query's embedding and the feature map's are comparable."""
    return torch.cat([sine_embed(points[..., 1], num_feats), sine_embed(points[..., 0], num_feats)], -1)
