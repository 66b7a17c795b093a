"""exiawsh/StreamPETR checkpoints (`--from streampetr`) -> bev3d StreamPETR.

The head's module names are bev3d's except the decoder (mmcv layers, as PETR's) and the token gate
(`featurized_pe.conv_reduce/conv_expand`). The official head lists its one class/box branch pair once per decoder
layer: copies 1..5 are checked equal to copy 0 and dropped. Dropped as well: the non-trainable copies of config
values (`code_weights`, `match_costs`, `pc_range`, `position_range`, `coords_d`) and the 2D auxiliary head
(`img_roi_head.*`, FocalHead: training only, not built by bev3d).
"""

from bev3d.errors import Bev3dError
from bev3d.models.convert.mmdet3d import (HEAD, check_family, convert_branches, convert_layer, start_keymap,
                                          warn_unless)

CONFIG_COPIES = ("code_weights", "match_costs", "pc_range", "position_range", "coords_d")


def convert(source, cfg, model_state):
    """An exiawsh/StreamPETR state dict -> bev3d's."""
    family = "streampetr"
    check_family(source, family, f"{HEAD}memory_embed.0.weight", cfg, "streampetr", "streampetr_r50_704x256_nus")
    h = cfg.model.head
    for option in ("query_content", "ray_bias"):
        if getattr(h, option):
            raise Bev3dError(f"The {family} checkpoint has no {option} (an option of bev3d's, not in the official "
                             f"StreamPETR): set model.head.{option}: false.")
    warn_unless(h.cell_point == "centre", f"{family}: the official frustum starts at the feature cells' centres; "
                f"with model.head.cell_point={h.cell_point!r} the outputs will differ (set it to 'centre').")
    warn_unless(not h.velocity_extrapolation, f"{family}: the official memory moves with the ego motion only; "
                f"model.head.velocity_extrapolation: true changes the outputs.")
    km = start_keymap(source, family, cfg, model_state, CONFIG_COPIES,
                      "a copy of a config value (model.loss.code_weights, model.pc_range, model.head.position_range, ...)")
    km.drop_matching(lambda k: k.startswith("img_roi_head."), "the 2D auxiliary head (training only, not built)")
    for name in ("memory_embed", "position_encoder", "spatial_alignment", "reference_points", "query_embedding",
                 "time_embedding", "ego_pose_pe", "ego_pose_memory"):
        km.rename_prefix(f"{HEAD}{name}.", f"head.{name}.")
    km.rename(f"{HEAD}pseudo_reference_points.weight", "head.pseudo_reference_points")
    for a, b in (("conv_reduce", "reduce"), ("conv_expand", "expand")):
        km.rename_prefix(f"{HEAD}featurized_pe.{a}.", f"head.featurized_pe.{b}.")
    for i in range(h.num_decoder_layers):
        convert_layer(km, f"{HEAD}transformer.decoder.layers.{i}.", f"head.decoder.layers.{i}.", cross_attn=True)
    km.rename_prefix(f"{HEAD}transformer.decoder.post_norm.", "head.decoder.norm.")
    convert_branches(km, model_state, "streampetr")
    return km.finish(model_state)
