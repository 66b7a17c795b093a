"""DETR and Deformable DETR: checkpoints in the original layout, converted by `bev3d convert`, give the outputs of
Hugging Face `transformers` (an independent implementation; pure PyTorch, random weights from a config, nothing
downloaded) on a padded batch of two images.

Each test builds an HF model, perturbs all its weights, writes the original-format checkpoint of those weights
(facebookresearch/detr, fundamentalvision/Deformable-DETR: the reverse of HF's conversion scripts, written below)
and converts it. HF quirks (shared/notes/official-checkpoints.md): DETR with `auxiliary_loss` feeds the normed
decoder state to the next layer (kept off here); refine-only Deformable DETR ties class_embed across layers
(untied below, as the original has one head per layer).
"""

import argparse
import copy
import re

import pytest
import torch
import torch.nn as nn

from bev3d.cli import main as cli
from bev3d.config import load_config
from bev3d.engine.test import load_weights
from bev3d.errors import Bev3dError
from bev3d.models import build_model
from bev3d.models.convert import convert_file
from query_sets import assert_same_queries

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (the reference)")

# Small widths: a quarter-width ResNet-50 (the released bottleneck layout), 64 channels, 2 + 3 layers.
SMALL = ["model.backbone.base_channels=16", "model.neck.out_channels=64", "model.head.embed_dims=64",
         "model.head.num_heads=4", "model.head.ffn_dims=128", "model.head.num_encoder_layers=2",
         "model.head.num_decoder_layers=3", "model.head.num_queries=20", "model.head.num_classes=7"]
HF_SMALL = dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                decoder_ffn_dim=128, encoder_layers=2, decoder_layers=3, num_queries=20, num_labels=7)
HF_RESNET_SMALL = dict(embedding_size=16, hidden_sizes=[64, 128, 256, 512])
TOL = dict(atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- HF -> original layout


def _resnet_key(k):
    """HF ResNet (embedder / encoder.stages.S.layers.B.{layer.J, shortcut}) -> torchvision names."""
    m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", k)
    if m:
        return f"{'conv1' if m[1] == 'convolution' else 'bn1'}.{m[2]}"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|shortcut)\.(convolution|normalization)"
                     r"\.(\w+)", k)
    stage, block, j, kind, leaf = m.groups()
    if j is None:
        name = f"downsample.{0 if kind == 'convolution' else 1}"
    else:
        name = f"{'conv' if kind == 'convolution' else 'bn'}{int(j) + 1}"
    return f"layer{int(stage) + 1}.{block}.{name}.{leaf}"


def _pack_attention(hf, src, dst, out):
    """HF q/k/v/o_proj -> nn.MultiheadAttention's in_proj_* (rows q, k, v) and out_proj."""
    for kind in ("weight", "bias"):
        out[f"{dst}in_proj_{kind}"] = torch.cat([hf.pop(f"{src}{n}_proj.{kind}") for n in "qkv"])
        out[f"{dst}out_proj.{kind}"] = hf.pop(f"{src}o_proj.{kind}")


# per layer: HF name -> original name (modules kept whole; attention handled by _pack_attention)
DETR_ENC = {"self_attn_layer_norm": "norm1", "mlp.fc1": "linear1", "mlp.fc2": "linear2", "final_layer_norm": "norm2"}
DETR_DEC = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "mlp.fc1": "linear1",
            "mlp.fc2": "linear2", "final_layer_norm": "norm3"}
DEFORMABLE_ENC = {"self_attn": "self_attn", **DETR_ENC}
DEFORMABLE_DEC = {"encoder_attn": "cross_attn", "encoder_attn_layer_norm": "norm1", "self_attn_layer_norm": "norm2",
                  "mlp.fc1": "linear1", "mlp.fc2": "linear2", "final_layer_norm": "norm3"}
TOP = {"model.input_projection.": "input_proj.", "model.input_proj.": "input_proj.",
       "model.query_position_embeddings.": "query_embed.", "model.decoder.layernorm.": "transformer.decoder.norm.",
       "class_labels_classifier.": "class_embed.", "bbox_predictor.": "bbox_embed.", "class_embed.": "class_embed.",
       "bbox_embed.": "bbox_embed.", "model.decoder.bbox_embed.": "transformer.decoder.bbox_embed.",
       "model.decoder.class_embed.": "transformer.decoder.class_embed.", "model.": "transformer."}


def original_state_dict(hf_model):
    """The state dict the original code base would hold for these weights."""
    hf = dict(hf_model.state_dict())
    deformable = any("level_embed" in k for k in hf)
    out = {}
    for k in [k for k in hf if k.startswith("model.backbone.model.")]:
        out["backbone.0.body." + _resnet_key(k[len("model.backbone.model."):])] = hf.pop(k)
    for part, table in (("encoder", DEFORMABLE_ENC if deformable else DETR_ENC),
                        ("decoder", DEFORMABLE_DEC if deformable else DETR_DEC)):
        layers = {int(k.split(".")[3]) for k in hf if k.startswith(f"model.{part}.layers.")}
        for i in sorted(layers):
            src, dst = f"model.{part}.layers.{i}.", f"transformer.{part}.layers.{i}."
            if not deformable or part == "decoder":
                _pack_attention(hf, src + "self_attn.", dst + "self_attn.", out)
            if not deformable and part == "decoder":
                _pack_attention(hf, src + "encoder_attn.", dst + "multihead_attn.", out)
            for k in [k for k in hf if k.startswith(src)]:
                name, leaf = next((n, k[len(src) + len(n) + 1:]) for n in table if k.startswith(f"{src}{n}."))
                out[f"{dst}{table[name]}.{leaf}"] = hf.pop(k)
    for k in list(hf):
        prefix = next(p for p in TOP if k.startswith(p))
        out[TOP[prefix] + k[len(prefix):]] = hf.pop(k)
    return out


# ----------------------------------------------------------------------------- models and data


def perturb(model):
    """Every weight moved off its initialisation (zero-initialised layers included) so that every tensor
    matters; frozen BatchNorm gets non-trivial statistics."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.rand(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + noise)
            elif "backbone" in name and name.endswith(("running_mean", "normalization.weight", "normalization.bias")):
                t.copy_(0.9 + 0.2 * noise if name.endswith("weight") else 0.2 * noise - 0.1)
            elif not ("backbone" in name and t.dim() == 4):
                t.add_(0.1 * noise - 0.05)
    return model


def hf_detr(backbone_sizes, **kw):
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(**backbone_sizes, out_features=["stage4"])
    cfg = DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, dropout=0.0,
                     auxiliary_loss=False, **kw)
    return perturb(DetrForObjectDetection(cfg)).eval()


def hf_deformable(backbone_sizes, refine, two_stage, **kw):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(**backbone_sizes, out_features=["stage2", "stage3", "stage4"])
    cfg = DeformableDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                               dropout=0.0, with_box_refine=refine, two_stage=two_stage,
                               two_stage_num_proposals=kw.get("num_queries", 300), **kw)
    model = DeformableDetrForObjectDetection(cfg)
    if refine and not two_stage:  # HF ties these; the original has one class head per layer
        model.class_embed = nn.ModuleList(copy.deepcopy(model.class_embed[0]) for _ in model.class_embed)
    return perturb(model).eval()


def padded_batch(size=(128, 160), valid=(96, 120)):
    """Two images, the second smaller and zero-padded: img (2, 3, H, W), mask (2, H, W) True at padding."""
    img = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, *size, dtype=torch.bool)
    mask[1, valid[0]:] = True
    mask[1, :, valid[1]:] = True
    return img.masked_fill(mask[:, None], 0.0), mask


def hf_outputs(model, img, mask):
    with torch.no_grad():
        return model(pixel_values=img, pixel_mask=(~mask).long())


def assert_clear_topk(ref, k):
    """Proposal scores of two implementations differ by rounding, so the k-th and (k+1)-th must lie further apart
    for both to pick the same proposals (else the weights' seed has to change), unless both are padded or border
    positions (proposal +inf): those share one score and are identical proposals, so either pick is the same."""
    for scores, coords in zip(ref.enc_outputs_class[..., 0], ref.enc_outputs_coord_logits):
        padded = torch.isinf(coords).any(-1)
        kth, after = scores.topk(k + 1).indices[-2:]
        if padded[kth] and padded[after]:
            assert padded[(scores - scores[kth]).abs() < 1e-4].all()
        else:
            assert scores[kth] - scores[after] > 1e-4


def converted(tmp_path, hf_model, family, cfg_name, opts, extra=None):
    """Write the original checkpoint of `hf_model`, convert it, load it the way `bev3d test` does."""
    src, dst = tmp_path / "official.pth", tmp_path / "bev3d.pth"
    torch.save({"model": original_state_dict(hf_model), **(extra or {})}, src)
    cfg = load_config(cfg_name, opts)
    convert_file(src, family, cfg, dst)
    model = build_model(cfg).eval()
    load_weights(model, dst, cfg_name)
    return model


def bev3d_outputs(model, img, mask):
    with torch.no_grad():
        return model({"img": img, "mask": mask})


# ----------------------------------------------------------------------------- against HF


def test_detr_matches_hf(tmp_path):
    hf = hf_detr(HF_RESNET_SMALL, **HF_SMALL)
    img, mask = padded_batch()
    ref = hf_outputs(hf, img, mask)
    src, dst = tmp_path / "detr-r50.pth", tmp_path / "detr_bev3d.pth"
    torch.save({"model": original_state_dict(hf)}, src)
    rc = cli(["convert", str(src), "--from", "detr", "--cfg", "detr_r50_coco", "--out", str(dst),
              "--opts", *SMALL])
    assert rc == 0
    cfg = load_config("detr_r50_coco", SMALL)
    model = build_model(cfg).eval()
    load_weights(model, dst)
    out = bev3d_outputs(model, img, mask)
    torch.testing.assert_close(out.logits[-1], ref.logits, **TOL)
    torch.testing.assert_close(out.boxes[-1], ref.pred_boxes, **TOL)


@pytest.mark.parametrize("refine,two_stage", [(False, False), (True, False), (True, True)],
                         ids=["base", "refine", "two_stage"])
def test_deformable_detr_matches_hf(tmp_path, refine, two_stage):
    hf = hf_deformable(HF_RESNET_SMALL, refine, two_stage, **HF_SMALL)
    img, mask = padded_batch()
    ref = hf_outputs(hf, img, mask)
    opts = SMALL + [f"model.head.with_box_refine={refine}", f"model.head.two_stage={two_stage}"]
    # The training scripts store their argparse arguments in the checkpoint.
    model = converted(tmp_path, hf, "deformable_detr", "deformable_detr_r50_coco", opts,
                      {"args": argparse.Namespace(lr=2e-4, with_box_refine=refine), "epoch": 49})
    out = bev3d_outputs(model, img, mask)
    if two_stage:
        assert_clear_topk(ref, HF_SMALL["num_queries"])
        assert_same_queries(out.logits[-1], out.boxes[-1], ref.logits, ref.pred_boxes)
        torch.testing.assert_close(out.enc.logits[0], ref.enc_outputs_class, **TOL)
        torch.testing.assert_close(out.enc.boxes[0], ref.enc_outputs_coord_logits.sigmoid(), **TOL)
    else:
        torch.testing.assert_close(out.logits[-1], ref.logits, **TOL)
        torch.testing.assert_close(out.boxes[-1], ref.pred_boxes, **TOL)


def _rank_padding_first(hf):
    """Make the proposal logit of padded positions (whose memory is zeroed: logit = head(LN(enc_output.bias)))
    the largest possible: enc_output.bias along the class-0 direction, which LayerNorm maps to the maximiser."""
    with torch.no_grad():
        w = hf.model.decoder.class_embed[-1].weight[0] * hf.model.enc_output_norm.weight
        hf.model.enc_output.bias.copy_(w - w.mean())


def test_two_stage_topk_all_is_the_original(tmp_path):
    hf = hf_deformable(HF_RESNET_SMALL, True, True, **HF_SMALL)
    _rank_padding_first(hf)
    img, mask = padded_batch()
    ref = hf_outputs(hf, img, mask)
    opts = SMALL + ["model.head.with_box_refine=true", "model.head.two_stage=true"]
    model = converted(tmp_path, hf, "deformable_detr", "deformable_detr_r50_coco", opts)
    all_out = bev3d_outputs(model, img, mask)
    assert_same_queries(all_out.logits[-1], all_out.boxes[-1], ref.logits, ref.pred_boxes)
    # The padded image's queries all start from padding (box (1, 1, 1, 1)); "valid" picks image positions.
    torch.testing.assert_close(ref.pred_boxes[1], ref.pred_boxes[1, :1].expand_as(ref.pred_boxes[1]))
    model.transformer.two_stage_topk = "valid"
    valid_out = bev3d_outputs(model, img, mask)
    # Nothing is padded in image 0.
    assert_same_queries(valid_out.logits[-1][:1], valid_out.boxes[-1][:1], ref.logits[:1], ref.pred_boxes[:1])
    assert (valid_out.boxes[-1][1] - ref.pred_boxes[1]).abs().max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("cfg_name,refine,two_stage", [
    ("detr_r50_coco", None, None),
    ("deformable_detr_r50_coco", False, False),
    ("deformable_detr_r50_refine_coco", True, False),
    ("deformable_detr_r50_two_stage_coco", True, True),
])
def test_released_configs_match_hf_r50(tmp_path, cfg_name, refine, two_stage):
    """The released configs as they are (ResNet-50, 256 channels, 6 + 6 layers, COCO heads) at 320 x 416."""
    if refine is None:
        hf = hf_detr({}, num_labels=91)
        family = "detr"
    else:
        hf = hf_deformable({}, refine, two_stage, num_labels=91)
        family = "deformable_detr"
    img, mask = padded_batch((320, 416), (256, 300))
    ref = hf_outputs(hf, img, mask)
    if two_stage:
        assert_clear_topk(ref, 300)
    out = bev3d_outputs(converted(tmp_path, hf, family, cfg_name, []), img, mask)
    if two_stage:
        assert_same_queries(out.logits[-1], out.boxes[-1], ref.logits, ref.pred_boxes)
    else:
        torch.testing.assert_close(out.logits[-1], ref.logits, **TOL)
        torch.testing.assert_close(out.boxes[-1], ref.pred_boxes, **TOL)


# ----------------------------------------------------------------------------- errors, fine-tuning


@pytest.fixture(scope="module")
def detr_official(tmp_path_factory):
    """A small original-layout DETR checkpoint and the weights it holds."""
    path = tmp_path_factory.mktemp("official") / "detr-r50-e632da11.pth"
    state = original_state_dict(hf_detr(HF_RESNET_SMALL, **HF_SMALL))
    torch.save({"model": state}, path)
    return path, state


def test_convert_rejects_bad_input_and_writes_nothing(tmp_path, detr_official):
    path, state = detr_official
    dst = tmp_path / "out.pth"
    deformable = load_config("deformable_detr_r50_coco", SMALL)
    with pytest.raises(Bev3dError, match="look like a detr checkpoint: try --from detr"):
        convert_file(path, "deformable_detr", deformable, dst)
    with pytest.raises(Bev3dError, match="converts to a DETR config"):
        convert_file(path, "detr", deformable, dst)
    with pytest.raises(Bev3dError, match="fit nothing in this model"):  # another architecture (2 decoder layers)
        convert_file(path, "detr", load_config("detr_r50_coco", SMALL + ["model.head.num_decoder_layers=2"]), dst)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(Bev3dError, match="Cannot read .*truncated.pth"):
        convert_file(truncated, "detr", load_config("detr_r50_coco", SMALL), dst)
    random = tmp_path / "random.pth"
    torch.save({"weight": torch.randn(3, 3), "layer.bias": torch.randn(3)}, random)
    with pytest.raises(Bev3dError, match=r"has no .*backbone.*first keys: \['weight', 'layer.bias'\]; --from values"):
        convert_file(random, "detr", load_config("detr_r50_coco", SMALL), dst)
    assert not dst.exists() and not list(tmp_path.glob(".out.pth*"))


def test_deformable_layouts_are_told_apart(tmp_path):
    """A base checkpoint has no refinement copies; a refine checkpoint's heads are not copies of one."""
    base = original_state_dict(hf_deformable(HF_RESNET_SMALL, False, False, **HF_SMALL))
    refine = original_state_dict(hf_deformable(HF_RESNET_SMALL, True, False, **HF_SMALL))
    for state, opts, message in ((base, ["model.head.with_box_refine=true"], "no tensors under 'transformer.decoder"),
                                 (refine, [], "fit nothing|should be a copy of")):
        torch.save({"model": state}, tmp_path / "official.pth")
        with pytest.raises(Bev3dError, match=message):
            convert_file(tmp_path / "official.pth", "deformable_detr",
                         load_config("deformable_detr_r50_coco", SMALL + opts), tmp_path / "out.pth")


def test_test_command_refuses_official_checkpoints(tmp_path, detr_official, capsys):
    path, state = detr_official
    model = build_model(load_config("detr_r50_coco", SMALL))
    command = f"bev3d convert {path} --from detr --cfg detr_r50_coco --out {path.with_name(path.stem + '_bev3d.pth')}"
    with pytest.raises(Bev3dError, match=re.escape(command)):
        load_weights(model, path, "detr_r50_coco")
    mmdet3d = tmp_path / "petr.pth"
    torch.save({"state_dict": {"img_backbone.conv1.weight": torch.zeros(1), "pts_bbox_head.x": torch.zeros(1)}},
               mmdet3d)
    with pytest.raises(Bev3dError, match="--from (petr|FAMILY)"):
        load_weights(model, mmdet3d, "petr_r50_nus")
    unknown = tmp_path / "unknown.pth"
    torch.save({"foo": torch.zeros(1)}, unknown)
    with pytest.raises(Bev3dError, match="--from FAMILY .*one of .*deformable_detr, detr,"):
        load_weights(model, unknown, "detr_r50_coco")
    # the command line says the same, and stops before reading any data
    assert cli(["test", "--cfg", "detr_r50_coco", "--ckpt", str(path), "--opts", *SMALL]) == 2
    assert f"--cfg detr_r50_coco --opts {' '.join(SMALL)} --out" in capsys.readouterr().err


def test_model_weights_and_backbone_weights_from_a_converted_checkpoint(tmp_path, detr_official, caplog):
    path, _ = detr_official
    ckpt = tmp_path / "detr_bev3d.pth"
    state = convert_file(path, "detr", load_config("detr_r50_coco", SMALL), ckpt)
    model = build_model(load_config("detr_r50_coco", SMALL + [f"model.weights={ckpt}"]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(Bev3dError, match="must be converted first: bev3d convert .* --from detr"):
        build_model(load_config("detr_r50_coco", SMALL + [f"model.weights={path}"]))
    # another number of classes: an error that names the class head, or, when asked, a fresh head
    other = SMALL + ["model.head.num_classes=3", f"model.weights={ckpt}"]
    with pytest.raises(Bev3dError, match=r"2 of another shape .*class_embed.weight \(8, 64\) vs \(4, 64\).*"
                                         r"model.weights_skip_mismatched=true"):
        build_model(load_config("detr_r50_coco", other))
    fresh = build_model(load_config("detr_r50_coco", SMALL + ["model.head.num_classes=3"]))
    torch.manual_seed(0)
    fresh_head = build_model(load_config("detr_r50_coco", SMALL + ["model.head.num_classes=3"])).class_embed.weight
    torch.manual_seed(0)
    tuned = build_model(load_config("detr_r50_coco", other + ["model.weights_skip_mismatched=true"]))
    assert "class_embed.weight" in caplog.text and "class_embed.bias" in caplog.text
    assert torch.equal(tuned.class_embed.weight, fresh_head)
    assert torch.equal(tuned.query_embed.weight, state["query_embed.weight"])
    # a converted checkpoint's backbone, nothing else reported
    caplog.clear()
    backbone = build_model(load_config("detr_r50_coco", SMALL + [f"model.backbone.weights={ckpt}"])).backbone
    assert all(torch.equal(v, state["backbone." + k]) for k, v in backbone.state_dict().items())
    assert "unexpected" not in caplog.text
    assert not torch.equal(fresh.backbone.conv1.weight, backbone.conv1.weight)
