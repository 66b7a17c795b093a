"""VoVNetV2 with eSE (Lee and Park, CenterMask 2020): the `VoVNetCP` backbone of PETR, DETR3D and StreamPETR
(`V-99-eSE`, their "V2-99"), with the state-dict keys of their released backbone files:

- stem: `stem.stem_{1,2,3}/{conv,norm}.*`, three 3x3 convs (64, 64, 128 channels, strides 2, 1, 2);
- stage s = 2..5, block b = 1..n_s: `stage{s}.OSA{s}_{b}.layers.{i}.OSA{s}_{b}_{i}/{conv,norm}.*` (i < 5),
  `stage{s}.OSA{s}_{b}.concat.OSA{s}_{b}_concat/{conv,norm}.*`, `stage{s}.OSA{s}_{b}.ese.fc.{weight,bias}`;
  stages 3-5 open with a parameter-free `Pooling` (3x3 max pool, stride 2, ceil mode).

Convs have no bias; every conv is followed by BatchNorm and ReLU. The official stages always checkpoint
their blocks in training; here that is `with_cp`.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from bev3d.errors import Bev3dError
from bev3d.models.backbones.common import StagedBackbone, read_state_dict
from bev3d.models.backbones.resnet import FrozenBatchNorm2d

STEM_CH = (64, 64, 128)
STAGE_CH = (128, 160, 192, 224)  # width of the 3x3 convs inside each stage's blocks
CONCAT_CH = (256, 512, 768, 1024)  # block (and stage) output channels
LAYERS_PER_BLOCK = 5
BLOCKS = {39: (1, 1, 2, 2), 57: (1, 1, 4, 3), 99: (1, 3, 9, 3)}  # depth -> blocks per stage, V-{depth}-eSE


def _conv_norm_relu(c_in, c_out, kernel, stride, name, norm):
    return [(f"{name}/conv", nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)),
            (f"{name}/norm", norm(c_out)), (f"{name}/relu", nn.ReLU(inplace=True))]


class ESE(nn.Module):
    """Effective squeeze-excitation: x * hard_sigmoid(fc(spatial mean of x)), one full-width 1x1 conv."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):  # (B, C, H, W)
        return x * F.hardsigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class OSABlock(nn.Module):
    """One-shot aggregation: a chain of 3x3 convs whose outputs are concatenated once, with the block input,
    then a 1x1 `concat` conv and eSE; the blocks after a stage's first add their input (`identity`)."""

    def __init__(self, in_ch, stage_ch, concat_ch, name, identity, norm):
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList(
            nn.Sequential(OrderedDict(_conv_norm_relu(stage_ch if i else in_ch, stage_ch, 3, 1, f"{name}_{i}", norm)))
            for i in range(LAYERS_PER_BLOCK))
        self.concat = nn.Sequential(OrderedDict(
            _conv_norm_relu(in_ch + LAYERS_PER_BLOCK * stage_ch, concat_ch, 1, 1, f"{name}_concat", norm)))
        self.ese = ESE(concat_ch)

    def forward(self, x):  # (B, in_ch, H, W) -> (B, concat_ch, H, W)
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats[-1]))
        out = self.ese(self.concat(torch.cat(feats, dim=1)))
        return out + x if self.identity else out


class VoVNet(StagedBackbone):
    """(B, 3, H, W) -> list of feature maps, one per `out_indices` entry (0..3 = stage2..stage5, strides
    4..32, 256/512/768/1024 channels; the official `out_features=("stage4", "stage5")` is [2, 3]).

    `frozen_stages`: -1 none, 0 the stem, k the stem and stages 2..k+1 (ResNet's numbering). `norm_eval`
    keeps BatchNorm statistics fixed in training; `frozen_bn` also fixes its affine parameters (the official
    recipes train them: frozen_bn false, norm_eval true).
    """

    def __init__(self, depth=99, frozen_stages=-1, norm_eval=True, out_indices=(3,), with_cp=False, frozen_bn=True):
        super().__init__()
        if depth not in BLOCKS:
            raise Bev3dError(f"model.backbone.depth must be one of {sorted(BLOCKS)} for a VoVNet (V-<depth>-eSE), "
                             f"got {depth}.")
        if not out_indices or any(i not in (0, 1, 2, 3) for i in out_indices):
            raise Bev3dError(f"model.backbone.out_indices must be a non-empty list from 0..3, got {list(out_indices)}.")
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.frozen_stages, self.norm_eval, self.with_cp = frozen_stages, norm_eval, with_cp
        self.out_indices = tuple(out_indices)

        c1, c2, c3 = STEM_CH
        self.stem = nn.Sequential(OrderedDict(
            _conv_norm_relu(3, c1, 3, 2, "stem_1", norm) + _conv_norm_relu(c1, c2, 3, 1, "stem_2", norm)
            + _conv_norm_relu(c2, c3, 3, 2, "stem_3", norm)))
        in_ch = c3
        for i, n in enumerate(BLOCKS[depth]):
            s = i + 2
            stage = nn.Sequential()
            if s > 2:
                stage.add_module("Pooling", nn.MaxPool2d(3, 2, ceil_mode=True))
            for b in range(n):
                stage.add_module(f"OSA{s}_{b + 1}", OSABlock(in_ch if b == 0 else CONCAT_CH[i], STAGE_CH[i],
                                                             CONCAT_CH[i], f"OSA{s}_{b + 1}", b > 0, norm))
            setattr(self, f"stage{s}", stage)
            in_ch = CONCAT_CH[i]
        # Channels of each output, in out_indices order (what a neck's in_channels must list).
        self.out_channels = [CONCAT_CH[i] for i in self.out_indices]
        self._freeze_stages()

    def stem_and_stages(self):
        return [self.stem] + [getattr(self, f"stage{s}") for s in range(2, 6)]

    def forward(self, x):  # (B, 3, H, W)
        x = self.stem(x)
        outs = []
        for i in range(4):
            for module in getattr(self, f"stage{i + 2}"):
                if self.with_cp and x.requires_grad and isinstance(module, OSABlock):
                    x = cp.checkpoint(module, x, use_reentrant=False)
                else:
                    x = module(x)
            if i in self.out_indices:
                outs.append(x)  # (B, CONCAT_CH[i], ~H / 2**(i+2), ~W / 2**(i+2))
            if i >= max(self.out_indices):
                break
        return outs

    def load_weights(self, path):
        """Load a local VoVNet backbone file (or a detector's, its prefixes stripped) -> (missing, unexpected)."""
        return self.load_partial(read_state_dict(path))
