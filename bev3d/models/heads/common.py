"""Pieces both 3D heads share: per-layer prediction branches and the sine embedding of 3D points."""

import math

import torch
import torch.nn as nn

from bev3d.models.core.box_coder_3d import CODE_SIZE, refine_centres, with_centres
from bev3d.models.transformer.utils import inverse_sigmoid


def _cls_branch(embed_dims, num_classes):
    layers = []
    for _ in range(2):
        layers += [nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True)]
    head = nn.Linear(embed_dims, num_classes)
    # Focal-loss prior: every class starts at probability 0.01 so the many negatives do not swamp training.
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    return nn.Sequential(*layers, head)


def _reg_branch(embed_dims):
    layers = []
    for _ in range(2):
        layers += [nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(embed_dims, CODE_SIZE))


class PredictionBranches(nn.Module):
    """Class and box branches for every decoder layer: separate per layer, or one shared pair."""

    def __init__(self, embed_dims, num_classes, num_layers, pc_range, shared):
        super().__init__()
        self.pc_range = pc_range
        count = 1 if shared else num_layers
        self.cls_branches = nn.ModuleList(_cls_branch(embed_dims, num_classes) for _ in range(count))
        self.reg_branches = nn.ModuleList(_reg_branch(embed_dims) for _ in range(count))

    def forward(self, layer, hidden, reference):
        """hidden (B, Q, C), reference (B, Q, 3) fractions of pc_range ->
        class logits (B, Q, num_classes), box code (B, Q, 10) with centres in metres, centres (B, Q, 3) fractions."""
        i = min(layer, len(self.cls_branches) - 1)
        # float32 even under autocast: a bf16 offset in inverse-sigmoid space is quantised to ~0.4 m at the
        # centre of a 100 m range, more than the 0.5 m of the tightest mAP threshold
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.float()
            code = self.reg_branches[i](hidden)
            centres = refine_centres(code, inverse_sigmoid(reference.float()))
            logits = self.cls_branches[i](hidden)
        return logits, with_centres(code, centres, self.pc_range), centres


def sine_embed_points(points, num_feats, temperature=10000):
    """(..., 3) points in [0, 1] -> (..., 3 * num_feats) sine embedding, channels [y, x, z] (PETR's order)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=points.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = points[..., None] * (2 * math.pi) / dim_t  # (..., 3, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(-2)
    return torch.cat([pos[..., 1, :], pos[..., 0, :], pos[..., 2, :]], -1)
