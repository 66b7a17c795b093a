"""Image backbones."""

import logging

from bev3d.errors import Bev3dError
from bev3d.models.backbones.dcn import ModulatedDeformConv2d
from bev3d.models.backbones.resnet import FrozenBatchNorm2d, ResNet
from bev3d.models.backbones.vovnet import VoVNet

MIN_LOADED = 0.9  # of the backbone's tensors a weights file must fill


def build_backbone(cfg):
    """BackboneConfig -> ResNet or VoVNet, with the weights of `cfg.weights` when set (an error unless >= 90%
    of its tensors load). Either has `out_channels`, the channels of its outputs, which the neck takes."""
    if cfg.type == "vovnet":
        if cfg.dcn_stages:
            raise Bev3dError("model.backbone.dcn_stages is a ResNet option; a VoVNet has no DCN: set it to [].")
        model = VoVNet(depth=cfg.depth, frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval,
                       out_indices=cfg.out_indices, with_cp=cfg.with_cp, frozen_bn=cfg.frozen_bn)
    else:
        model = ResNet(depth=cfg.depth, style=cfg.style, frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval,
                       out_indices=cfg.out_indices, with_cp=cfg.with_cp, frozen_bn=cfg.frozen_bn,
                       base_channels=cfg.base_channels, dcn_stages=cfg.dcn_stages)
    if cfg.weights:
        load_backbone_weights(model, cfg.weights)
    return model


def load_backbone_weights(model, path, min_fraction=MIN_LOADED):
    """Load `path` into `model`; a file that fills fewer than `min_fraction` of the model's tensors is another
    network (or another key layout) and raises, naming the first unmatched keys. Partial loads are logged."""
    missing, unexpected = model.load_weights(path)
    total = sum(1 for k in model.state_dict() if not k.endswith("num_batches_tracked"))
    loaded = total - len(missing)
    if loaded < min_fraction * total:
        raise Bev3dError(
            f"Backbone weights {path} fill only {loaded} of the backbone's {total} tensors. First missing keys: "
            f"{missing[:5]}; first keys of the file that fit nothing: {unexpected[:5]}. Give a torchvision, "
            f"MSRA-caffe or DETR-family checkpoint of the same network (model.backbone.depth), or convert an "
            f"official detector checkpoint with `bev3d convert`.")
    if missing or unexpected:
        logging.getLogger(__name__).warning(
            f"backbone weights {path}: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}")


__all__ = ["FrozenBatchNorm2d", "ModulatedDeformConv2d", "ResNet", "VoVNet", "build_backbone", "load_backbone_weights"]
