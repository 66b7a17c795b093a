import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.errors import Bev3dError
from bev3d.models.backbones import FrozenBatchNorm2d, vovnet
from bev3d.models.backbones.vovnet import VoVNet

# VoVNetCP("V-99-eSE") of PETR / DETR3D / StreamPETR: parameters (BatchNorm affine included, buffers not).
V99_PARAMS = 69_523_520


def official_v99_keys():
    """key -> shape of the official V-99-eSE state dict, from its spec: stem [64, 64, 128], stage_conv_ch
    [128, 160, 192, 224], stage_out_ch [256, 512, 768, 1024], block_per_stage [1, 3, 9, 3], 5 layers per
    block, eSE on every block, BatchNorm2d after every conv (with num_batches_tracked)."""
    keys = {}

    def conv_bn(name, c_in, c_out, k):
        keys[f"{name}/conv.weight"] = (c_out, c_in, k, k)
        for t in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}/norm.{t}"] = (c_out,)
        keys[f"{name}/norm.num_batches_tracked"] = ()

    conv_bn("stem.stem_1", 3, 64, 3)
    conv_bn("stem.stem_2", 64, 64, 3)
    conv_bn("stem.stem_3", 64, 128, 3)
    in_ch = 128
    for s, stage_ch, out_ch, n in zip((2, 3, 4, 5), (128, 160, 192, 224), (256, 512, 768, 1024), (1, 3, 9, 3)):
        for b in range(1, n + 1):
            p = f"stage{s}.OSA{s}_{b}"
            block_in = in_ch if b == 1 else out_ch
            for i in range(5):
                conv_bn(f"{p}.layers.{i}.OSA{s}_{b}_{i}", block_in if i == 0 else stage_ch, stage_ch, 3)
            conv_bn(f"{p}.concat.OSA{s}_{b}_concat", block_in + 5 * stage_ch, out_ch, 1)
            keys[f"{p}.ese.fc.weight"] = (out_ch, out_ch, 1, 1)
            keys[f"{p}.ese.fc.bias"] = (out_ch,)
        in_ch = out_ch
    return keys


def test_v99_state_dict_is_the_official_layout():
    official = official_v99_keys()
    assert len(official) == 626
    assert "stage4.OSA4_9.layers.4.OSA4_9_4/norm.running_var" in official
    model = VoVNet(99, frozen_bn=False, out_indices=[0, 1, 2, 3])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    learnable = sum(math.prod(s) for k, s in official.items() if not k.endswith(buffers))
    assert learnable == V99_PARAMS == sum(p.numel() for p in model.parameters())


def test_official_backbone_file_loads(tmp_path):
    state = {f"img_backbone.{k}": torch.zeros(s, dtype=torch.long if not s else torch.float32)
             for k, s in official_v99_keys().items()}
    state["img_backbone.stage5.OSA5_3.ese.fc.bias"] = torch.randn(1024)
    torch.save({"state_dict": state}, tmp_path / "v99.pth")
    model = VoVNet(99, out_indices=[2, 3])
    assert model.load_weights(tmp_path / "v99.pth") == ([], [])
    assert torch.equal(model.stage5.OSA5_3.ese.fc.bias, state["img_backbone.stage5.OSA5_3.ese.fc.bias"])


def test_forward_shapes_and_out_channels():
    model = VoVNet(99, out_indices=[0, 1, 2, 3]).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 768, 4, 6), (1, 1024, 2, 3)]
    assert model.out_channels == [256, 512, 768, 1024]
    assert VoVNet(99, out_indices=[2, 3]).out_channels == [768, 1024]


def _bn_by_hand(x, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _osa_by_hand(block, x, identity):
    """Official _OSA_module._forward: 5 chained conv-BN-ReLU, concat with the input, 1x1 conv-BN-ReLU,
    eSE = x * relu6(fc(avg_pool(x)) + 3) / 6, plus the input for identity blocks."""
    feats, h = [x], x
    for layer in block.layers:
        conv, bn = layer[0], layer[1]
        h = F.relu(_bn_by_hand(F.conv2d(h, conv.weight, padding=1), bn))
        feats.append(h)
    conv, bn = block.concat[0], block.concat[1]
    y = F.relu(_bn_by_hand(F.conv2d(torch.cat(feats, 1), conv.weight), bn))
    gate = F.relu6(F.conv2d(y.mean((2, 3), keepdim=True), block.ese.fc.weight, block.ese.fc.bias) + 3) / 6
    y = y * gate
    return y + x if identity else y


@pytest.mark.parametrize("name,identity", [("stage3.OSA3_1", False), ("stage3.OSA3_2", True)])
def test_osa_block_against_a_hand_computation(name, identity):
    model = VoVNet(99, frozen_bn=False, out_indices=[1]).eval()
    block = model.get_submodule(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        block.ese.fc.bias.copy_(torch.randn(block.ese.fc.bias.shape, generator=g) * 2)
        x = torch.rand(2, 256 if not identity else 512, 6, 7, generator=g)
        torch.testing.assert_close(block(x), _osa_by_hand(block, x, identity), rtol=1e-4, atol=1e-5)


def test_frozen_stages_norm_eval_and_unused_stages():
    model = VoVNet(39, frozen_stages=1, frozen_bn=False, out_indices=[2]).train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.stage2.parameters())
    assert all(p.requires_grad for p in model.stage3.parameters())
    assert not any(p.requires_grad for p in model.stage5.parameters())  # after the last output
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in VoVNet(39).modules())
    with pytest.raises(Bev3dError, match="depth"):
        VoVNet(50)
    with pytest.raises(Bev3dError, match="out_indices"):
        VoVNet(99, out_indices=[4])


def test_checkpointing_gives_the_same_gradients(monkeypatch):
    calls, checkpoint = [], vovnet.cp.checkpoint
    monkeypatch.setattr(vovnet.cp, "checkpoint", lambda *a, **kw: calls.append(a[0]) or checkpoint(*a, **kw))
    torch.manual_seed(0)
    plain = VoVNet(39, frozen_bn=False, out_indices=[0, 1]).train()
    ckpt = VoVNet(39, frozen_bn=False, out_indices=[0, 1], with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 32)
    sum(o.square().mean() for o in plain(x)).backward()
    sum(o.square().mean() for o in ckpt(x)).backward()
    assert calls == [ckpt.stage2.OSA2_1, ckpt.stage3.OSA3_1]
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
