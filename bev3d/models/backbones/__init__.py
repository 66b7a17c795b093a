"""Image backbones."""

import logging

from bev3d.models.backbones.resnet import FrozenBatchNorm2d, ResNet


def build_backbone(cfg):
    """BackboneConfig -> ResNet (weights loaded from `cfg.weights` when set; key mismatches logged)."""
    model = ResNet(depth=cfg.depth, style=cfg.style, frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval,
                   out_indices=cfg.out_indices, with_cp=cfg.with_cp, frozen_bn=cfg.frozen_bn,
                   base_channels=cfg.base_channels)
    if cfg.weights:
        missing, unexpected = model.load_weights(cfg.weights)
        if missing or unexpected:
            logging.getLogger(__name__).warning(
                f"backbone weights {cfg.weights}: {len(missing)} missing keys {missing[:8]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:8]}")
    return model


__all__ = ["FrozenBatchNorm2d", "ResNet", "build_backbone"]
