"""Dynamic DETR: the encoder block against convolutions written out level by level, the box contract under padding,
and the parameter count of the R50 recipe."""

import pytest
import torch
import torch.nn.functional as F

from bev3d.config import load_config
from bev3d.models import build_model
from bev3d.models.backbones.dcn import modulated_deform_conv2d
from bev3d.models.dynamic_detr import DynamicEncoderBlock
from bev3d.models.transformer import inverse_sigmoid

from roi_cases import check_padding_invariance

# DINO (Zhang et al. 2022, arXiv 2203.03605) Table 1: Dynamic DETR (5 scales, R-50, 12 epochs) has 58M parameters;
# the Dynamic DETR paper gives no count.
PAPER_PARAMS_M = 58.0


def reference_block(block, feats, zero_offsets):
    """Level l: GN(conv(level l - 1, stride 2)), GN(conv(level l)), GN(conv(up(level l + 1))), each scaled by
    hard-sigmoid(SE(its spatial mean)), averaged, ReLU. Zero offsets: plain convs (the masks are sigmoid(0) = 1/2);
    otherwise deformable convs that all take the offsets and masks predicted from level l."""
    out = []
    for lvl, x in enumerate(feats):
        o1, o2, m = block.conv_offset(x).chunk(3, 1)

        def conv(inp, weight, stride=1):
            if zero_offsets:
                return 0.5 * F.conv2d(inp, weight, stride=stride, padding=1)
            return modulated_deform_conv2d(inp, torch.cat([o1, o2], 1), m.sigmoid(), weight, stride, 1, backend="torch")

        parts = [F.group_norm(conv(x, block.same), 16, block.norms[1].weight, block.norms[1].bias)]
        if lvl > 0:
            parts.append(F.group_norm(conv(feats[lvl - 1], block.finer, 2), 16, block.norms[0].weight,
                                      block.norms[0].bias))
        if lvl < len(feats) - 1:
            up = F.interpolate(feats[lvl + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
            parts.append(F.group_norm(conv(up, block.coarser), 16, block.norms[2].weight, block.norms[2].bias))
        total = 0
        for p in parts:
            s = p.mean((2, 3))
            s = F.linear(F.relu(F.linear(s, block.se[0].weight, block.se[0].bias)), block.se[2].weight, block.se[2].bias)
            total = total + p * (F.relu6(s + 3) / 6)[..., None, None]
        out.append(F.relu(total / len(parts)))
    return out


@pytest.mark.parametrize("zero_offsets", [True, False])
def test_encoder_block_equals_level_by_level_reference(zero_offsets):
    torch.manual_seed(0)
    block = DynamicEncoderBlock(32).double()
    for norm in block.norms:
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)
        torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    if not zero_offsets:
        torch.nn.init.normal_(block.conv_offset.weight, std=0.05)
        torch.nn.init.normal_(block.conv_offset.bias, std=0.5)
    # odd sizes: a stride-2 conv of the finer level must land on the coarser level's grid (ceil halving)
    feats = [torch.randn(2, 32, h, w, dtype=torch.float64) for h, w in ((13, 17), (7, 9), (4, 5), (2, 3))]
    out = block(feats)
    ref = reference_block(block, feats, zero_offsets)
    for o, r, f in zip(out, ref, feats):
        assert o.shape == f.shape
        torch.testing.assert_close(o, r, atol=1e-12, rtol=0)


def test_boxes_are_relative_to_the_valid_image_and_rois_in_its_pixels():
    torch.manual_seed(0)
    model = build_model(load_config("dynamic_detr_tiny_shapes", ["model.head.num_encoder_layers=0"]))
    with torch.no_grad():
        model.query_boxes.weight[:, :2] = inverse_sigmoid(torch.empty(30, 2).uniform_(0.35, 0.65))
        model.query_boxes.weight[:, 2:] = inverse_sigmoid(torch.empty(30, 2).uniform_(0.1, 0.4))
        for box in model.bbox_embed:  # non-zero refinement, so that each layer moves its boxes
            torch.nn.init.normal_(box.layers[-1].weight, std=0.01)
    out = check_padding_invariance(model, 64, [8, 16, 32])
    assert (out.boxes[0] - out.boxes[-1]).abs().max() > 1e-2


def test_r50_parameters_within_3_percent_of_the_paper():
    model = build_model(load_config("dynamic_detr_r50_coco", ["model.head.num_classes=80"]))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params / PAPER_PARAMS_M - 1) < 0.03, f"{params:.2f}M vs {PAPER_PARAMS_M}M"
