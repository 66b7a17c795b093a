"""PETR checkpoints (megvii-research/PETR, mmdet3d 1.x projects/PETR): the official key sets of the released models
convert strictly; a converted model computes what the official formulas compute (tests/official_mmdet3d.py, an
independent re-implementation: cell-corner frustum, 384-channel camera sine, CPFPN); bad input is refused."""

import pytest
import torch
import torch.nn.functional as F
from official_mmdet3d import (PAD, PETR_SMALL, OfficialFPN, OfficialPETRHead, detector_state,
                              official_code_to_bev3d, resnet_keys, rig, sine_3d, tiny_petr, zeros_of)
from test_vovnet import official_v99_keys

from bev3d.cli import main as cli
from bev3d.config import config_to_dict, load_config
from bev3d.engine.test import load_weights
from bev3d.errors import Bev3dError
from bev3d.models import build_model
from bev3d.models.convert import convert_file, convert_state_dict
from bev3d.models.heads.petr import multiview_sine, padding_mask


@pytest.mark.parametrize("name, backbone_channels", [("petr_r50dcn_gridmask_p4_nus", [1024, 2048]),
                                                     ("petr_v99_gridmask_p4_800x320_nus", [768, 1024])])
def test_released_config_converts_the_official_key_set_strictly(name, backbone_channels):
    torch.manual_seed(0)
    backbone = official_v99_keys() if "v99" in name else resnet_keys(50)
    neck, head = OfficialFPN(backbone_channels, 256, 2, cpfpn=True), OfficialPETRHead()
    # the counts of the official files (docs/models.md): R50-DCN 336, V2-99 626, CPFPN 6, head 222
    assert len(backbone) == (626 if "v99" in name else 336)
    assert len(neck.state_dict()) == 6 and len(head.state_dict()) == 222
    source = head.state_dict()
    assert source["adapt_pos3d.0.weight"].shape == (1024, 384, 1, 1)
    assert source["position_encoder.0.weight"].shape == (1024, 192, 1, 1)
    cfg = load_config(name)
    converted = convert_state_dict(detector_state(zeros_of(backbone, "img_backbone."), neck, head), "petr", cfg)
    build_model(cfg).load_state_dict(converted, strict=True)
    in_proj = source["transformer.decoder.layers.5.attentions.1.attn.in_proj_weight"]
    assert torch.equal(converted["head.decoder.layers.5.cross_attn.k_proj.weight"], in_proj[256:512])
    assert torch.equal(converted["head.decoder.norm.weight"], source["transformer.decoder.post_norm.weight"])
    box = source["reg_branches.0.4.weight"]
    assert torch.equal(converted["head.branches.reg_branches.0.4.weight"][6], -box[7])
    assert not any(".branches.1." in k for k in converted)  # the five repeated copies are dropped


def test_the_names_users_type_are_the_released_recipes():
    for name, recipe in (("petr_r50_nus", "petr_r50dcn_gridmask_p4_nus"),
                         ("detr3d_r101_nus", "detr3d_r101dcn_gridmask_nus")):
        a, b = config_to_dict(load_config(name)), config_to_dict(load_config(recipe))
        assert a.pop("work_dir") != b.pop("work_dir") and a == b


def _run(model, neck, head, B=2, seed=1):
    """The same random C4/C5 features and a padded batch through the official stand-in and the bev3d model."""
    g = torch.Generator().manual_seed(seed)
    c4, c5 = torch.randn(B * 6, 128, 4, 6, generator=g), torch.randn(B * 6, 256, 2, 3, generator=g)
    lidar2img = torch.cat([rig(PAD), rig(PAD, f=70.0)])[:B]
    img_shape = [(40, 70), (50, 96)][:B]  # row 3 / column 5 of the first sample's cells start in the padding
    with torch.no_grad():
        feats = neck([c4, c5])[0].view(B, 6, 32, 4, 6)
        official = head(feats, lidar2img, img_shape, PAD)
        ours_feats = [f.view(B, 6, *f.shape[1:]) for f in model.neck([c4, c5])]
        out = model.head(ours_feats, lidar2img.float(), torch.tensor(img_shape), PAD)
    return official, out


@pytest.mark.parametrize("family", ["petr", "petr_mmdet3d1"])
def test_converted_petr_computes_the_official_formulas(family):
    state, neck, head = tiny_petr()
    cfg = load_config("petr_r50dcn_gridmask_p4_nus", PETR_SMALL)
    model = build_model(cfg).eval()
    model.load_state_dict(convert_state_dict(state, family, cfg))
    (logits, boxes), out = _run(model, neck, head)
    torch.testing.assert_close(out.logits, logits, atol=5e-5, rtol=0)
    torch.testing.assert_close(out.boxes, official_code_to_bev3d(boxes, family), atol=1e-4, rtol=1e-5)
    # the same weights with cell centres instead of corners: the comparison sees the difference
    centres = build_model(load_config("petr_r50dcn_gridmask_p4_nus", PETR_SMALL + ["model.head.cell_point=centre"]))
    centres.eval().load_state_dict(model.state_dict())
    _, moved = _run(centres, neck, head)
    assert (moved.boxes - out.boxes).abs().max() > 1e-2


def test_multiview_sine_is_the_official_sine_3d():
    mask = torch.zeros(2, 6, 5, 7, dtype=torch.bool)
    mask[0, :, 3:] = True
    mask[1, :, :, 6:] = True
    mask[1, 4] = True  # a camera without valid cells
    torch.testing.assert_close(multiview_sine(mask, 16), sine_3d(mask, 16).flatten(0, 1), atol=1e-6, rtol=0)


def test_corner_padding_mask_is_the_nearest_downsampled_pixel_mask():
    img_shape = torch.tensor([[40, 70], [64, 96], [33, 17], [48, 80]])
    pixels = torch.ones(4, *PAD)
    for b, (h, w) in enumerate(img_shape.tolist()):
        pixels[b, :h, :w] = 0
    official = F.interpolate(pixels[:, None], size=(4, 6))[:, 0].bool()
    assert torch.equal(padding_mask(img_shape, PAD, (4, 6), offset=0.0), official)
    assert not torch.equal(padding_mask(img_shape, PAD, (4, 6)), official)  # centres differ


def test_converted_checkpoint_loads_for_bev3d_test(tmp_path):
    state, _, _ = tiny_petr()
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "petr.pth")
    assert cli(["convert", str(tmp_path / "petr.pth"), "--from", "petr", "--cfg", "petr_r50dcn_gridmask_p4_nus",
                "--out", str(tmp_path / "ours.pth"), "--opts", *PETR_SMALL]) == 0
    load_weights(build_model(load_config("petr_r50dcn_gridmask_p4_nus", PETR_SMALL)), tmp_path / "ours.pth")


def test_convert_rejects_bad_input_and_writes_nothing(tmp_path, capsys):
    state, _, _ = tiny_petr()
    cfg = load_config("petr_r50dcn_gridmask_p4_nus", PETR_SMALL)
    dst = tmp_path / "out.pth"

    def refused(state, family, cfg, match):
        torch.save({"state_dict": state}, tmp_path / "official.pth")
        with pytest.raises(Bev3dError, match=match):
            convert_file(tmp_path / "official.pth", family, cfg, dst)

    refused(state, "detr3d", load_config("detr3d_r101dcn_gridmask_nus"), "not a detr3d checkpoint.*look like a petr")
    refused(state, "petr", load_config("detr3d_r101dcn_gridmask_nus"), "converts to a petr model.*--cfg petr_")
    refused(state, "petr", load_config("petr_r50dcn_gridmask_p4_nus", PETR_SMALL + ["model.head.with_multiview=false"]),
            "with_multiview: true")
    refused(state, "petr", load_config("petr_r50dcn_gridmask_p4_nus", PETR_SMALL + ["model.backbone.dcn_stages=[]"]),
            "dcn_stages")
    refused(state, "petr", load_config("petr_r50dcn_gridmask_p4_nus", PETR_SMALL + ["model.head.num_decoder_layers=1"]),
            "fit nothing in this model")
    unequal = dict(state)
    unequal["pts_bbox_head.cls_branches.3.6.bias"] = unequal["pts_bbox_head.cls_branches.3.6.bias"] + 1
    refused(unequal, "petr", cfg, "cls_branches.3.6.bias should be a copy of .*cls_branches.0.6.bias")
    refused({"weight": torch.randn(3, 3)}, "petr", cfg, r"not a petr checkpoint.*first keys: \['weight'\]")
    torch.save({"state_dict": state}, tmp_path / "official.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tmp_path / "official.pth").read_bytes()[:50_000])
    assert cli(["convert", str(truncated), "--from", "petr", "--cfg", "petr_r50dcn_gridmask_p4_nus",
                "--out", str(dst), "--opts", *PETR_SMALL]) == 2
    assert "Cannot read" in capsys.readouterr().err
    assert not dst.exists() and not list(tmp_path.glob(".out.pth*"))
