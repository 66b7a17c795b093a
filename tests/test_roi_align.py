"""RoIAlign against a float64 loop written from torchvision's CPU kernel (roi_align_kernel.cpp: sample positions,
adaptive grid, `bilinear_interpolate`'s border rule), and against torchvision itself where it imports."""

import math

import numpy as np
import pytest
import torch

from bev3d.ops.roi_align import multiscale_roi_align, roi_align, roi_levels
from bev3d.ops.torchvision_ops import torchvision_op

needs_torchvision = pytest.mark.skipif(
    torchvision_op("roi_align") is None,
    reason="torchvision does not import here (not installed, or built for another torch): no kernel to compare with")


def naive_bilinear(img, y, x):
    """img (C, H, W) numpy at one point, torchvision's rule: 0 outside [-1, H] x [-1, W], clamped within a pixel."""
    _, h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(img.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x1] + ly * (1 - lx) * img[:, y1, x0]
            + ly * lx * img[:, y1, x1])


def naive_roi_align(features, rois, out, scale, sampling_ratio, aligned):
    feats, rois = features.double().numpy(), rois.double().numpy()
    result = np.zeros((len(rois), feats.shape[1], out, out))
    for k, (b, x1, y1, x2, y2) in enumerate(rois):
        offset = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = x1 * scale - offset, y1 * scale - offset, x2 * scale - offset, y2 * scale - offset
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / out)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / out)
        count = max(gh * gw, 1)
        for ph in range(out):
            for pw in range(out):
                acc = np.zeros(feats.shape[1])
                for iy in range(gh):
                    y = y1 + ph * rh / out + (iy + 0.5) * rh / out / gh
                    for ix in range(gw):
                        x = x1 + pw * rw / out + (ix + 0.5) * rw / out / gw
                        acc += naive_bilinear(feats[int(b)], y, x)
                result[k, :, ph, pw] = acc / count
    return torch.from_numpy(result)


def _case(seed=0, B=2, C=3, H=9, W=11, K=12):
    """Features and rois in input pixels (scale 0.5) covering: inside, across every border, far outside, zero area
    (a point and a line), tiny and larger than the map."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([2 * W, 2 * H]) - 4
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * 30
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([-6.0, -5.0, 8.0, 7.0])  # over the top-left corner
    boxes[1] = torch.tensor([2 * W - 5.0, 2 * H - 3.0, 2 * W + 9.0, 2 * H + 4.0])  # over the bottom-right corner
    boxes[2] = torch.tensor([7.0, 5.0, 7.0, 5.0])  # zero area: a point
    boxes[3] = torch.tensor([3.0, 4.0, 15.0, 4.0])  # zero height
    boxes[4] = torch.tensor([60.0, 60.0, 70.0, 80.0])  # entirely outside
    boxes[5] = torch.tensor([-10.0, -10.0, 2 * W + 10.0, 2 * H + 10.0])  # around the whole map
    boxes[6] = torch.tensor([4.0, 4.0, 4.6, 4.3])  # smaller than a cell
    batch = torch.randint(0, B, (K, 1), generator=g).double()
    return feats, torch.cat([batch, boxes], 1)


def _id(c):
    return f"sr{c['sampling_ratio']}-{'aligned' if c['aligned'] else 'legacy'}"


CASES = [dict(sampling_ratio=0, aligned=True), dict(sampling_ratio=2, aligned=True),
         dict(sampling_ratio=-1, aligned=False), dict(sampling_ratio=3, aligned=False)]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_equals_naive_loop(case):
    feats, rois = _case()
    ref = naive_roi_align(feats, rois, 5, 0.5, case["sampling_ratio"], case["aligned"])
    for layout in (torch.contiguous_format, torch.channels_last):  # the models' maps are channels-last
        out = roi_align(feats.contiguous(memory_format=layout), rois, 5, 0.5, case["sampling_ratio"], case["aligned"],
                        backend="torch")
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert (ref[4] == 0).all() and ref[0].abs().sum() > 0  # the case covers what it says
    if case["aligned"] and case["sampling_ratio"] <= 0:
        assert (ref[2] == 0).all()  # an empty adaptive grid averages nothing


def test_gradient_reaches_features_not_boxes():
    feats, rois = _case()
    feats.requires_grad_(True)
    rois.requires_grad_(True)
    out = roi_align(feats, rois, 5, 0.5, 2, True, backend="torch")
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert rois.grad is None
    # RoIAlign is linear in the features: the gradient is the adjoint, <grad, f> = <w, roi_align(f)>.
    probe = torch.randn_like(feats)
    lhs = (feats.grad * probe).sum()
    rhs = (weights * roi_align(probe, rois.detach(), 5, 0.5, 2, True, backend="torch")).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=0)


def test_levels_follow_the_fpn_rule():
    # sqrt(area) = 224 -> k0 = 4; halving / doubling moves one level; clamped to [2, 5]; zero area -> finest
    sizes = torch.tensor([224.0, 112.0, 111.9, 448.0, 10.0, 5000.0, 0.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sizes, sizes], 1)
    assert roi_levels(boxes, [2, 3, 4, 5]).tolist() == [2, 1, 0, 3, 0, 3, 0]
    assert roi_levels(boxes, [3, 4, 5, 6, 7], canonical_size=112).tolist() == [2, 1, 0, 3, 0, 4, 0]


@pytest.mark.parametrize("aligned", [True, False])
def test_multiscale_equals_naive_loop_per_level(aligned):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 3, 32 // 2**i, 40 // 2**i, generator=g, dtype=torch.float64) for i in range(4)]
    sizes = torch.tensor([20.0, 60.0, 120.0, 250.0, 600.0, 0.0])  # every level, clamped at both ends, zero area
    centre = torch.rand(2, 6, 2, generator=g, dtype=torch.float64) * torch.tensor([160.0, 128.0])
    boxes = torch.cat([centre - sizes[:, None] / 2, centre + sizes[:, None] / 2], -1)  # (2, 6, 4), some across borders
    out = multiscale_roi_align(feats, [4, 8, 16, 32], boxes, 7, 2, aligned, backend="torch")
    level = roi_levels(boxes, [2, 3, 4, 5])
    assert sorted(set(level.flatten().tolist())) == [0, 1, 2, 3]
    for b in range(2):
        for n in range(6):
            rois = torch.cat([torch.zeros(1, 1, dtype=torch.float64), boxes[b, n][None]], 1)
            lvl = int(level[b, n])
            ref = naive_roi_align(feats[lvl][b:b + 1], rois, 7, 1 / 4 / 2**lvl, 2, aligned)
            torch.testing.assert_close(out[b, n], ref[0], atol=1e-12, rtol=0)


@needs_torchvision
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_equals_torchvision(case):
    feats, rois = _case(seed=3)
    tv = torchvision_op("roi_align")
    for dtype in (torch.float64, torch.float32):
        f, r = feats.to(dtype).clone().requires_grad_(True), rois.to(dtype)
        ours = roi_align(f, r, (4, 6), 0.5, case["sampling_ratio"], case["aligned"], backend="torch")
        grad = torch.randn_like(ours)
        (ours * grad).sum().backward()
        f_tv = f.detach().clone().requires_grad_(True)
        theirs = tv(f_tv, r, (4, 6), 0.5, case["sampling_ratio"], case["aligned"])
        (theirs * grad).sum().backward()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)
        torch.testing.assert_close(f.grad, f_tv.grad, atol=tol, rtol=0)


@needs_torchvision
def test_multiscale_equals_torchvision_multiscale_roi_align():
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 4, 64 // 2**i, 48 // 2**i, generator=g) for i in range(4)]
    centre = torch.rand(2, 30, 2, generator=g) * torch.tensor([192.0, 256.0])
    size = torch.rand(2, 30, 2, generator=g) * 400 + 2
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, sampling_ratio=2)  # aligned=False, k0 = 4, s0 = 224
    theirs = pooler(OrderedDict(zip(["p2", "p3", "p4", "p5"], feats)), list(boxes), [(256, 192)] * 2)
    ours = multiscale_roi_align(feats, [4, 8, 16, 32], boxes, 7, 2, aligned=False, backend="torch")
    torch.testing.assert_close(ours.flatten(0, 1), theirs, atol=1e-5, rtol=0)
