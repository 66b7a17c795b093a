"""DETR3D checkpoints (WangYueFt/detr3d, mmdet3d 1.x projects/DETR3D): the official key sets of the released models
convert strictly; a converted model computes what the official feature sampling computes (tests/official_mmdet3d.py,
with each code base's projection); per-(camera, level) weights act on their camera only."""

import pytest
import torch
from official_mmdet3d import (DETR3D_SMALL, PAD, OfficialDETR3DHead, OfficialFPN, detector_state,
                              official_code_to_bev3d, resnet_keys, rig, tiny_detr3d, zeros_of)
from test_vovnet import official_v99_keys

from bev3d.config import load_config
from bev3d.errors import Bev3dError
from bev3d.models import build_model
from bev3d.models.convert import convert_state_dict
from bev3d.models.core.box_coder_3d import denormalize_points
from bev3d.models.heads.detr3d_sampling import project_to_cameras

IMG_SHAPE = [(40, 70)]  # valid part of the PAD-sized images: WangYueFt and mmdet3d 1.x project differently


@pytest.mark.parametrize("name", ["detr3d_r101dcn_gridmask_nus", "detr3d_v99_nus"])
def test_released_config_converts_the_official_key_set_strictly(name):
    torch.manual_seed(0)
    vovnet = "v99" in name
    backbone = official_v99_keys() if vovnet else resnet_keys(101)
    neck = OfficialFPN([256, 512, 768, 1024], 256, 4) if vovnet else OfficialFPN([256, 512, 1024, 2048], 256, 4, 1)
    head = OfficialDETR3DHead()
    # the counts of the official files (docs/models.md): R101-DCN 676, mmdet FPN 14 (V2-99: 16), head 256
    assert len(backbone) == (626 if vovnet else 676)
    assert len(neck.state_dict()) == (16 if vovnet else 14) and len(head.state_dict()) == 256
    source = head.state_dict()
    assert source["transformer.decoder.layers.0.attentions.1.attention_weights.weight"].shape == (24, 256)
    assert source["query_embedding.weight"].shape == (900, 512)
    cfg = load_config(name)
    converted = convert_state_dict(detector_state(zeros_of(backbone, "img_backbone."), neck, head), "detr3d", cfg)
    build_model(cfg).load_state_dict(converted, strict=True)
    if not vovnet:  # mmdet FPN's extra level on the outputs is fpn_convs.3
        assert torch.equal(converted["neck.extra_convs.0.weight"], neck.state_dict()["fpn_convs.3.conv.weight"])
    assert torch.equal(converted["head.layers.3.cross_attn.attention_weights.weight"],
                       source["transformer.decoder.layers.3.attentions.1.attention_weights.weight"])
    for j in range(6):  # distinct copies, each with its box rows in bev3d's code
        bias = converted[f"head.branches.reg_branches.{j}.4.bias"]
        assert torch.equal(bias[7], -source[f"reg_branches.{j}.4.bias"][6])


def _converted(family, projection, *overrides):
    state, neck, head = tiny_detr3d("pad_shape" if family.endswith("mmdet3d1") else "img_shape")
    cfg = load_config("detr3d_r101dcn_gridmask_nus", DETR3D_SMALL + [f"model.head.projection={projection}", *overrides])
    model = build_model(cfg).eval()
    model.load_state_dict(convert_state_dict(state, family, cfg))
    return model, neck, head


def _features(seed=1):
    """C2..C5 of 6 cameras at PAD / (4, 8, 16, 32); the official neck skips C2 (start_level 1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 32 * 2 ** i, PAD[0] // 2 ** (i + 2), PAD[1] // 2 ** (i + 2), generator=g) for i in range(4)]


def _run(model, neck, head):
    feats, lidar2img = _features(), rig(PAD)
    with torch.no_grad():
        official = head([f.view(1, 6, *f.shape[1:]) for f in neck(feats)], lidar2img, IMG_SHAPE, PAD)
        ours = [f.view(1, 6, *f.shape[1:]) for f in model.neck(feats[1:])]
        out = model.head(ours, lidar2img.float(), torch.tensor(IMG_SHAPE), PAD)
    return official, out


@pytest.mark.parametrize("sampler", ["ms_deform_attn", "grid_sample"])
@pytest.mark.parametrize("family, projection", [("detr3d", "unpadded"), ("detr3d_mmdet3d1", "padded")])
def test_converted_detr3d_computes_the_official_sampling(family, projection, sampler):
    model, neck, head = _converted(family, projection, f"model.head.sampler={sampler}")
    (logits, boxes), out = _run(model, neck, head)
    torch.testing.assert_close(out.logits, logits, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.boxes, official_code_to_bev3d(boxes, family), atol=2e-4, rtol=1e-5)
    # bev3d's own projection (padded size, valid image) samples elsewhere: the comparison sees it
    model.head.layers.apply(lambda m: setattr(m, "projection", "padded_valid") if hasattr(m, "projection") else None)
    _, moved = _run(model, neck, head)
    assert (moved.boxes - out.boxes).abs().max() > 1e-2


def test_camera_weights_act_on_their_camera_only():
    """Changing camera c's rows (c * L + level) of the sampling weights changes exactly the queries that camera c
    sees; with camera c's features zero, nothing changes."""
    model, _, _ = _converted("detr3d", "unpadded")
    attn = model.head.layers[0].cross_attn
    g = torch.Generator().manual_seed(2)
    feats = [f.view(1, 6, *f.shape[1:]) for f in model.neck(_features()[1:])]
    query, query_pos = torch.randn(2, 1, 40, 32, generator=g)
    reference = torch.rand(1, 40, 3, generator=g)
    lidar2img, img_shape = rig(PAD).float(), torch.tensor(IMG_SHAPE)
    _, visible = project_to_cameras(denormalize_points(reference, model.head.layers[0].cross_attn.pc_range),
                                    lidar2img, img_shape, PAD, projection="unpadded")  # (1, N, Q)
    cam, L = 2, 4
    assert visible[0, cam].sum() >= 3 and (~visible[0, cam]).sum() >= 3

    def run(feats):
        with torch.no_grad():
            return attn(query, query_pos, reference, feats, lidar2img, img_shape, PAD)

    before = run(feats)
    blind = [f.clone() for f in feats]
    for f in blind:
        f[:, cam] = 0
    before_blind = run(blind)
    with torch.no_grad():
        attn.attention_weights.bias[cam * L:(cam + 1) * L] += 3.0
    after, after_blind = run(feats), run(blind)
    changed = (after - before).abs().amax(-1)[0] > 1e-4  # (Q,)
    assert torch.equal(changed, visible[0, cam])
    torch.testing.assert_close(after_blind, before_blind, atol=0, rtol=0)


def test_per_level_weights_cannot_take_a_released_checkpoint():
    state, _, _ = tiny_detr3d("img_shape")
    cfg = load_config("detr3d_r101dcn_gridmask_nus", DETR3D_SMALL + ["model.head.attention_weights=level"])
    with pytest.raises(Bev3dError, match="24 sampling weights per query.*attention_weights: camera_level"):
        convert_state_dict(state, "detr3d", cfg)
