"""The model table: `model.type` -> the head's config dataclass, the module that builds the model, its boxes.

A new model is one module with `build(cfg) -> nn.Module` (a model whose forward returns SetPredictions),
one HeadConfig subclass below and one line in MODELS. The criterion and the post-processor come from the
core (bev3d.models.core.build) for the box kind the entry names. This module imports no torch, so that
loading a config stays light.
"""

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class HeadConfig:
    """What every set-prediction head has."""

    num_queries: int = 100
    num_classes: int = 10
    embed_dims: int = 256
    num_heads: int = 8
    num_decoder_layers: int = 6
    ffn_dims: int = 2048
    dropout: float = 0.1


@dataclass
class DETRHeadConfig(HeadConfig):
    num_classes: int = 91
    num_encoder_layers: int = 6
    position_encoding: str = field(default="sine", metadata={"choices": ("sine", "learned")})


@dataclass
class DeformableDETRHeadConfig(HeadConfig):
    num_queries: int = 300
    num_classes: int = 91
    num_encoder_layers: int = 6
    ffn_dims: int = 1024
    num_levels: int = 4
    num_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False  # queries = top num_queries encoder proposals
    attn_backend: str = field(default="auto", metadata={"choices": ("auto", "reference", "cpu", "cuda")})


@dataclass
class PETRHeadConfig(HeadConfig):
    num_queries: int = 900
    in_level: int = 0  # which neck output the head attends to
    depth_num: int = 64
    depth_start: float = 1.0
    position_range: list[float] = field(default_factory=lambda: [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0])
    with_2d_pe: bool = True
    query_content: bool = False  # learned per-query decoder content instead of zeros (helps from-scratch training)
    ray_bias: bool = False  # cross-attention prior from the angle between cell rays and query anchors (not official)
    with_box_refine: bool = False  # each layer's predicted centres anchor the next layer (not official PETR)


@dataclass
class DETR3DHeadConfig(HeadConfig):
    num_queries: int = 900
    ffn_dims: int = 512
    num_levels: int = 4
    with_box_refine: bool = True
    # ms_deform_attn is faster (tools/bench_heads.py); both compute the same sum
    sampler: str = field(default="ms_deform_attn", metadata={"choices": ("ms_deform_attn", "grid_sample")})


class Model(NamedTuple):
    config: type  # the HeadConfig subclass that `model.head` is read into
    module: str  # the module whose build(cfg) builds the model
    boxes: str  # "2d" (normalised cxcywh) or "3d" (the 10-d box code): the core's box coder


MODELS = {
    "detr": Model(DETRHeadConfig, "bev3d.models.detr", "2d"),
    "deformable_detr": Model(DeformableDETRHeadConfig, "bev3d.models.deformable_detr", "2d"),
    "petr": Model(PETRHeadConfig, "bev3d.models.heads.petr", "3d"),
    "detr3d": Model(DETR3DHeadConfig, "bev3d.models.heads.detr3d", "3d"),
}
