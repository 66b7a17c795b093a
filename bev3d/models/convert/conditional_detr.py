"""Atten4Vis/ConditionalDETR -> bev3d Conditional DETR (`bev3d convert --from conditional_detr`).

bev3d keeps the official decoder names (`sa_*_proj`, `ca_*_proj`, `query_scale`, `ref_point_head`); what differs
is what differs for DETR: the backbone and input projection wrappers, the encoder's packed `in_proj_*`, and the
FFN's LayerNorm (`norm2` of an encoder layer, `norm3` of a decoder layer) living in `ffn.norm`.
"""

from bev3d.errors import Bev3dError
from bev3d.models.convert.common import KeyMap
from bev3d.models.convert.detr import convert_encoder, convert_ffn

DECODER_PROJECTIONS = ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                       "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj",
                       "self_attn.out_proj", "cross_attn.out_proj", "norm1", "norm2")


def convert(source, cfg, model_state):
    if cfg.model.type != "conditional_detr":
        raise Bev3dError(f"--from conditional_detr converts to a Conditional DETR config (model.type: "
                         f"conditional_detr, e.g. conditional_detr_r50_coco), but the config has model.type "
                         f"{cfg.model.type!r}.")
    h = cfg.model.head
    km = KeyMap(source, "conditional_detr")
    convert_encoder(km, h.num_encoder_layers)
    for i in range(h.num_decoder_layers):
        p = f"transformer.decoder.layers.{i}."
        for name in DECODER_PROJECTIONS + (("ca_qpos_proj",) if i == 0 else ()):  # only the first layer has it
            km.rename_prefix(f"{p}{name}.", f"{p}{name}.")
        convert_ffn(km, p, p, "norm3")
    for name in ("transformer.decoder.norm.", "transformer.decoder.query_scale.", "transformer.decoder.ref_point_head.",
                 "query_embed.", "class_embed.", "bbox_embed."):
        km.rename_prefix(name, name)
    return km.finish(model_state)
