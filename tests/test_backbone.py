import pytest
import torch
import torch.nn as nn

from bev3d.errors import Bev3dError
from bev3d.models.backbones import FrozenBatchNorm2d, ResNet
from bev3d.models.necks import FPN, ChannelMapper

# torchvision.models.resnet{18,34,50,101}: parameter counts minus the 1000-way fc layer.
TORCHVISION_PARAMS = {18: 11_689_512 - 513_000, 34: 21_797_672 - 513_000, 50: 25_557_032 - 2_049_000,
                      101: 44_549_160 - 2_049_000}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_count_matches_torchvision(depth):
    model = ResNet(depth, frozen_bn=False, out_indices=[0, 1, 2, 3])
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[depth]


def test_torchvision_key_layout():
    keys = set(ResNet(50, frozen_bn=False).state_dict())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
              "layer3.5.conv3.weight", "layer4.2.bn3.num_batches_tracked"):
        assert k in keys
    assert len(keys) == 318  # torchvision resnet50's 320 minus fc.weight, fc.bias


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_frozen_bn_matches_batchnorm_eval():
    bn = nn.BatchNorm2d(8).eval()
    _randomize_bn(bn)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))


def test_load_torchvision_layout_roundtrip(tmp_path):
    ref = ResNet(18, frozen_bn=False, out_indices=[0, 1, 2, 3]).eval()
    _randomize_bn(ref)
    state = dict(ref.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000),
                                      "extra.bogus": torch.zeros(1)})
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r18.pth")
    model = ResNet(18, out_indices=[0, 1, 2, 3])
    missing, unexpected = model.load_weights(tmp_path / "r18.pth")
    assert missing == [] and unexpected == ["extra.bogus"]
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(model.eval()(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_load_msra_caffe_layout(tmp_path):
    """Detectron names with BatchNorm folded into scale/shift must reproduce the BN model."""
    ref = ResNet(50, style="caffe", frozen_bn=False, out_indices=[3]).eval()
    _randomize_bn(ref)
    sd = ref.state_dict()
    caffe = {"conv1_w": sd["conv1.weight"], "pred_w": torch.zeros(1000, 2048)}

    def fold(bn_prefix, out_prefix):
        scale = sd[bn_prefix + ".weight"] / (sd[bn_prefix + ".running_var"] + 1e-5).sqrt()
        caffe[out_prefix + "_s"] = scale
        caffe[out_prefix + "_b"] = sd[bn_prefix + ".bias"] - sd[bn_prefix + ".running_mean"] * scale

    fold("bn1", "res_conv1_bn")
    for stage, n in zip(range(2, 6), (3, 4, 6, 3)):
        for blk in range(n):
            tv = f"layer{stage - 1}.{blk}"
            for conv, branch in (("conv1", "branch2a"), ("conv2", "branch2b"), ("conv3", "branch2c")):
                caffe[f"res{stage}_{blk}_{branch}_w"] = sd[f"{tv}.{conv}.weight"]
                fold(f"{tv}.bn{conv[-1]}", f"res{stage}_{blk}_{branch}_bn")
            if blk == 0:
                caffe[f"res{stage}_{blk}_branch1_w"] = sd[f"{tv}.downsample.0.weight"]
                fold(f"{tv}.downsample.1", f"res{stage}_{blk}_branch1_bn")
    torch.save(caffe, tmp_path / "R-50.pth")
    model = ResNet(50, style="caffe", out_indices=[3])
    missing, unexpected = model.load_weights(tmp_path / "R-50.pth")
    assert missing == [] and unexpected == []
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x)[0], ref(x)[0], rtol=1e-3, atol=1e-3)


def test_detector_checkpoints_load_their_backbone_and_foreign_files_are_an_error(tmp_path):
    from bev3d.config import BackboneConfig
    from bev3d.models.backbones import build_backbone

    ref = ResNet(18, out_indices=[3])
    nn.init.normal_(ref.conv1.weight)
    # DETR / Deformable DETR: {"model": {"backbone.0.body.*", "transformer.*", ...}}
    detr = {f"backbone.0.body.{k}": v for k, v in ref.state_dict().items()}
    detr["transformer.decoder.norm.weight"] = torch.ones(4)
    torch.save({"model": detr}, tmp_path / "detr.pth")
    cfg = BackboneConfig(depth=18, out_indices=[3], weights=str(tmp_path / "detr.pth"))
    torch.testing.assert_close(build_backbone(cfg).conv1.weight, ref.conv1.weight)
    # mmdet3d: {"state_dict": {"img_backbone.*", ...}}
    torch.save({"state_dict": {f"img_backbone.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "mm.pth")
    cfg.weights = str(tmp_path / "mm.pth")
    torch.testing.assert_close(build_backbone(cfg).conv1.weight, ref.conv1.weight)
    # a ResNet-50 file for a ResNet-18 (or any other network): almost nothing fits -> an error naming keys
    torch.save(ResNet(50).state_dict() | {"foo.bar": torch.zeros(1)}, tmp_path / "r50.pth")
    cfg.weights = str(tmp_path / "r50.pth")
    with pytest.raises(Bev3dError, match=r"r50.pth fill only \d+ of the backbone's \d+ tensors.*layer1.0.conv1.weight"):
        build_backbone(cfg)


def test_unreadable_weights_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Bev3dError, match="corrupt.pth"):
        ResNet(18).load_weights(bad)
    with pytest.raises(Bev3dError, match="missing.pth"):
        ResNet(18).load_weights(tmp_path / "missing.pth")


def test_frozen_stages_norm_eval_and_caffe_stride():
    model = ResNet(50, style="caffe", frozen_stages=1, frozen_bn=False, norm_eval=True).train()
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    pytorch_style = ResNet(50, style="pytorch")
    assert pytorch_style.layer2[0].conv1.stride == (1, 1) and pytorch_style.layer2[0].conv2.stride == (2, 2)


def test_out_indices_strides_and_checkpointing_gradients():
    torch.manual_seed(0)
    plain = ResNet(18, out_indices=[0, 1, 2, 3], frozen_bn=False).train()
    ckpt = ResNet(18, out_indices=[0, 1, 2, 3], frozen_bn=False, with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    outs = plain(x)
    assert [o.shape[-2:] for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert plain.out_channels == [64, 128, 256, 512]
    sum(o.square().mean() for o in outs).backward()
    sum(o.square().mean() for o in ckpt(x)).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def _identity_convs(fpn):
    for conv in list(fpn.lateral_convs) + list(fpn.fpn_convs):
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            k = conv.weight.shape[-1] // 2
            conv.weight[range(conv.weight.shape[0]), range(conv.weight.shape[0]), k, k] = 1.0


def test_fpn_top_down_by_hand():
    fpn = FPN([4, 4, 4], out_channels=4, num_outs=5)
    _identity_convs(fpn)
    x = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    up = lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    outs = fpn(x)
    torch.testing.assert_close(outs[2], x[2])
    torch.testing.assert_close(outs[1], x[1] + up(x[2]))
    torch.testing.assert_close(outs[0], x[0] + up(x[1] + up(x[2])))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2, 1]


def test_fpn_start_level_and_channel_mapper():
    feats = [torch.randn(2, c, s, s) for c, s in ((64, 32), (128, 16), (256, 8))]
    outs = FPN([64, 128, 256], 32, start_level=1, num_outs=3)(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    mapper = ChannelMapper([64, 128, 256], 32, num_outs=4, norm="gn")
    assert [tuple(o.shape) for o in mapper(feats)] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4)]
    with pytest.raises(Bev3dError, match="num_outs"):
        FPN([64, 128], 32, num_outs=1)


def test_stages_after_the_last_output_are_frozen():
    model = ResNet(18, out_indices=[1])
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(p.requires_grad for p in model.layer3.parameters())
    assert not any(p.requires_grad for p in model.layer4.parameters())
