import pytest
import torch

from bev3d.errors import Bev3dError
from bev3d.models.necks import FPN


def _conv_by_hand(x, weight, bias):
    """Stride-1 'same' convolution as a sum of shifted slices: x (B, C, H, W), weight (O, C, k, k)."""
    k = weight.shape[-1]
    padded = torch.nn.functional.pad(x, [k // 2] * 4)
    h, w = x.shape[-2:]
    out = sum(torch.einsum("oc,bchw->bohw", weight[:, :, i, j], padded[:, :, i:i + h, j:j + w])
              for i in range(k) for j in range(k))
    return out + bias.view(1, -1, 1, 1)


def test_first_output_conv_only_is_petr_cpfpn():
    """PETR's CPFPN (in [1024, 2048] -> 256, 2 outputs; here narrower): 3x3 on level 0, level 1 the bare lateral."""
    fpn = FPN([16, 32], 8, num_outs=2, output_convs="first")
    assert {k: tuple(v.shape) for k, v in fpn.state_dict().items()} == {
        "lateral_convs.0.weight": (8, 16, 1, 1), "lateral_convs.0.bias": (8,),
        "lateral_convs.1.weight": (8, 32, 1, 1), "lateral_convs.1.bias": (8,),
        "fpn_convs.0.weight": (8, 8, 3, 3), "fpn_convs.0.bias": (8,)}
    with torch.no_grad():
        for p in fpn.parameters():
            p.normal_()
    x0, x1 = torch.randn(2, 16, 8, 10), torch.randn(2, 32, 4, 5)
    lat = [_conv_by_hand(x, c.weight, c.bias) for x, c in zip((x0, x1), fpn.lateral_convs)]
    top_down = lat[0] + lat[1].repeat_interleave(2, -2).repeat_interleave(2, -1)
    out0, out1 = fpn([x0, x1])
    torch.testing.assert_close(out1, lat[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out0, _conv_by_hand(top_down, fpn.fpn_convs[0].weight, fpn.fpn_convs[0].bias),
                               rtol=1e-4, atol=1e-4)


def test_first_output_conv_with_extra_levels_and_bad_value():
    fpn = FPN([16, 32, 64], 8, start_level=1, num_outs=3, extra_on="output", output_convs="first")
    assert len(fpn.fpn_convs) == 1 and len(fpn.extra_convs) == 1
    feats = [torch.randn(1, c, s, s) for c, s in ((16, 16), (32, 8), (64, 4))]
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(1, 8, 8, 8), (1, 8, 4, 4), (1, 8, 2, 2)]
    # The extra level starts from the last output, here the bare lateral of the last input.
    torch.testing.assert_close(outs[2], fpn.extra_convs[0](fpn.lateral_convs[1](feats[2])))
    with pytest.raises(Bev3dError, match="output_convs"):
        FPN([16, 32], 8, output_convs="none")
