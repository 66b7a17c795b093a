"""Necks: multi-level features from backbone outputs."""

from bev3d.errors import Bev3dError
from bev3d.models.necks.channel_mapper import ChannelMapper
from bev3d.models.necks.fpn import FPN

NECKS = ("fpn", "channel_mapper")


def build_neck(cfg):
    """NeckConfig -> FPN or ChannelMapper (chosen by `cfg.type`)."""
    if cfg.type == "fpn":
        return FPN(cfg.in_channels, cfg.out_channels, cfg.start_level, cfg.num_outs, cfg.extra_on)
    if cfg.type == "channel_mapper":
        return ChannelMapper(cfg.in_channels, cfg.out_channels, cfg.num_outs, cfg.norm)
    raise Bev3dError(f"model.neck.type must be one of {NECKS}, got {cfg.type!r}.")


__all__ = ["FPN", "ChannelMapper", "build_neck"]
