"""megvii-research/PETR (`--from petr`, mmdet3d 0.17 box code) and mmdet3d 1.x projects/PETR
(`--from petr_mmdet3d1`) checkpoints -> bev3d PETR. Both have the same keys; only the box code differs.

The official head lists one shared class/box branch pair once per decoder layer: copies 1..5 are checked
equal to copy 0 and dropped. `code_weights` (the loss's, model.loss.code_weights) is dropped.
"""

from bev3d.errors import Bev3dError
from bev3d.models.convert.mmdet3d import (HEAD, check_family, convert_branches, convert_layer, start_keymap,
                                          warn_unless)


def convert(source, cfg, model_state):
    """A megvii-research/PETR state dict -> bev3d's."""
    return convert_petr(source, cfg, model_state, "mmdet3d0.17", "petr")


def convert_mmdet3d1(source, cfg, model_state):
    """An mmdet3d 1.x projects/PETR state dict -> bev3d's."""
    return convert_petr(source, cfg, model_state, "mmdet3d1", "petr_mmdet3d1")


def convert_petr(source, cfg, model_state, boxes, family):
    check_family(source, family, f"{HEAD}position_encoder.0.weight", cfg, "petr", "petr_r50dcn_gridmask_p4_nus")
    h = cfg.model.head
    adapt = f"{HEAD}adapt_pos3d."
    # 3C/2 inputs: the sine over (camera, y, x) of with_multiview; C inputs: a per-camera 2D sine (bev3d's adapt_pos2d)
    multiview = adapt + "0.weight" in source and source[adapt + "0.weight"].shape[1] != h.embed_dims
    if multiview and not h.with_multiview:
        raise Bev3dError(f"The {family} checkpoint has the official multi-view position embedding (adapt_pos3d on "
                         f"{source[adapt + '0.weight'].shape[1]} channels): set model.head.with_multiview: true, as "
                         f"the released configs (petr_*_gridmask_*) do.")
    warn_unless(h.cell_point == "corner", f"{family}: the official frustum starts at the feature cells' corners; with "
                f"model.head.cell_point={h.cell_point!r} the outputs will differ (set it to 'corner').")
    km = start_keymap(source, family, cfg, model_state, ["code_weights"],
                      "the training loss's code weights (model.loss.code_weights)")
    for name in ("input_proj", "position_encoder", "reference_points", "query_embedding"):
        km.rename_prefix(f"{HEAD}{name}.", f"head.{name}.")
    km.rename_prefix(adapt, "head.adapt_pos3d." if multiview else "head.adapt_pos2d.")
    for i in range(h.num_decoder_layers):
        convert_layer(km, f"{HEAD}transformer.decoder.layers.{i}.", f"head.decoder.layers.{i}.", cross_attn=True)
    km.rename_prefix(f"{HEAD}transformer.decoder.post_norm.", "head.decoder.norm.")
    convert_branches(km, model_state, boxes)
    return km.finish(model_state)
