"""PeizeSun/SparseR-CNN (Detectron2) -> bev3d Sparse R-CNN (`bev3d convert --from sparse_rcnn`), e.g. the released
r50_100pro_3x_model.pth (`{"model": ...}`).

Layout of the official keys (projects/SparseRCNN/sparsercnn/{detector,head}.py and Detectron2's ResNet-FPN):
`backbone.bottom_up.stem.conv1` (+ `.norm`, a FrozenBN), `backbone.bottom_up.res{2..5}.{b}.conv{1,2,3}` (+ `.norm`)
and `.shortcut` (+ `.norm`), `backbone.fpn_lateral{2..5}`, `backbone.fpn_output{2..5}`, `init_proposal_features`,
`init_proposal_boxes`, and per stage `head.head_series.{i}.`: `self_attn` (nn.MultiheadAttention, packed),
`inst_interact.{dynamic_layer, norm1, norm2, out_layer, norm3}`, `linear1`, `linear2`, `norm1..3`,
`cls_module.{0,1}`, `reg_module.{0..7}`, `class_logits`, `bboxes_delta`. The official classes are COCO's 80 in
Detectron2's contiguous order; a config with 91 classes (COCO category ids as labels, bev3d's convention) gets
each row at its category id, and the 11 ids COCO does not use a bias that never scores.
"""

import torch

from bev3d.errors import Bev3dError
from bev3d.models.convert.common import KeyMap

# COCO category ids in Detectron2's contiguous order (sorted): contiguous class i is category COCO_IDS[i]
COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
            *range(84, 91)]
NEVER = -100.0  # logit of a category the official model has no output for: sigmoid ~ 4e-44
BOTTOM_UP = "backbone.bottom_up."


def convert_backbone(km, depth_blocks):
    """Detectron2 ResNet (stem, res2..res5, conv/norm pairs, shortcut) -> torchvision names under backbone.*."""
    km.rename_prefix(BOTTOM_UP + "stem.conv1.norm.", "backbone.bn1.")
    km.rename(BOTTOM_UP + "stem.conv1.weight", "backbone.conv1.weight")
    for stage, blocks in enumerate(depth_blocks):
        for b in range(blocks):
            src, dst = f"{BOTTOM_UP}res{stage + 2}.{b}.", f"backbone.layer{stage + 1}.{b}."
            for k in (1, 2, 3):
                km.rename_prefix(f"{src}conv{k}.norm.", f"{dst}bn{k}.")
                km.rename(f"{src}conv{k}.weight", f"{dst}conv{k}.weight")
            if b == 0:
                km.rename_prefix(src + "shortcut.norm.", dst + "downsample.1.")
                km.rename(src + "shortcut.weight", dst + "downsample.0.weight")


def convert_classes(km, src, dst, num_classes):
    """The official (80, C) class layer -> (num_classes, C): as it is, or scattered to COCO category ids."""
    weight, bias = km.take(src + "weight"), km.take(src + "bias")
    if num_classes == len(weight):
        km.put(dst + "weight", weight)
        km.put(dst + "bias", bias)
        return
    if num_classes != 91 or len(weight) != len(COCO_IDS):
        raise Bev3dError(f"The checkpoint has {len(weight)} classes; set model.head.num_classes to {len(weight)} "
                         f"(its own order) or, for COCO's 80, to 91 (category ids as labels).")
    ids = torch.tensor(COCO_IDS)
    km.put(dst + "weight", weight.new_zeros(num_classes, weight.shape[1]).index_copy(0, ids, weight))
    km.put(dst + "bias", bias.new_full((num_classes,), NEVER).index_copy(0, ids, bias))


def convert(source, cfg, model_state):
    m, h = cfg.model, cfg.model.head
    if m.type != "sparse_rcnn":
        raise Bev3dError(f"--from sparse_rcnn converts to a Sparse R-CNN config (model.type: sparse_rcnn, e.g. "
                         f"sparse_rcnn_r50_coco), but the config has model.type {m.type!r}.")
    from bev3d.models.backbones.resnet import ARCH

    if m.backbone.type != "resnet" or ARCH[m.backbone.depth][0] != "bottleneck":
        raise Bev3dError("The official Sparse R-CNN checkpoints are ResNet-50/101: set model.backbone.depth: 50 or "
                         "101.")
    km = KeyMap(source, "sparse_rcnn")
    convert_backbone(km, ARCH[m.backbone.depth][1])
    for level in range(m.neck.num_outs):
        km.rename_prefix(f"backbone.fpn_lateral{level + 2}.", f"neck.lateral_convs.{level}.")
        km.rename_prefix(f"backbone.fpn_output{level + 2}.", f"neck.fpn_convs.{level}.")
    km.rename_prefix("init_proposal_features.", "init_proposal_features.")
    km.rename_prefix("init_proposal_boxes.", "init_proposal_boxes.")
    for i in range(h.num_decoder_layers):
        src, dst = f"head.head_series.{i}.", f"stages.{i}."
        km.split_in_proj(src + "self_attn.", dst + "self_attn.")
        for a, b in (("inst_interact.dynamic_layer.", "interact.dynamic_layer."),
                     ("inst_interact.norm1.", "interact.norms.0."), ("inst_interact.norm2.", "interact.norms.1."),
                     ("inst_interact.out_layer.", "interact.out_layer."), ("inst_interact.norm3.", "interact.out_norm."),
                     ("norm1.", "norm1."), ("norm2.", "norm2."), ("linear1.", "ffn.linear1."),
                     ("linear2.", "ffn.linear2."), ("norm3.", "ffn.norm."), ("cls_module.", "cls_branch."),
                     ("reg_module.", "reg_branch."), ("bboxes_delta.", "bbox_delta.")):
            if not km.rename_prefix(src + a, dst + b):
                raise Bev3dError(f"The sparse_rcnn checkpoint has no {src + a}* tensors: it is not a Sparse R-CNN "
                                 f"checkpoint with model.head.num_decoder_layers={h.num_decoder_layers} stages.")
        convert_classes(km, src + "class_logits.", dst + "class_logits.", h.num_classes)
    return km.finish(model_state)
