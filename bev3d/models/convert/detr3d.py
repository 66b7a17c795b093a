"""WangYueFt/detr3d (`--from detr3d`, mmdet3d 0.17 box code) and mmdet3d 1.x projects/DETR3D
(`--from detr3d_mmdet3d1`) checkpoints -> bev3d DETR3D. Both have the same keys; the box code differs, and
so does the projection each was trained with (model.head.projection: unpadded / padded).

The sampling weights are per (camera, level) (model.head.attention_weights: camera_level). `code_weights`
(the loss's, model.loss.code_weights) is dropped.
"""

from bev3d.errors import Bev3dError
from bev3d.models.convert.mmdet3d import (HEAD, check_family, convert_branches, convert_layer, start_keymap,
                                          warn_unless)


def convert(source, cfg, model_state):
    """A WangYueFt/detr3d state dict -> bev3d's."""
    return convert_detr3d(source, cfg, model_state, "mmdet3d0.17", "detr3d", "unpadded")


def convert_mmdet3d1(source, cfg, model_state):
    """An mmdet3d 1.x projects/DETR3D state dict -> bev3d's."""
    return convert_detr3d(source, cfg, model_state, "mmdet3d1", "detr3d_mmdet3d1", "padded")


def convert_detr3d(source, cfg, model_state, boxes, family, projection):
    check_family(source, family, f"{HEAD}transformer.reference_points.weight", cfg, "detr3d",
                 "detr3d_r101dcn_gridmask_nus")
    h = cfg.model.head
    weights = f"{HEAD}transformer.decoder.layers.0.attentions.1.attention_weights.weight"
    if weights in source and h.attention_weights != "camera_level" and source[weights].shape[0] != h.num_levels:
        raise Bev3dError(f"The {family} checkpoint has {source[weights].shape[0]} sampling weights per query (per "
                         f"camera and level): set model.head.attention_weights: camera_level, as the released "
                         f"configs (detr3d_*_nus) do.")
    warn_unless(h.projection == projection, f"{family}: this checkpoint was trained with model.head.projection="
                f"{projection!r}; with {h.projection!r} the outputs will differ.")
    km = start_keymap(source, family, cfg, model_state, ["code_weights"],
                      "the training loss's code weights (model.loss.code_weights)")
    km.rename(f"{HEAD}query_embedding.weight", "head.query_embedding.weight")
    km.rename_prefix(f"{HEAD}transformer.reference_points.", "head.reference_points.")
    for i in range(h.num_decoder_layers):
        src, dst = f"{HEAD}transformer.decoder.layers.{i}.", f"head.layers.{i}."
        convert_layer(km, src, dst, cross_attn=False)
        # attention_weights, output_proj, position_encoder.{0,1,3,4}: bev3d's names
        km.rename_prefix(f"{src}attentions.1.", f"{dst}cross_attn.")
    convert_branches(km, model_state, boxes)
    return km.finish(model_state)
