"""RoIAlign (He et al. 2017) and its FPN multi-level form, with torchvision's semantics.

`roi_align` is `torchvision.ops.roi_align`: rois (K, 5) as (batch index, x1, y1, x2, y2) in input pixels, scaled by
`spatial_scale` onto the feature map; with `aligned` the scaled box moves by -0.5 so that a pixel's centre is at
i + 0.5 (Detectron2's ROIAlignV2), without it boxes are at least 1 x 1. Every output bin averages a grid of
`sampling_ratio` x `sampling_ratio` bilinear samples at the centres of its sub-cells (sampling_ratio <= 0:
ceil(box size / output size) per box and axis, at least one sample counted). A sample outside (-1, H) x (-1, W) is
0; one within a pixel of the border reads the border row or column (the coordinate is clamped to [0, H - 1]).
No gradient flows to the boxes, as in torchvision.

`multiscale_roi_align` is `torchvision.ops.MultiScaleRoIAlign`'s level rule (Lin et al. 2017, eq. 1): a box of
sqrt(area) s pixels reads level floor(k0 + log2(s / s0) + 1e-6), clamped to the levels there are.

Backends: torchvision's kernel for CUDA tensors when torchvision imports; the pure-PyTorch path here otherwise: one
weighted `embedding_bag` over the rows of the (B H W, C) map per output bin (the four neighbours of each of its
samples), no loop over boxes. Fed channels-last maps (as the models' FPN gives them), it reads them without a copy
and is faster on the CPU than torchvision's kernel (docs/benchmarks.md). In ONNX export it becomes ONNX's RoiAlign
(opset 16: its coordinate_transformation_mode is `aligned`).
"""

import math

import torch
import torch.nn.functional as F

from bev3d.ops.torchvision_ops import torchvision_backend


def roi_align(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, backend="auto"):
    """features (B, C, H, W), rois (K, 5) -> (K, C, out_h, out_w); semantics in the module docstring."""
    tv_op = torchvision_backend("roi_align", backend, "RoIAlign")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (K, 5) as (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    rois = rois.detach().to(features.dtype)
    if torch.onnx.is_in_onnx_export():
        return _OnnxRoiAlign.apply(features, rois, out_h, out_w, float(spatial_scale), int(sampling_ratio), aligned)
    if backend == "torchvision" or (backend == "auto" and tv_op is not None and features.is_cuda):
        return tv_op(features, rois, (out_h, out_w), spatial_scale, sampling_ratio, aligned)
    return _roi_align_torch(features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned)


class _OnnxRoiAlign(torch.autograd.Function):
    """The pure-PyTorch path while tracing, ONNX's RoiAlign in the graph: the same semantics (half_pixel is
    `aligned`, output_half_pixel the boxes of at least 1 x 1), one native op instead of gathers in a Loop, and a
    grid size per box where sampling_ratio <= 0."""

    @staticmethod
    def forward(ctx, features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned):
        return _roi_align_torch(features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def symbolic(g, features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned):
        def const(values):
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

        image = g.op("Cast", g.op("Squeeze", g.op("Slice", rois, const([0]), const([1]), const([1])), const([1])),
                     to_i=7)  # (K,) int64
        boxes = g.op("Slice", rois, const([1]), const([5]), const([1]))  # (K, 4)
        return g.op("RoiAlign", features, boxes, image, mode_s="avg", output_height_i=out_h, output_width_i=out_w,
                    sampling_ratio_i=max(sampling_ratio, 0), spatial_scale_f=spatial_scale,
                    coordinate_transformation_mode_s="half_pixel" if aligned else "output_half_pixel")


def _axis_samples(start, end, bins, size, sampling_ratio, aligned):
    """One axis of every box: start/end (K,) in feature pixels -> the two neighbours' indices (K, bins, G, 2),
    their weights (K, bins, G, 2) (zero for samples outside the map and beyond the box's own grid; G is the largest
    grid) and each box's grid size (K,)."""
    length = end - start
    if not aligned:
        length = length.clamp(min=1.0)
    bin_size = length / bins
    if sampling_ratio > 0:
        grid = torch.full_like(length, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.ceil(length / bins).long()
    G = max(int(grid.max()), 1) if len(grid) else 1
    step = torch.arange(G, device=start.device, dtype=start.dtype)
    pos = (start[:, None, None] + torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
           * bin_size[:, None, None] + (step + 0.5) * (bin_size / grid.clamp(min=1))[:, None, None])  # (K, bins, G)
    inside = (pos >= -1.0) & (pos <= size) & (step < grid[:, None, None])
    pos = pos.clamp(min=0)
    low = pos.floor().long().clamp(max=size - 1)
    pos = torch.where(low >= size - 1, low.to(pos.dtype), pos)  # the last row: all weight on it
    frac = pos - low
    high = (low + 1).clamp(max=size - 1)
    weight = torch.stack([1 - frac, frac], -1) * inside[..., None]
    return torch.stack([low, high], -1), weight, grid


def _roi_align_torch(features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned):
    B, C, H, W = features.shape
    K = rois.shape[0]
    if K == 0:
        return features.new_zeros(0, C, out_h, out_w)
    boxes = rois[:, 1:] * spatial_scale - (0.5 if aligned else 0.0)
    y_idx, y_w, grid_h = _axis_samples(boxes[:, 1], boxes[:, 3], out_h, H, sampling_ratio, aligned)
    x_idx, x_w, grid_w = _axis_samples(boxes[:, 0], boxes[:, 2], out_w, W, sampling_ratio, aligned)
    count = (grid_h * grid_w).clamp(min=1).to(features.dtype)  # (K,)
    Gh, Gw = y_idx.shape[2], x_idx.shape[2]
    # One weighted bag of rows of a (B H W, C) table per output bin: its samples' four neighbours each.
    table = features.permute(0, 2, 3, 1).reshape(B * H * W, C)
    base = rois[:, 0].long() * (H * W)
    index = (base.view(K, 1, 1, 1, 1) + y_idx.view(K, out_h, 1, Gh * 2, 1) * W
             + x_idx.view(K, 1, out_w, 1, Gw * 2))  # (K, out_h, out_w, 2 Gh, 2 Gw)
    weight = (y_w.view(K, out_h, 1, Gh * 2, 1) * x_w.view(K, 1, out_w, 1, Gw * 2)) / count.view(K, 1, 1, 1, 1)
    bags = 4 * Gh * Gw
    out = F.embedding_bag(index.view(-1, bags), table, mode="sum", per_sample_weights=weight.view(-1, bags))
    return out.view(K, out_h, out_w, C).permute(0, 3, 1, 2)


def roi_levels(boxes, levels, canonical_size=224, canonical_level=4):
    """boxes (..., 4) xyxy in input pixels -> index (...) into `levels` (their log2 strides, ascending): the FPN
    rule floor(k0 + log2(sqrt(area) / s0) + 1e-6), clamped (a zero-area box reads the finest level)."""
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=0)
    k = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_size) + 1e-6)
    return (k.clamp(levels[0], levels[-1]) - levels[0]).long()


def multiscale_roi_align(features, strides, boxes, output_size, sampling_ratio=-1, aligned=False, canonical_size=224,
                         canonical_level=4, backend="auto"):
    """features: per level (B, C, H_l, W_l) with `strides` (input pixels per cell: powers of two, each twice the
    one before); boxes (B, N, 4) xyxy in input pixels -> (B, N, C, out_h, out_w), each box from its level
    (`roi_levels`)."""
    levels = [round(math.log2(s)) for s in strides]
    if len(levels) != len(features) or any(2**k != s for k, s in zip(levels, strides)) or \
            levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"strides {list(strides)} must be consecutive powers of two, one per level "
                         f"({len(features)} levels)")
    B, N = boxes.shape[:2]
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    boxes = boxes.detach().reshape(B * N, 4).to(features[0].dtype)
    image = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(N)
    rois = torch.cat([image[:, None], boxes], 1)  # (B N, 5)
    level = roi_levels(boxes, levels, canonical_size, canonical_level)
    out = features[0].new_zeros(B * N, features[0].shape[1], out_h, out_w)
    for i, (feat, k) in enumerate(zip(features, levels)):
        idx = (level == i).nonzero().squeeze(1)
        out = out.index_copy(0, idx, roi_align(feat, rois[idx], (out_h, out_w), 2.0**-k, sampling_ratio, aligned,
                                               backend))
    return out.view(B, N, *out.shape[1:])
