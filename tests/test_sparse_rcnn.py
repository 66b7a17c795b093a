"""Sparse R-CNN: the dynamic instance interaction against a per-proposal loop of the seed note's pseudo-code, the
box contract under padding, the parameter count of the R50 recipe, and `bev3d convert --from sparse_rcnn` on a
state dict of exactly the official keys against a functional forward written from the official code."""

import math

import pytest
import torch
import torch.nn.functional as F

from bev3d.config import load_config
from bev3d.errors import Bev3dError
from bev3d.models import build_model
from bev3d.models.convert import convert_state_dict, guess_families
from bev3d.models.convert.sparse_rcnn import COCO_IDS
from bev3d.models.sparse_rcnn import DynamicInteraction
from bev3d.ops.roi_align import multiscale_roi_align

from roi_cases import check_padding_invariance

# Swin Transformer (Liu et al. 2021) Table 2(a), repeated in FocalNet (Yang et al. 2022): Sparse R-CNN R-50 (300
# proposals, COCO's 80 classes) has 106.1M parameters.
PAPER_PARAMS_M = 106.1


@pytest.mark.parametrize("num_convs", [2, 1])
def test_dynamic_interaction_equals_per_proposal_loop(num_convs):
    torch.manual_seed(0)
    N, S, C, d = 5, 3, 16, 4
    module = DynamicInteraction(C, d, S, num_convs).double()
    for p in module.parameters():  # LayerNorm affine parameters away from 1 / 0
        torch.nn.init.normal_(p, std=0.5)
    proposals, roi = torch.randn(N, C, dtype=torch.float64), torch.randn(N, S * S, C, dtype=torch.float64)
    out = module(proposals, roi)
    norms = list(module.norms)
    for k in range(N):  # the pseudo-code, one proposal at a time
        params = proposals[k] @ module.dynamic_layer.weight.T + module.dynamic_layer.bias  # (C*d [+ d*C],)
        x = roi[k]  # (S*S, C)
        x = F.relu(F.layer_norm(x @ params[:C * d].view(C, d), (d,), norms[0].weight, norms[0].bias))
        if num_convs == 2:
            x = F.relu(F.layer_norm(x @ params[C * d:].view(d, C), (C,), norms[1].weight, norms[1].bias))
        obj = x.flatten() @ module.out_layer.weight.T + module.out_layer.bias
        obj = F.relu(F.layer_norm(obj, (C,), module.out_norm.weight, module.out_norm.bias))
        torch.testing.assert_close(out[k], obj, atol=1e-12, rtol=0)


def test_boxes_are_relative_to_the_valid_image_and_rois_in_its_pixels():
    torch.manual_seed(0)
    model = build_model(load_config("sparse_rcnn_tiny_shapes"))
    with torch.no_grad():
        model.init_proposal_boxes.weight[:, :2].uniform_(0.35, 0.65)
        model.init_proposal_boxes.weight[:, 2:].uniform_(0.1, 0.4)
        for stage in model.stages:  # non-zero deltas, so that each stage moves its boxes
            torch.nn.init.normal_(stage.bbox_delta.weight, std=0.02)
    out = check_padding_invariance(model, 64, [4, 8, 16, 32])
    assert (out.boxes[0] - out.boxes[-1]).abs().max() > 1e-2  # the stages did move the boxes


def test_r50_parameters_within_3_percent_of_the_paper():
    model = build_model(load_config("sparse_rcnn_r50_coco", ["model.head.num_queries=300",
                                                             "model.head.num_classes=80"]))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params / PAPER_PARAMS_M - 1) < 0.03, f"{params:.2f}M vs {PAPER_PARAMS_M}M"


# ----------------------------------------------------------------------------- the official layout

DIMS = dict(base=16, C=64, d=16, heads=4, ffn=128, stages=2, N=10, classes=80)
SMALL = ["model.backbone.base_channels=16", "model.neck.out_channels=64", "model.head.embed_dims=64",
         "model.head.num_heads=4", "model.head.ffn_dims=128", "model.head.dynamic_dims=16",
         "model.head.num_decoder_layers=2", "model.head.num_queries=10"]


def official_shapes(base, C, d, heads, ffn, stages, N, classes):
    """name -> shape of every tensor in an official Sparse R-CNN R-50 checkpoint (Detectron2 ResNet-FPN with FrozenBN,
    the head of projects/SparseRCNN/sparsercnn/head.py) of these widths."""
    shapes = {}

    def conv_norm(prefix, c_out, c_in, k):
        shapes[prefix + "weight"] = (c_out, c_in, k, k)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}norm.{leaf}"] = (c_out,)

    bu = "backbone.bottom_up."
    conv_norm(bu + "stem.conv1.", base, 3, 7)
    c_in = base
    for s, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        planes = base * 2 ** (s - 2)
        for b in range(blocks):
            p = f"{bu}res{s}.{b}."
            if b == 0:
                conv_norm(p + "shortcut.", planes * 4, c_in, 1)
            conv_norm(p + "conv1.", planes, c_in if b == 0 else planes * 4, 1)
            conv_norm(p + "conv2.", planes, planes, 3)
            conv_norm(p + "conv3.", planes * 4, planes, 1)
        c_in = planes * 4
    for s in range(2, 6):
        shapes[f"backbone.fpn_lateral{s}.weight"] = (C, base * 2 ** (s - 2) * 4, 1, 1)
        shapes[f"backbone.fpn_output{s}.weight"] = (C, C, 3, 3)
        shapes[f"backbone.fpn_lateral{s}.bias"] = shapes[f"backbone.fpn_output{s}.bias"] = (C,)
    shapes["init_proposal_features.weight"], shapes["init_proposal_boxes.weight"] = (N, C), (N, 4)
    for i in range(stages):
        p = f"head.head_series.{i}."
        linears = {"self_attn.out_proj.": (C, C), "inst_interact.dynamic_layer.": (2 * C * d, C),
                   "inst_interact.out_layer.": (C, C * 49), "linear1.": (ffn, C), "linear2.": (C, ffn),
                   "class_logits.": (classes, C), "bboxes_delta.": (4, C)}
        for name, (o, c) in linears.items():
            shapes[p + name + "weight"], shapes[p + name + "bias"] = (o, c), (o,)
        shapes[p + "self_attn.in_proj_weight"], shapes[p + "self_attn.in_proj_bias"] = (3 * C, C), (3 * C,)
        norms = {"inst_interact.norm1.": d, "inst_interact.norm2.": C, "inst_interact.norm3.": C, "norm1.": C,
                 "norm2.": C, "norm3.": C, "cls_module.1.": C, **{f"reg_module.{3 * j + 1}.": C for j in range(3)}}
        for name, c in norms.items():
            shapes[p + name + "weight"] = shapes[p + name + "bias"] = (c,)
        for name in ["cls_module.0."] + [f"reg_module.{3 * j}." for j in range(3)]:
            shapes[p + name + "weight"] = (C, C)
    return shapes


def official_state_dict(seed=0, **dims):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(**dims).items():
        t = torch.randn(shape, generator=g) / math.sqrt(max(1, math.prod(shape[1:])))
        if name.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")) or ".1.weight" in name:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        state[name] = t
    state["init_proposal_boxes.weight"] = torch.rand(dims["N"], 4, generator=g) * 0.5 + 0.25
    return state


def official_forward(sd, img, whwh, C, heads, d, stages, **_):
    """The official model's inference (Detectron2 ResNet-FPN + DynamicHead) as functions of its state dict ->
    last-stage logits (B, N, 80) and boxes (B, N, 4) xyxy pixels."""

    def bn(x, p):
        scale = sd[p + "weight"] * (sd[p + "running_var"] + 1e-5).rsqrt()
        return x * scale[:, None, None] + (sd[p + "bias"] - sd[p + "running_mean"] * scale)[:, None, None]

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"])

    def lin(x, p, bias=True):
        return F.linear(x, sd[p + "weight"], sd[p + "bias"] if bias else None)

    bu = "backbone.bottom_up."
    x = F.relu(bn(F.conv2d(img, sd[bu + "stem.conv1.weight"], stride=2, padding=3), bu + "stem.conv1.norm."))
    x = F.max_pool2d(x, 3, 2, 1)
    feats = []
    for s, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            p, stride = f"{bu}res{s}.{b}.", 2 if b == 0 and s > 2 else 1
            short = bn(F.conv2d(x, sd[p + "shortcut.weight"], stride=stride), p + "shortcut.norm.") if b == 0 else x
            y = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "conv1.norm."))
            y = F.relu(bn(F.conv2d(y, sd[p + "conv2.weight"], stride=stride, padding=1), p + "conv2.norm."))
            x = F.relu(bn(F.conv2d(y, sd[p + "conv3.weight"]), p + "conv3.norm.") + short)
        feats.append(x)
    lat = [F.conv2d(f, sd[f"backbone.fpn_lateral{s}.weight"], sd[f"backbone.fpn_lateral{s}.bias"])
           for s, f in zip(range(2, 6), feats)]
    for i in (2, 1, 0):
        lat[i] = lat[i] + F.interpolate(lat[i + 1], scale_factor=2.0, mode="nearest")
    pyramid = [F.conv2d(t, sd[f"backbone.fpn_output{s}.weight"], sd[f"backbone.fpn_output{s}.bias"], padding=1)
               for s, t in zip(range(2, 6), lat)]

    B = img.shape[0]
    cxcywh = sd["init_proposal_boxes.weight"]
    boxes = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)[None] * whwh[:, None]
    N = boxes.shape[1]
    pro = sd["init_proposal_features.weight"][None].repeat(1, B, 1)  # (1, B N, C): the official's layout
    for i in range(stages):
        p = f"head.head_series.{i}."
        roi = multiscale_roi_align(pyramid, [4, 8, 16, 32], boxes, 7, 2, aligned=True)
        roi = roi.reshape(B * N, C, -1).permute(2, 0, 1)  # (49, B N, C)
        q = pro.view(B, N, C).permute(1, 0, 2)  # (N, B, C)
        attn = F.multi_head_attention_forward(q, q, q, C, heads, sd[p + "self_attn.in_proj_weight"],
                                              sd[p + "self_attn.in_proj_bias"], None, None, False, 0.0,
                                              sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"],
                                              training=False, need_weights=False)[0]
        q = ln(q + attn, p + "norm1.")
        q = q.view(N, B, C).permute(1, 0, 2).reshape(1, B * N, C)
        params = lin(q, p + "inst_interact.dynamic_layer.").permute(1, 0, 2)  # (B N, 1, 2 C d)
        f = roi.permute(1, 0, 2)
        f = F.relu(ln(torch.bmm(f, params[:, :, :C * d].view(-1, C, d)), p + "inst_interact.norm1."))
        f = F.relu(ln(torch.bmm(f, params[:, :, C * d:].view(-1, d, C)), p + "inst_interact.norm2."))
        f = F.relu(ln(lin(f.flatten(1), p + "inst_interact.out_layer."), p + "inst_interact.norm3."))
        q = ln(q + f, p + "norm2.")
        obj = ln(q + lin(F.relu(lin(q, p + "linear1.")), p + "linear2."), p + "norm3.")
        fc = obj.transpose(0, 1).reshape(B * N, C)
        cls = F.relu(ln(lin(fc, p + "cls_module.0.", bias=False), p + "cls_module.1."))
        reg = fc
        for j in range(3):
            reg = F.relu(ln(lin(reg, f"{p}reg_module.{3 * j}.", bias=False), f"{p}reg_module.{3 * j + 1}."))
        logits = lin(cls, p + "class_logits.")
        deltas = lin(reg, p + "bboxes_delta.")
        b = boxes.reshape(-1, 4)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        cx, cy = b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h
        dx, dy = deltas[:, 0] / 2.0, deltas[:, 1] / 2.0
        dw, dh = deltas[:, 2].clamp(max=math.log(100000.0 / 16)), deltas[:, 3].clamp(max=math.log(100000.0 / 16))
        pcx, pcy, pw, ph = dx * w + cx, dy * h + cy, dw.exp() * w, dh.exp() * h
        boxes = torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1).view(B, N, 4)
        pro = obj
    return logits.view(B, N, -1), boxes


@pytest.mark.parametrize("num_classes", [91, 80])
def test_convert_official_layout_gives_the_official_outputs(num_classes):
    sd = official_state_dict(**DIMS)
    assert guess_families(list(sd)) == ["sparse_rcnn"]
    cfg = load_config("sparse_rcnn_r50_coco", SMALL + [f"model.head.num_classes={num_classes}"])
    state = convert_state_dict(sd, "sparse_rcnn", cfg)
    model = build_model(cfg).eval()
    model.load_state_dict(state)
    img = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True  # the second image is 64 x 64, padded
    whwh = torch.tensor([[96.0, 64, 96, 64], [64, 64, 64, 64]])
    with torch.no_grad():
        out = model({"img": img, "mask": mask})
        logits, boxes = official_forward(sd, img, whwh, **DIMS)
    ours = out.logits[-1][..., COCO_IDS] if num_classes == 91 else out.logits[-1]
    torch.testing.assert_close(ours, logits, atol=1e-4, rtol=1e-4)
    cxcywh = torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1) / whwh[:, None]
    torch.testing.assert_close(out.boxes[-1], cxcywh, atol=1e-5, rtol=1e-4)
    if num_classes == 91:  # the categories COCO does not use never score
        unused = [k for k in range(91) if k not in COCO_IDS]
        assert (out.logits[..., unused] < -50).all()


def test_coco_ids_are_the_80_used_categories_in_order():
    # COCO 2017 leaves these 10 of 1..90 unused (and 0 is background)
    assert COCO_IDS == [k for k in range(1, 91) if k not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def test_convert_rejects_another_architecture():
    sd = official_state_dict(**DIMS)
    with pytest.raises(Bev3dError, match="fit nothing"):  # a 2-stage checkpoint into a 1-stage config
        convert_state_dict(sd, "sparse_rcnn", load_config("sparse_rcnn_r50_coco",
                                                          SMALL + ["model.head.num_decoder_layers=1"]))
    with pytest.raises(Bev3dError, match="num_classes"):
        convert_state_dict(sd, "sparse_rcnn", load_config("sparse_rcnn_r50_coco",
                                                          SMALL + ["model.head.num_classes=20"]))
