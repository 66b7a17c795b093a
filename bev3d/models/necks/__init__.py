"""Necks: multi-level features from backbone outputs."""

from bev3d.errors import Bev3dError
from bev3d.models.necks.channel_mapper import ChannelMapper
from bev3d.models.necks.fpn import FPN

NECKS = ("fpn", "channel_mapper")


def build_neck(cfg, in_channels):
    """NeckConfig and the backbone's output channels (in output order) -> FPN or ChannelMapper (`cfg.type`)."""
    in_channels = list(in_channels)
    if cfg.type == "fpn":
        return FPN(in_channels, cfg.out_channels, cfg.start_level, cfg.num_outs, cfg.extra_on, cfg.output_convs)
    if cfg.type == "channel_mapper":
        return ChannelMapper(in_channels, cfg.out_channels, cfg.num_outs, cfg.norm)
    raise Bev3dError(f"model.neck.type must be one of {NECKS}, got {cfg.type!r}.")


__all__ = ["FPN", "ChannelMapper", "build_neck"]
