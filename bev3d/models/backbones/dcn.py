"""DCNv2, modulated deformable convolution (Zhu et al. 2019), with mmcv's `ModulatedDeformConv2dPack` keys.

State dict: `weight (C_out, C_in, kh, kw)` (no bias: it replaces a ResNet conv that BatchNorm follows),
`conv_offset.weight (3 * G * kh * kw, C_in, kh, kw)` and `conv_offset.bias (3 * G * kh * kw,)`, G the
deform groups (27 channels for 3x3, G = 1). `conv_offset` starts at zero, as in mmcv: a regular grid
with every tap scaled by sigmoid(0) = 0.5.

Layouts, as read in mmcv (open-mmlab/mmcv `mmcv/ops/modulated_deform_conv.py:327-335`,
`ModulatedDeformConv2dPack.forward`; the im2col loops `mmcv/ops/csrc/pytorch/cpu/modulated_deform_conv.cpp:137-163`
and `mmcv/ops/csrc/common/cuda/modulated_deform_conv_cuda_kernel.cuh:214-240`):

- `conv_offset`'s output is chunked into thirds (o1, o2, m); offset = cat(o1, o2), mask = sigmoid(m).
- offset, per deform group g and kernel tap k = i * kw + j: dy at channel g * 2K + 2k, dx at g * 2K + 2k + 1
  (interleaved pairs: o1 is not "all dy"); mask: channel g * K + k. Group g covers input channels
  [g * C_in / G, (g + 1) * C_in / G).
- tap (i, j) of output cell (y, x) reads the input at (y * stride - pad + i * dilation + dy,
  x * stride - pad + j * dilation + dx), bilinearly; each of the four neighbours outside the image counts as
  0, so a sample at or beyond -1 or H (W) gives 0.

torchvision (`torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp`, `deformable_im2col_kernel`: offset_h at
channel 2 * mask_idx, offset_w at 2 * mask_idx + 1, mask_idx = i * weight_w + j; `bilinear_interpolate`)
reads the same layout with the same border rule, so offset and mask go to it unchanged.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from bev3d.errors import Bev3dError
from bev3d.ops.torchvision_ops import check_backend, torchvision_backend


def modulated_deform_conv2d(x, offset, mask, weight, stride=1, padding=0, dilation=1, backend="auto"):
    """x (B, C_in, H, W), offset (B, 2 G K, H_out, W_out), mask (B, G K, H_out, W_out),
    weight (C_out, C_in, kh, kw) -> (B, C_out, H_out, W_out); K = kh * kw, layouts in the module docstring.

    `backend`: "torchvision" (its C++/CUDA kernel), "torch" (grid_sample and a matmul), or "auto" (torchvision
    for CUDA tensors where it imports; on the CPU "torch" is as fast forward and faster backward,
    docs/benchmarks.md). Runs in float32 (float64 stays float64) with autocast off, as torchvision's CUDA
    autocast rule does; the result has x's dtype.
    """
    tv_op = torchvision_backend("deform_conv2d", backend, "DCN")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weight.shape[-2:]
    h_out = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    groups = mask.shape[1] // (kh * kw)
    if (groups < 1 or mask.shape[1:] != (groups * kh * kw, h_out, w_out) or x.shape[1] % groups
            or offset.shape[1:] != (2 * groups * kh * kw, h_out, w_out)):
        raise ValueError(f"DCN: offset {tuple(offset.shape)} / mask {tuple(mask.shape)} do not fit input "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)} (output {h_out}x{w_out})")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        xc, offset, mask, weight = (t.to(dtype) for t in (x, offset, mask, weight))
        if backend == "torchvision" or (backend == "auto" and tv_op is not None and x.is_cuda):
            out = tv_op(xc, offset, weight, stride=stride, padding=padding, dilation=dilation, mask=mask)
        else:
            out = _deform_conv2d_torch(xc, offset, mask, weight, stride, padding, dilation)
    return out.to(x.dtype)


def _deform_conv2d_torch(x, offset, mask, weight, stride, padding, dilation):
    b, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    k = kh * kw
    h_out, w_out = offset.shape[-2:]
    g = mask.shape[1] // k
    # Regular-grid position of every tap, in input pixels: rows (K, H_out, 1), columns (K, 1, W_out).
    tap_y = torch.arange(kh, device=x.device, dtype=x.dtype).repeat_interleave(kw) * dilation[0]
    tap_x = torch.arange(kw, device=x.device, dtype=x.dtype).repeat(kh) * dilation[1]
    rows = torch.arange(h_out, device=x.device, dtype=x.dtype) * stride[0] - padding[0]
    cols = torch.arange(w_out, device=x.device, dtype=x.dtype) * stride[1] - padding[1]
    offset = offset.view(b, g, k, 2, h_out, w_out)
    py = tap_y.view(k, 1, 1) + rows.view(1, h_out, 1) + offset[:, :, :, 0]  # (B, G, K, H_out, W_out)
    px = tap_x.view(k, 1, 1) + cols.view(1, 1, w_out) + offset[:, :, :, 1]
    # align_corners=False maps pixel p to (2p + 1) / size - 1 for any size (also 1); zero padding drops
    # each outside neighbour, mmcv's border rule.
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
    samples = F.grid_sample(x.reshape(b * g, c // g, h, w), grid.view(b * g, k * h_out, w_out, 2),
                            mode="bilinear", padding_mode="zeros", align_corners=False)  # (B G, C / G, K H_out, W_out)
    samples = samples.view(b, g, c // g, k, h_out, w_out) * mask.view(b, g, 1, k, h_out, w_out)
    # weight flattens to (C_out, C_in K) with index c * K + k, the order of the samples' (C, K) axes.
    out = weight.reshape(c_out, c * k) @ samples.reshape(b, c * k, h_out * w_out)  # (B, C_out, H_out W_out)
    return out.view(b, c_out, h_out, w_out)


class ModulatedDeformConv2d(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H_out, W_out): a conv whose taps move by offsets and are scaled by masks
    that `conv_offset` predicts from the input (same stride, padding and dilation as the conv)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1, deform_groups=1,
                 backend="auto"):
        super().__init__()
        check_backend(backend, "DCN")
        if in_channels % deform_groups:
            raise Bev3dError(f"DCN deform_groups={deform_groups} must divide in_channels={in_channels}.")
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.deform_groups, self.backend = deform_groups, backend
        kh, kw = _pair(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        # nn.Conv2d's initialisation, and no random draws for conv_offset (zeroed anyway): a DCN in place of
        # a plain conv leaves the random initialisation of every other layer as it was.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.conv_offset = nn.utils.skip_init(nn.Conv2d, in_channels, 3 * deform_groups * kh * kw, (kh, kw),
                                              self.stride, self.padding, self.dilation)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):  # (B, C_in, H, W)
        o1, o2, m = self.conv_offset(x).chunk(3, dim=1)  # each (B, G K, H_out, W_out)
        return modulated_deform_conv2d(x, torch.cat((o1, o2), dim=1), m.sigmoid(), self.weight, self.stride,
                                       self.padding, self.dilation, self.backend)

    def extra_repr(self):
        c_out, c_in, kh, kw = self.weight.shape
        return (f"{c_in}, {c_out}, kernel_size={(kh, kw)}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, deform_groups={self.deform_groups}")
