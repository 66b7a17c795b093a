import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bev3d.errors import Bev3dError
from bev3d.models.backbones import ResNet
from bev3d.models.backbones.dcn import ModulatedDeformConv2d, modulated_deform_conv2d
from bev3d.ops.torchvision_ops import torchvision_op

from official_mmdet3d import resnet_keys

needs_torchvision = pytest.mark.skipif(
    torchvision_op("deform_conv2d") is None,
    reason="torchvision does not import here (not installed, or built for another torch): no kernel to compare with")
BACKENDS = ["torch", pytest.param("torchvision", marks=needs_torchvision)]


def naive_dcn(x, offset, mask, weight, stride, padding, dilation):
    """mmcv's modulated_deformable_im2col + GEMM written as float64 loops: offset channel g*2K + 2k is dy,
    g*2K + 2k + 1 is dx of tap k = i*kw + j; a sample outside (-1, H) x (-1, W) is 0; each bilinear
    neighbour outside the image is 0."""
    x, offset, mask, weight = (t.detach().double().numpy() for t in (x, offset, mask, weight))
    b, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[2:]
    k = kh * kw
    groups = mask.shape[1] // k
    out = np.zeros((b, c_out, h_out, w_out))

    def pixel(img, yy, xx):
        return img[yy, xx] if 0 <= yy < h and 0 <= xx < w else 0.0

    for n in range(b):
        for oy in range(h_out):
            for ox in range(w_out):
                for ch in range(c):
                    g = ch // (c // groups)
                    for i in range(kh):
                        for j in range(kw):
                            t = i * kw + j
                            sy = oy * stride - padding + i * dilation + offset[n, g * 2 * k + 2 * t, oy, ox]
                            sx = ox * stride - padding + j * dilation + offset[n, g * 2 * k + 2 * t + 1, oy, ox]
                            val = 0.0
                            if -1 < sy < h and -1 < sx < w:
                                y0, x0 = math.floor(sy), math.floor(sx)
                                ly, lx = sy - y0, sx - x0
                                val = ((1 - ly) * (1 - lx) * pixel(x[n, ch], y0, x0)
                                       + (1 - ly) * lx * pixel(x[n, ch], y0, x0 + 1)
                                       + ly * (1 - lx) * pixel(x[n, ch], y0 + 1, x0)
                                       + ly * lx * pixel(x[n, ch], y0 + 1, x0 + 1))
                            out[n, :, oy, ox] += weight[:, ch, i, j] * val * mask[n, g * k + t, oy, ox]
    return torch.from_numpy(out)


def _sample_positions(offset, h_out, w_out, stride, padding, dilation):
    """(B, G, K, H_out, W_out) sample rows and columns of a 3x3 tap grid (for checking what a case covers)."""
    b = offset.shape[0]
    off = offset.view(b, -1, 9, 2, h_out, w_out)
    tap = torch.arange(3, dtype=offset.dtype) * dilation
    rows = tap.repeat_interleave(3).view(9, 1, 1) + (torch.arange(h_out) * stride - padding).view(1, -1, 1)
    cols = tap.repeat(3).view(9, 1, 1) + (torch.arange(w_out) * stride - padding).view(1, 1, -1)
    return rows + off[:, :, :, 0], cols + off[:, :, :, 1]


# ResNet's 3x3 convs: stride 1 (caffe style, later blocks), stride 2 (pytorch style first block),
# dilation 2 with padding 2 (mmdet's dilated stages); and two deform groups.
CASES = [dict(stride=1, padding=1, dilation=1, groups=1), dict(stride=2, padding=1, dilation=1, groups=1),
         dict(stride=1, padding=2, dilation=2, groups=1), dict(stride=1, padding=1, dilation=1, groups=2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "s{stride}p{padding}d{dilation}g{groups}".format(**c))
def test_equals_naive_loop_with_out_of_bounds_samples(case, backend):
    g = torch.Generator().manual_seed(0)
    s, p, d, groups = case["stride"], case["padding"], case["dilation"], case["groups"]
    x = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
    h_out, w_out = (6 + 2 * p - 2 * d - 1) // s + 1, (7 + 2 * p - 2 * d - 1) // s + 1
    offset = torch.empty(2, groups * 18, h_out, w_out, dtype=torch.float64).uniform_(-3, 3, generator=g)
    offset[:, :, 0, 0] = 9.0  # far outside the image
    mask = torch.rand(2, groups * 9, h_out, w_out, generator=g, dtype=torch.float64)
    sy, sx = _sample_positions(offset, h_out, w_out, s, p, d)
    assert ((sy > -1) & (sy < 0)).any() and ((sx > 6) & (sx < 7)).any()  # partly outside: some neighbours 0
    assert ((sy <= -1) | (sy >= 6)).any()  # wholly outside: the sample is 0
    out = modulated_deform_conv2d(x, offset, mask, weight, s, p, d, backend=backend)
    torch.testing.assert_close(out, naive_dcn(x, offset, mask, weight, s, p, d), rtol=1e-10, atol=1e-10)
    out32 = modulated_deform_conv2d(x.float(), offset.float(), mask.float(), weight.float(), s, p, d, backend=backend)
    torch.testing.assert_close(out32, out.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_zero_offsets_unit_mask_is_a_plain_conv(stride, padding, dilation, backend):
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 8, 9, 10, generator=g), torch.randn(5, 8, 3, 3, generator=g)
    ref = F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation)
    h_out, w_out = ref.shape[-2:]
    out = modulated_deform_conv2d(x, torch.zeros(2, 18, h_out, w_out), torch.ones(2, 9, h_out, w_out), weight,
                                  stride, padding, dilation, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_module_keys_init_and_mmcv_offset_chunking():
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(6, 4, stride=2)
    assert {k: tuple(v.shape) for k, v in dcn.state_dict().items()} == {
        "weight": (4, 6, 3, 3), "conv_offset.weight": (27, 6, 3, 3), "conv_offset.bias": (27,)}
    assert not dcn.conv_offset.weight.any() and not dcn.conv_offset.bias.any()
    assert dcn.conv_offset.stride == (2, 2) and dcn.conv_offset.padding == (1, 1)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    dcn = dcn.double()
    # Zero-initialised: regular grid, every tap scaled by sigmoid(0) = 0.5.
    torch.testing.assert_close(dcn(x), 0.5 * F.conv2d(x, dcn.weight, stride=2, padding=1))
    with torch.no_grad():
        dcn.conv_offset.weight.normal_(0, 0.3)
        dcn.conv_offset.bias.normal_(0, 1.0)
    raw = F.conv2d(x, dcn.conv_offset.weight, dcn.conv_offset.bias, stride=2, padding=1)  # (B, 27, H_out, W_out)
    offset, mask = raw[:, :18], raw[:, 18:].sigmoid()  # cat(o1, o2) of the thirds is the first 18 channels
    torch.testing.assert_close(dcn(x), naive_dcn(x, offset, mask, dcn.weight, 2, 1, 1), rtol=1e-10, atol=1e-10)


def test_gradcheck_pure_torch_path():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    # Fractional parts in [0.1, 0.9]: no sample on a grid line, where bilinear sampling has no derivative.
    offset = (torch.randint(-2, 3, (1, 18, 4, 5), generator=g)
              + torch.empty(1, 18, 4, 5, dtype=torch.float64).uniform_(0.1, 0.9, generator=g)).requires_grad_()
    mask = torch.rand(1, 9, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: modulated_deform_conv2d(*a, stride=1, padding=1, dilation=1, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, offset, mask, weight))


def test_gradients_reach_the_zero_initialised_offset_conv():
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(4, 4, backend="torch")
    dcn(torch.randn(2, 4, 8, 8)).square().sum().backward()
    grad = dcn.conv_offset.weight.grad
    assert grad[:18].abs().sum() > 0 and grad[18:].abs().sum() > 0  # offsets and masks both learn


@needs_torchvision
def test_torch_path_equals_torchvision_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 16, 12, 11, generator=g), torch.randn(2, 18, 6, 6, generator=g) * 2,
              torch.rand(2, 9, 6, 6, generator=g), torch.randn(8, 16, 3, 3, generator=g)]
    results = []
    for backend in ("torch", "torchvision"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = modulated_deform_conv2d(*leaves, stride=2, padding=1, dilation=1, backend=backend)
        out.mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for name, a, b in zip(("output", "input", "offset", "mask", "weight"), *results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_float32(backend):
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(4, 4, backend=backend)
    x = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcn(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dcn(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_bad_options_raise():
    with pytest.raises(Bev3dError, match="backend"):
        ModulatedDeformConv2d(4, 4, backend="cuda")
    with pytest.raises(Bev3dError, match="deform_groups"):
        ModulatedDeformConv2d(6, 4, deform_groups=4)
    with pytest.raises(Bev3dError, match="dcn_stages"):
        ResNet(18, dcn_stages=[2, 3])
    with pytest.raises(Bev3dError, match="dcn_stages"):
        ResNet(50, dcn_stages=[4])


def test_resnet50_dcn_has_the_official_key_set_and_loads_strictly():
    official = resnet_keys(50)  # mmdet ResNet-50 (caffe, DCNv2 in stages 3-4), as the checkpoint notes list it
    assert len(official) == 336
    model = ResNet(50, style="caffe", frozen_bn=False, out_indices=[2, 3], dcn_stages=[2, 3])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in official.items() if not k.endswith("num_batches_tracked")}
    frozen = ResNet(50, style="caffe", out_indices=[2, 3], dcn_stages=[2, 3])
    frozen.load_state_dict(state, strict=True)
    assert isinstance(frozen.layer3[5].conv2, ModulatedDeformConv2d)
    assert torch.equal(frozen.layer4[2].conv2.conv_offset.bias, state["layer4.2.conv2.conv_offset.bias"])


@pytest.mark.parametrize("style", ["caffe", "pytorch"])
def test_resnet_dcn_with_unit_masks_equals_the_plain_resnet(style):
    """Zero offsets and masks sigmoid(30) = 1 - 1e-13 must give the plain network: the DCN sits where conv2
    was, with its stride (on conv2 in pytorch style, on conv1 in caffe style)."""
    plain = ResNet(50, style=style, frozen_bn=False, out_indices=[1, 2, 3], base_channels=8).eval()
    dcn = ResNet(50, style=style, frozen_bn=False, out_indices=[1, 2, 3], base_channels=8, dcn_stages=[1, 3]).eval()
    stride = (2, 2) if style == "pytorch" else (1, 1)
    assert dcn.layer2[0].conv2.stride == stride and dcn.layer2[0].conv2.conv_offset.stride == stride
    assert isinstance(dcn.layer3[0].conv2, torch.nn.Conv2d)
    missing, unexpected = dcn.load_state_dict(plain.state_dict(), strict=False)
    offset_keys = [f"layer{s}.{b}.conv2.conv_offset.{t}" for s, n in ((2, 4), (4, 3)) for b in range(n)
                   for t in ("weight", "bias")]
    assert unexpected == [] and sorted(missing) == sorted(offset_keys)
    for m in dcn.modules():
        if isinstance(m, ModulatedDeformConv2d):
            m.conv_offset.bias.data[18:] = 30.0
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(dcn(x), plain(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dcn_stages_leave_the_other_initial_weights_unchanged():
    torch.manual_seed(0)
    plain = ResNet(50, base_channels=8).state_dict()
    torch.manual_seed(0)
    dcn = ResNet(50, base_channels=8, dcn_stages=[2, 3]).state_dict()
    assert all(torch.equal(v, dcn[k]) for k, v in plain.items())
