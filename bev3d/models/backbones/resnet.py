"""ResNet-18/34/50/101 with torchvision's state-dict keys (conv1, bn1, layer1..4, downsample.0/1).

Options follow mmdet's ResNet: frozen BatchNorm, `frozen_stages`, `norm_eval`, caffe style (stride on
the first 1x1 conv of a bottleneck instead of the 3x3), gradient checkpointing, `out_indices`,
`base_channels` (64 in the real networks; smaller widths make CPU-sized models for tests) and
`dcn_stages` (stage indices 0..3, as `out_indices`, whose bottleneck 3x3 convs are DCNv2 with mmcv's keys
`layerS.B.conv2.weight`, `layerS.B.conv2.conv_offset.{weight,bias}`; [2, 3] in PETR and DETR3D).
"""

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

from bev3d.errors import Bev3dError
from bev3d.models.backbones.common import StagedBackbone, read_state_dict
from bev3d.models.backbones.dcn import ModulatedDeformConv2d

ARCH = {  # depth -> (block, blocks per stage)
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, so no gradients, no updates)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision BatchNorm2d checkpoints carry a counter this module does not need.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _norm(frozen_bn):
    return FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, norm, style="pytorch"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def residual(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, norm, style="pytorch", dcn=False):
        super().__init__()
        s1, s3 = (stride, 1) if style == "caffe" else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False)
        self.bn1 = norm(planes)
        if dcn:
            self.conv2 = ModulatedDeformConv2d(planes, planes, 3, s3, 1)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, s3, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def residual(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def _block_forward(block, x):
    identity = x if block.downsample is None else block.downsample(x)
    return block.residual(x) + identity


class ResNet(StagedBackbone):
    """(B, 3, H, W) -> list of feature maps, one per `out_indices` entry (0..3 = C2..C5, strides 4..32)."""

    def __init__(self, depth=50, style="pytorch", frozen_stages=-1, norm_eval=True, out_indices=(3,),
                 with_cp=False, frozen_bn=True, base_channels=64, dcn_stages=()):
        super().__init__()
        if depth not in ARCH:
            raise Bev3dError(f"model.backbone.depth must be one of {sorted(ARCH)}, got {depth}.")
        if style not in ("pytorch", "caffe"):
            raise Bev3dError(f"model.backbone.style must be 'pytorch' or 'caffe', got {style!r}.")
        if not out_indices or any(i not in (0, 1, 2, 3) for i in out_indices):
            raise Bev3dError(f"model.backbone.out_indices must be a non-empty list from 0..3, got {list(out_indices)}.")
        kind, layers = ARCH[depth]
        if any(i not in (0, 1, 2, 3) for i in dcn_stages):
            raise Bev3dError(f"model.backbone.dcn_stages must list stage indices from 0..3, got {list(dcn_stages)}.")
        if dcn_stages and kind == "basic":
            raise Bev3dError(f"model.backbone.dcn_stages needs bottleneck blocks (depth 50 or 101); ResNet-{depth} "
                             f"has basic blocks. Set dcn_stages to [] or choose depth 50 or 101.")
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        norm = _norm(frozen_bn)
        self.depth, self.style, self.frozen_stages = depth, style, frozen_stages
        self.norm_eval, self.with_cp, self.out_indices = norm_eval, with_cp, tuple(out_indices)

        self.conv1 = nn.Conv2d(3, base_channels, 7, 2, 3, bias=False)
        self.bn1 = norm(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = base_channels
        for i, n in enumerate(layers):
            planes, stride = base_channels * 2**i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                    norm(planes * block.expansion),
                )
            dcn = {"dcn": True} if i in dcn_stages else {}
            blocks = [block(inplanes, planes, stride, downsample, norm, style, **dcn)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes, 1, None, norm, style, **dcn) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        # Channels of each output, in out_indices order (what a neck's in_channels must list).
        self.out_channels = [base_channels * 2**i * block.expansion for i in self.out_indices]
        self._freeze_stages()

    def stem_and_stages(self):
        return [nn.ModuleList([self.conv1, self.bn1])] + [getattr(self, f"layer{i}") for i in range(1, 5)]

    def _run_block(self, block, x):
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_block_forward, block, x, use_reentrant=False)
        return _block_forward(block, x)

    def forward(self, x):  # (B, 3, H, W)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4):
            for block in getattr(self, f"layer{i + 1}"):
                x = block.relu(self._run_block(block, x))
            if i in self.out_indices:
                outs.append(x)  # (B, C_i, H / 2**(i+2), W / 2**(i+2))
            if i >= max(self.out_indices):
                break
        return outs

    def load_weights(self, path):
        """Load a local torchvision or MSRA-caffe (Detectron `res2_0_branch2a_w` style) checkpoint.

        Returns (missing, unexpected) key lists; the classifier head (fc.*) is dropped silently.
        """
        state = read_state_dict(path)
        if any(k.startswith(("res2_", "res_conv1_", "conv1_w")) for k in state):
            state = _caffe_to_torchvision(state)
        return self.load_partial({k: v for k, v in state.items() if not k.startswith("fc.")})


def _caffe_to_torchvision(state):
    """MSRA/Detectron caffe names -> torchvision names (BN folded into scale `_s` and bias `_b`).

    res{stage}_{block}_branch2{a,b,c}_w  -> layer{stage-1}.{block}.conv{1,2,3}.weight
    res{stage}_{block}_branch1_w         -> layer{stage-1}.{block}.downsample.0.weight
    ..._bn_s / _bn_b                     -> matching bn .weight / .bias (running stats 0 / 1)
    conv1_w, res_conv1_bn_s/_b           -> conv1.weight, bn1.weight/.bias
    """
    out = {}
    branch = {"branch2a": ("conv1", "bn1"), "branch2b": ("conv2", "bn2"), "branch2c": ("conv3", "bn3"),
              "branch1": ("downsample.0", "downsample.1")}
    for k, v in state.items():
        if k.startswith("pred_"):  # the ImageNet classifier
            continue
        if k == "conv1_w":
            out["conv1.weight"] = v
            continue
        if k.startswith("res_conv1_bn_"):
            bn, suffix = "bn1", k[len("res_conv1_bn_"):]
        elif k.startswith("res") and "_branch" in k:
            stage, block, rest = k[3:].split("_", 2)
            name, tail = rest.split("_", 1)
            conv, norm = branch[name]
            base = f"layer{int(stage) - 1}.{block}."
            if tail == "w":
                out[base + conv + ".weight"] = v
                continue
            bn, suffix = base + norm, tail[len("bn_"):]
        else:
            out[k] = v  # unknown: reported as unexpected by load_weights
            continue
        out[f"{bn}.{'weight' if suffix == 's' else 'bias'}"] = v
        out.setdefault(f"{bn}.running_mean", torch.zeros_like(v))
        # Caffe BN is a pure affine: var = 1 - eps makes FrozenBatchNorm2d's rsqrt(var + eps) exactly 1.
        out.setdefault(f"{bn}.running_var", torch.full_like(v, 1 - 1e-5))
    return out
