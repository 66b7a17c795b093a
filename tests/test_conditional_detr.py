"""Conditional DETR against Hugging Face transformers' ConditionalDetrForObjectDetection (an independent
implementation, randomly initialised from a config: nothing is downloaded): its weights, written in the
official checkpoint layout, go through `bev3d convert --from conditional_detr` and both models must agree."""

import pytest
import torch

from bev3d.config import load_config
from bev3d.errors import Bev3dError
from bev3d.models import build_model
from bev3d.models.convert import convert_state_dict, read_official

transformers = pytest.importorskip("transformers")

D, HEADS, FFN, ENC, DEC, QUERIES, CLASSES = 64, 4, 96, 2, 3, 7, 5
OPTS = [f"model.head.embed_dims={D}", f"model.head.num_heads={HEADS}", f"model.head.ffn_dims={FFN}",
        f"model.head.num_encoder_layers={ENC}", f"model.head.num_decoder_layers={DEC}",
        f"model.head.num_queries={QUERIES}", f"model.head.num_classes={CLASSES}", "model.backbone.frozen_bn=true",
        "model.backbone.norm_eval=true"]


def _hf_model():
    backbone = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                         depths=[2, 2, 2, 2], layer_type="basic", out_features=["stage4"])
    config = transformers.ConditionalDetrConfig(
        backbone_config=backbone, num_queries=QUERIES, d_model=D, encoder_layers=ENC, decoder_layers=DEC,
        encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
        num_labels=CLASSES, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, auxiliary_loss=False)
    model = transformers.ConditionalDetrForObjectDetection(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor random, so that a tensor put in the wrong place shows
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g) * 0.2
            t.copy_(t.abs() + 0.5 if name.endswith("running_var") else t + noise)
    return model


def _official_layout(hf_state):
    """transformers' names -> the Atten4Vis/ConditionalDETR checkpoint's (backbone in torchvision names)."""
    out = {}
    for k, v in hf_state.items():
        k = k.replace("model.backbone.model.", "backbone.0.body.")
        k = k.replace("embedder.embedder.convolution", "conv1").replace("embedder.embedder.normalization", "bn1")
        if ".stages." in k:
            _, rest = k.split("encoder.stages.")
            stage, _, block, *tail = rest.split(".")
            tail = ".".join(tail)
            tail = tail.replace("shortcut.convolution", "downsample.0")
            tail = tail.replace("shortcut.normalization", "downsample.1")
            for c in range(3):
                tail = tail.replace(f"layer.{c}.convolution", f"conv{c + 1}")
                tail = tail.replace(f"layer.{c}.normalization", f"bn{c + 1}")
            k = f"backbone.0.body.layer{int(stage) + 1}.{block}.{tail}"
        k = k.replace("model.input_projection.", "input_proj.")
        k = k.replace("model.query_position_embeddings.", "query_embed.")
        k = k.replace("class_labels_classifier.", "class_embed.").replace("bbox_predictor.", "bbox_embed.")
        k = k.replace("model.decoder.layernorm.", "transformer.decoder.norm.")
        k = k.replace("model.encoder.", "transformer.encoder.").replace("model.decoder.", "transformer.decoder.")
        k = k.replace("mlp.fc1", "linear1").replace("mlp.fc2", "linear2")
        if ".encoder.layers." in k:
            k = k.replace("self_attn_layer_norm", "norm1").replace("final_layer_norm", "norm2")
            k = k.replace("self_attn.o_proj", "self_attn.out_proj")
        else:
            k = k.replace("self_attn_layer_norm", "norm1").replace("encoder_attn_layer_norm", "norm2")
            k = k.replace("final_layer_norm", "norm3")
            for part in ("q_content", "q_pos", "k_content", "k_pos", "v", "q_pos_sine"):
                k = k.replace(f"self_attn.{part}_proj", f"sa_{part.replace('_', '')}_proj")
                k = k.replace(f"encoder_attn.{part}_proj", f"ca_{part.replace('_', '')}_proj")
            k = k.replace("ca_qpossine_proj", "ca_qpos_sine_proj")
            k = k.replace("self_attn.o_proj", "self_attn.out_proj")
            k = k.replace("encoder_attn.o_proj", "cross_attn.out_proj")
        out[k] = v.clone()
    for i in range(ENC):  # the official encoder uses nn.MultiheadAttention's packed projection
        p = f"transformer.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            out[f"{p}in_proj_{kind}"] = torch.cat([out.pop(f"{p}{n}_proj.{kind}") for n in "qkv"])
    return out


def _batch():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True  # image 1 is 64x96, padded
    mask[1, :, 96:] = True
    img[1][:, mask[1]] = 0.0
    return img, mask


def test_matches_transformers_through_the_converter(tmp_path):
    hf = _hf_model()
    path = tmp_path / "conditional_detr_official.pth"
    torch.save({"model": _official_layout(hf.state_dict())}, path)
    cfg = load_config("conditional_detr_tiny_shapes", OPTS)
    model = build_model(cfg).eval()
    model.load_state_dict(convert_state_dict(read_official(path), "conditional_detr", cfg))

    img, mask = _batch()
    hf, model = hf.double(), model.double()
    with torch.no_grad():
        expected = hf(pixel_values=img.double(), pixel_mask=(~mask).long())
        out = model({"img": img.double(), "mask": mask})
    assert out.logits.shape == (DEC, 2, QUERIES, CLASSES)
    torch.testing.assert_close(out.logits[-1], expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.boxes[-1], expected.pred_boxes, atol=1e-5, rtol=0)
    # the padding matters: the same image unpadded gives other outputs
    with torch.no_grad():
        unmasked = model({"img": img.double(), "mask": torch.zeros_like(mask)})
    assert (unmasked.logits[-1, 1] - out.logits[-1, 1]).abs().max() > 1e-3


def test_converter_names_a_missing_tensor(tmp_path):
    state = _official_layout(_hf_model().state_dict())
    del state["transformer.decoder.layers.0.ca_qpos_proj.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    cfg = load_config("conditional_detr_tiny_shapes", OPTS)
    with pytest.raises(Bev3dError, match="ca_qpos_proj"):
        convert_state_dict(read_official(path), "conditional_detr", cfg)
