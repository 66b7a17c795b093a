"""facebookresearch/detr -> bev3d DETR (`bev3d convert --from detr`), e.g. detr-r50-e632da11.pth.

The tensors are the same; the names differ in the wrappers (`backbone.0.body.`, `input_proj`), in the packed
attention projections (`in_proj_*` -> `q_proj`, `k_proj`, `v_proj`) and in where the post-norm LayerNorms
live (the FFN's is `ffn.norm` here).
"""

from bev3d.errors import Bev3dError
from bev3d.models.convert.common import KeyMap

BACKBONE = "backbone.0.body."  # Joiner(backbone, position encoding)[0], torchvision's IntermediateLayerGetter


def convert_backbone(km):
    """DETR-family backbone: backbone.0.body.* (torchvision ResNet names) -> backbone.*."""
    km.drop_matching(lambda k: k.startswith(BACKBONE) and k.endswith(".num_batches_tracked"),
                     "BatchNorm step counter: not a weight")
    if not km.rename_prefix(BACKBONE, "backbone."):
        raise Bev3dError(f"The {km.family} checkpoint has no backbone tensors ({BACKBONE}*): it is not a "
                         f"{km.family} checkpoint, or a layout this converter does not know.")


def convert_ffn(km, src, dst, norm):
    """linear1, linear2 and the LayerNorm after them (`norm`, e.g. "norm2") -> FFN `ffn.*`."""
    for name in ("linear1", "linear2"):
        km.rename_prefix(f"{src}{name}.", f"{dst}ffn.{name}.")
    km.rename_prefix(f"{src}{norm}.", f"{dst}ffn.norm.")


def convert_encoder(km, num_layers):
    """DETR's backbone, position encoding, input projection and encoder (shared by Conditional DETR)."""
    convert_backbone(km)
    km.rename_prefix("backbone.1.", "position_encoding.")  # learned encoding (row/col_embed); the sine has none
    km.rename_prefix("input_proj.", "neck.convs.0.0.")
    for i in range(num_layers):
        p = f"transformer.encoder.layers.{i}."
        km.split_in_proj(p + "self_attn.", p + "self_attn.")
        km.rename_prefix(p + "norm1.", p + "norm.")
        convert_ffn(km, p, p, "norm2")


def convert(source, cfg, model_state):
    if cfg.model.type != "detr":
        raise Bev3dError(f"--from detr converts to a DETR config (model.type: detr, e.g. detr_r50_coco), but the "
                         f"config has model.type {cfg.model.type!r}.")
    h = cfg.model.head
    km = KeyMap(source, "detr")
    convert_encoder(km, h.num_encoder_layers)
    for i in range(h.num_decoder_layers):
        p = f"transformer.decoder.layers.{i}."
        km.split_in_proj(p + "self_attn.", p + "self_attn.")
        km.split_in_proj(p + "multihead_attn.", p + "cross_attn.")
        for norm in ("norm1.", "norm2."):
            km.rename_prefix(p + norm, p + norm)
        convert_ffn(km, p, p, "norm3")
    for name in ("transformer.decoder.norm.", "query_embed.", "class_embed.", "bbox_embed."):
        km.rename_prefix(name, name)
    return km.finish(model_state)
