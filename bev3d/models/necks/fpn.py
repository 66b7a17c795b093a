"""Feature Pyramid Network (Lin et al. 2017) with optional extra stride-2 levels, mmdet-style options."""

import torch.nn as nn
import torch.nn.functional as F

from bev3d.errors import Bev3dError


class FPN(nn.Module):
    """list of (B, C_i, H_i, W_i) -> list of `num_outs` maps (B, out_channels, H_j, W_j).

    Inputs from `start_level` on get a 1x1 lateral conv, a top-down nearest-upsampling sum and a 3x3
    output conv: on every level (`output_convs="all"`), or on the first only, the others being the bare
    top-down sums (`"first"`, PETR's CPFPN: keys `lateral_convs.{0..}` and `fpn_convs.0` only; CPFPN puts
    that conv on input 0, so with start_level > 0 it has none, while "first" keeps it on the first level). Levels
    beyond the inputs are a chain of 3x3 stride-2 convs (ReLU between them) that starts from the last input
    (`extra_on="input"`, RetinaNet's P6 on C5) or the last output (`"output"`).
    """

    def __init__(self, in_channels, out_channels=256, start_level=0, num_outs=None, extra_on="input",
                 output_convs="all"):
        super().__init__()
        if output_convs not in ("all", "first"):
            raise Bev3dError(f"model.neck.output_convs must be 'all' (a 3x3 conv on every level) or 'first' "
                             f"(on the first level only, PETR's CPFPN), got {output_convs!r}.")
        num_ins = len(in_channels) - start_level
        num_outs = num_ins if num_outs is None else num_outs
        if num_ins < 1 or num_outs < num_ins:
            raise Bev3dError(f"model.neck: start_level={start_level} leaves {num_ins} of in_channels={in_channels}, "
                             f"and num_outs={num_outs} must be at least that many.")
        self.in_channels, self.start_level, self.num_outs, self.extra_on = in_channels, start_level, num_outs, extra_on
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels[start_level:])
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                       for _ in range(num_ins if output_convs == "all" else 1))
        extra_in = in_channels[-1] if extra_on == "input" else out_channels
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(extra_in if i == 0 else out_channels, out_channels, 3, stride=2, padding=1)
            for i in range(num_outs - num_ins))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats):
        if len(feats) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} inputs, got {len(feats)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats[self.start_level:])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + laterals[len(self.fpn_convs):]
        x = feats[-1] if self.extra_on == "input" else outs[-1]
        for i, conv in enumerate(self.extra_convs):
            x = conv(x if i == 0 else F.relu(x))
            outs.append(x)
        return outs
