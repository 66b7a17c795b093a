"""What the mmdet3d-based families (PETR, DETR3D) share: the detector's prefixes and a family check, the
mmdet ResNet / VoVNetCP backbone, the mmdet FPN / CPFPN neck, mmcv's decoder layer, and the box-code rows of
the last regression Linear.

Box codes (docs/models.md, "Official checkpoints"): mmdet3d 0.17 (megvii PETR, WangYueFt DETR3D) predicts
(cx, cy, log w, log l, cz, log h, sin yaw', cos yaw', vx, vy) with yaw' = -yaw - pi/2 of the devkit's yaw;
mmdet3d 1.x predicts (cx, cy, log l, log w, cz, log h, sin yaw, cos yaw, vx, vy) with the devkit's yaw;
StreamPETR (mmdet3d 1.0 boxes, its own normalize_bbox) predicts (cx, cy, cz, log l, log w, log h, sin yaw,
cos yaw, vx, vy) with the devkit's yaw.
"""

import logging
import re

from bev3d.errors import Bev3dError
from bev3d.models.convert.common import KeyMap

BACKBONE, NECK, HEAD = "img_backbone.", "img_neck.", "pts_bbox_head."
BOX_LAYOUTS = ("mmdet3d0.17", "mmdet3d1", "streampetr")

log = logging.getLogger(__name__)


def check_family(source, family, signature, cfg, model_type, example_cfg):
    """A Bev3dError for a config of another model, or a file without the family's `signature` key."""
    if cfg.model.type != model_type:
        raise Bev3dError(f"--from {family} converts to a {model_type} model, but the config is a {cfg.model.type} "
                         f"one (model.type): use a {model_type} config, e.g. --cfg {example_cfg}.")
    if signature not in source:
        raise Bev3dError(f"The checkpoint is not a {family} checkpoint: it has no {signature!r}.")


def warn_unless(ok, message):
    """Options that change outputs, not keys: the conversion goes on, with a warning."""
    if not ok:
        log.warning(message)


def convert_backbone(km, cfg):
    """img_backbone.* -> backbone.*: mmdet's ResNet (DCNv2 as mmcv's `conv2.conv_offset`) and VoVNetCP already
    have bev3d's keys; BatchNorm's step counters are dropped."""
    if not cfg.model.backbone.dcn_stages and any(k.startswith(BACKBONE) and ".conv_offset." in k for k in km.source):
        raise Bev3dError("The checkpoint's backbone has DCNv2 (conv2.conv_offset tensors), the config's has none: set "
                         "model.backbone.dcn_stages: [2, 3], as the released configs do.")
    km.drop_matching(lambda k: k.startswith(BACKBONE) and k.endswith(".num_batches_tracked"), "BatchNorm step counter")
    if not km.rename_prefix(BACKBONE, "backbone."):
        raise Bev3dError(f"The {km.family} checkpoint has no backbone tensors ({BACKBONE}*): it is a head-only file, "
                         f"which `bev3d convert` does not read.")


def convert_neck(km, model_state):
    """img_neck.{lateral,fpn}_convs.i.conv.* (mmdet ConvModules) -> neck.{lateral,fpn}_convs.i.*; mmdet FPN's extra
    levels, fpn_convs.i for i >= the number of inputs, are bev3d's extra_convs.(i - inputs)."""
    num_ins = sum(1 for k in model_state if re.fullmatch(r"neck\.lateral_convs\.\d+\.weight", k))
    for k in [k for k in km.source if k.startswith(NECK) and k not in km.used]:
        m = re.fullmatch(rf"{re.escape(NECK)}(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)", k)
        if m is None:
            continue  # fits nothing: finish() names it
        kind, i, kind_of_tensor = m.group(1), int(m.group(2)), m.group(3)
        if kind == "fpn_convs" and i >= num_ins:
            km.rename(k, f"neck.extra_convs.{i - num_ins}.{kind_of_tensor}")
        else:
            km.rename(k, f"neck.{kind}.{i}.{kind_of_tensor}")


def start_keymap(source, family, cfg, model_state, config_copies, why):
    """The KeyMap of a PETR-family checkpoint with its backbone and neck mapped and the head's copies of config
    values (`config_copies`, names under pts_bbox_head.) dropped as `why`."""
    km = KeyMap(source, family)
    convert_backbone(km, cfg)
    convert_neck(km, model_state)
    km.drop([f"{HEAD}{k}" for k in config_copies if km.has(f"{HEAD}{k}")], why)
    return km


def convert_layer(km, src, dst, cross_attn):
    """mmcv's BaseTransformerLayer (self_attn, norm, cross_attn, norm, ffn, norm) -> bev3d's post-norm decoder
    layer; `cross_attn` False leaves attentions.1 (not an nn.MultiheadAttention) to the caller."""
    km.split_in_proj(f"{src}attentions.0.attn.", f"{dst}self_attn.")
    if cross_attn:
        km.split_in_proj(f"{src}attentions.1.attn.", f"{dst}cross_attn.")
    for a, b in (("norms.0", "norm1"), ("norms.1", "norm2"), ("norms.2", "ffn.norm"),
                 ("ffns.0.layers.0.0", "ffn.linear1"), ("ffns.0.layers.1", "ffn.linear2")):
        for kind in ("weight", "bias"):
            km.rename(f"{src}{a}.{kind}", f"{dst}{b}.{kind}")


def box_rows(tensor, layout):
    """The last box Linear's weight (10, C) or bias (10,), rows in `layout`'s box code -> bev3d's
    (cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy)."""
    out = tensor.clone()
    if layout == "mmdet3d0.17":  # yaw = -yaw' - pi/2: sin yaw = -cos yaw', cos yaw = -sin yaw'; sizes are w, l
        out[6], out[7] = -tensor[7], -tensor[6]
    elif layout == "mmdet3d1":  # the devkit's yaw; sizes in (l, w) order
        out[2], out[3] = tensor[3], tensor[2]
    elif layout == "streampetr":  # the devkit's yaw; the centre first, then sizes in (l, w, h) order
        out[2], out[3], out[4] = tensor[4], tensor[3], tensor[2]
    else:
        raise ValueError(f"box layout must be one of {BOX_LAYOUTS}, got {layout!r}")
    return out


def convert_branches(km, model_state, layout):
    """cls_branches.j, reg_branches.j -> head.branches.*, the box rows into bev3d's code (box_rows). A model with
    one shared pair takes copy 0; the other copies (one module listed per layer) must equal it and are dropped."""
    count = sum(1 for k in model_state if re.fullmatch(r"head\.branches\.cls_branches\.\d+\.0\.weight", k))
    for j in range(count):
        km.rename_prefix(f"{HEAD}cls_branches.{j}.", f"head.branches.cls_branches.{j}.")
        prefix = f"head.branches.reg_branches.{j}."
        last = max(int(k[len(prefix):].split(".")[0]) for k in model_state if k.startswith(prefix))
        last = f"reg_branches.{j}.{last}."  # the box Linear (Linear, ReLU, Linear, ReLU, Linear)
        for kind in ("weight", "bias"):
            km.put(f"head.branches.{last}{kind}", box_rows(km.take(f"{HEAD}{last}{kind}"), layout))
        km.rename_prefix(f"{HEAD}reg_branches.{j}.", f"head.branches.reg_branches.{j}.")
    if count == 1:
        copies = sum(1 for k in km.source if re.fullmatch(rf"{re.escape(HEAD)}cls_branches\.\d+\.0\.weight", k))
        for j in range(1, copies):
            for name in ("cls_branches", "reg_branches"):
                km.drop_copies(f"{HEAD}{name}.{j}.", f"{HEAD}{name}.0.")

