"""Per-level 1x1 projections to a common width (DETR's and Deformable DETR's `input_proj`)."""

import torch.nn as nn

from bev3d.errors import Bev3dError


def _conv_norm(c_in, c_out, kernel, stride, norm):
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    if norm == "none":
        return nn.Sequential(conv)
    return nn.Sequential(conv, nn.GroupNorm(32, c_out))


class ChannelMapper(nn.Module):
    """list of (B, C_i, H_i, W_i) -> list of `num_outs` maps (B, out_channels, H_j, W_j).

    Each input gets conv1x1 (+ GroupNorm(32) when norm="gn"); each extra level is conv3x3 stride 2
    (+ GroupNorm) on the last input, then on the previous extra level, as in Deformable DETR.
    """

    def __init__(self, in_channels, out_channels=256, num_outs=None, norm="none"):
        super().__init__()
        num_outs = len(in_channels) if num_outs is None else num_outs
        if norm not in ("none", "gn"):
            raise Bev3dError(f"model.neck.norm must be 'none' or 'gn', got {norm!r}.")
        if num_outs < len(in_channels):
            raise Bev3dError(f"model.neck.num_outs={num_outs} must be at least len(in_channels)={len(in_channels)}.")
        self.in_channels = in_channels
        self.convs = nn.ModuleList(_conv_norm(c, out_channels, 1, 1, norm) for c in in_channels)
        self.extra_convs = nn.ModuleList(
            _conv_norm(in_channels[-1] if i == 0 else out_channels, out_channels, 3, 2, norm)
            for i in range(num_outs - len(in_channels)))

    def forward(self, feats):
        if len(feats) != len(self.in_channels):
            raise ValueError(f"ChannelMapper expects {len(self.in_channels)} inputs, got {len(feats)}")
        outs = [conv(x) for conv, x in zip(self.convs, feats)]
        x = feats[-1]
        for conv in self.extra_convs:
            x = conv(x)
            outs.append(x)
        return outs
