"""fundamentalvision/Deformable-DETR -> bev3d Deformable DETR (`bev3d convert --from deformable_detr`): the base,
`--with_box_refine` and `--with_box_refine --two_stage` checkpoints (r50_deformable_detr*-checkpoint.pth).

Besides DETR's renames: the original numbers the decoder's LayerNorms in another order (its `norm1` follows the
cross-attention, `norm2` the self-attention), and it holds some prediction heads under two names
(`transformer.decoder.bbox_embed` with refinement, `transformer.decoder.class_embed` with two stages, and one
shared head six times without refinement): those copies are checked equal and dropped.
"""

from bev3d.errors import Bev3dError
from bev3d.models.convert.common import KeyMap
from bev3d.models.convert.detr import convert_backbone, convert_ffn


def convert(source, cfg, model_state):
    m, h = cfg.model, cfg.model.head
    if m.type != "deformable_detr":
        raise Bev3dError(f"--from deformable_detr converts to a Deformable DETR config (model.type: deformable_detr, "
                         f"e.g. deformable_detr_r50_coco), but the config has model.type {m.type!r}.")
    km = KeyMap(source, "deformable_detr")
    convert_backbone(km)
    inputs = len(m.backbone.out_indices)
    for i in range(h.num_levels):  # input_proj: one 1x1 conv + GN per backbone level, then 3x3 stride-2 extras
        km.rename_prefix(f"input_proj.{i}.", f"neck.convs.{i}." if i < inputs else f"neck.extra_convs.{i - inputs}.")
    km.rename("transformer.level_embed", "transformer.level_embed")
    for i in range(h.num_encoder_layers):
        p = f"transformer.encoder.layers.{i}."
        km.rename_prefix(p + "self_attn.", p + "self_attn.")
        km.rename_prefix(p + "norm1.", p + "norm.")
        convert_ffn(km, p, p, "norm2")
    for i in range(h.num_decoder_layers):
        p = f"transformer.decoder.layers.{i}."
        km.rename_prefix(p + "cross_attn.", p + "cross_attn.")
        km.split_in_proj(p + "self_attn.", p + "self_attn.")
        km.rename_prefix(p + "norm2.", p + "norm1.")  # after the self-attention
        km.rename_prefix(p + "norm1.", p + "norm2.")  # after the cross-attention
        convert_ffn(km, p, p, "norm3")
    if h.two_stage:
        for name in ("enc_output.", "enc_output_norm.", "pos_trans.", "pos_trans_norm."):
            km.rename_prefix("transformer." + name, "transformer." + name)
    else:
        km.rename_prefix("transformer.reference_points.", "transformer.reference_points.")
        km.rename_prefix("query_embed.", "query_embed.")
    _convert_heads(km, h)
    return km.finish(model_state)


def _convert_heads(km, h):
    """class_embed.i / bbox_embed.i for i < num_pred (with two stages the last pair scores the encoder proposals),
    under every name the model holds them, and the original's second names dropped as copies."""
    L = h.num_decoder_layers
    num_pred = L + int(h.two_stage)
    for name in ("class_embed", "bbox_embed"):
        names = [[f"{name}.{i}."] for i in range(num_pred)]  # the model's names of head i
        if name == "bbox_embed" and h.with_box_refine:
            for i in range(num_pred):
                names[i].append(f"transformer.decoder.bbox_embed.{i}.")
        if h.two_stage:
            names[L].append(f"transformer.enc_{name}.")
        if h.with_box_refine:
            for i in range(num_pred):
                km.rename_prefix(f"{name}.{i}.", *names[i])
        else:  # one head shared by every layer
            km.rename_prefix(f"{name}.0.", *[n for head in names for n in head])
            for i in range(1, num_pred):
                km.drop_copies(f"{name}.{i}.", f"{name}.0.")
    for i in range(num_pred):  # the original decoder reaches the heads through these
        if h.with_box_refine:
            km.drop_copies(f"transformer.decoder.bbox_embed.{i}.", f"bbox_embed.{i}.")
        if h.two_stage:
            km.drop_copies(f"transformer.decoder.class_embed.{i}.", f"class_embed.{i}.")
