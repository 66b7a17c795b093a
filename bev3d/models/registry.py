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

    def camera_maps(self):
        """Whether the head predicts per-camera training maps (a rig head's depth_supervision / heatmap_supervision):
        its training set then carries what each camera sees, its criterion the maps' losses."""
        return getattr(self, "depth_supervision", False) or getattr(self, "heatmap_supervision", False)


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
    # two-stage: the proposals are the top-k over all positions (the official code; padded and border positions,
    # whose proposal is the box (1, 1, 1, 1), may be chosen) or over the valid positions only
    two_stage_topk: str = field(default="all", metadata={"choices": ("all", "valid")})
    attn_backend: str = field(default="auto", metadata={"choices": ("auto", "reference", "cpu", "cuda")})


@dataclass
class ConditionalDETRHeadConfig(HeadConfig):
    num_queries: int = 300
    num_classes: int = 91
    num_encoder_layers: int = 6
    position_encoding: str = field(default="sine", metadata={"choices": ("sine", "learned")})


@dataclass
class AnchorDETRHeadConfig(HeadConfig):
    num_queries: int = 900  # anchor points x patterns
    num_classes: int = 91
    num_encoder_layers: int = 6
    ffn_dims: int = 1024
    dropout: float = 0.0
    num_patterns: int = 3  # queries per anchor point
    anchors: str = field(default="learned", metadata={"choices": ("learned", "grid")})
    # row-column decoupled attention in the encoder and the decoder's cross-attention, or standard attention
    attention: str = field(default="rcda", metadata={"choices": ("rcda", "standard")})


@dataclass
class EfficientDETRHeadConfig(HeadConfig):
    num_queries: int = 100  # top-k dense proposals that become the sparse part's queries
    num_classes: int = 91
    num_encoder_layers: int = 3
    num_decoder_layers: int = 1  # 6: the cascade (each layer refines the previous layer's boxes)
    ffn_dims: int = 1024
    num_levels: int = 4
    num_points: int = 4
    attn_backend: str = field(default="auto", metadata={"choices": ("auto", "reference", "cpu", "cuda")})


@dataclass
class SparseRCNNHeadConfig(HeadConfig):
    num_queries: int = 100  # learned proposal boxes and features
    num_classes: int = 91
    dropout: float = 0.0
    # num_decoder_layers: the iterative stages
    dynamic_dims: int = 64  # inner width of the dynamic instance interaction (C -> d -> C)
    roi_size: int = 7
    sampling_ratio: int = 2  # RoIAlign samples per bin and axis; <= 0: adaptive (ceil(box / roi_size))


@dataclass
class DynamicDETRHeadConfig(HeadConfig):
    num_queries: int = 300
    num_classes: int = 91
    num_encoder_layers: int = 6  # dynamic encoder blocks
    dropout: float = 0.0
    dynamic_dims: int = 16  # width of the decoder's query-generated 1x1 conv (C -> d)
    roi_size: int = 7
    sampling_ratio: int = 2  # RoIAlign samples per bin and axis; <= 0: adaptive (ceil(box / roi_size))


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
    # the pixel of a feature cell that its frustum, its padding test and its ray start from: the cell's centre, or its
    # top-left corner `i * stride` (the official code)
    cell_point: str = field(default="centre", metadata={"choices": ("centre", "corner")})
    # the official 2D part of the position embedding: a sine over (camera index, y, x), 384 channels, through
    # `adapt_pos3d` 384 -> 1024 -> 256; ties the head to the camera order (false: a per-camera 2D sine, order-free)
    with_multiview: bool = False
    # an auxiliary depth-bin map of every camera, trained on the boxes' depths (model.loss.depth_map_weight; not
    # official PETR; training only)
    depth_supervision: bool = False
    # an auxiliary class heatmap of the projected box centres of every camera (model.loss.heatmap_weight; not
    # official PETR, a CenterNet-style stand-in for StreamPETR's 2D auxiliary head; training only)
    heatmap_supervision: bool = False


@dataclass
class DETR3DHeadConfig(HeadConfig):
    num_queries: int = 900
    ffn_dims: int = 512
    num_levels: int = 4
    with_box_refine: bool = True
    # ms_deform_attn is faster (tools/bench_heads.py); both compute the same sum
    sampler: str = field(default="ms_deform_attn", metadata={"choices": ("ms_deform_attn", "grid_sample")})
    # sampling weights per level, the same for every camera (camera-order free), or per (camera index, level) as the
    # official Linear(C, num_cams * num_levels), row camera * num_levels + level
    attention_weights: str = field(default="level", metadata={"choices": ("level", "camera_level")})
    # what the projected reference points are divided by, and where they count as visible: padded size / inside the
    # valid image ("padded_valid"); the valid size for both (WangYueFt's checkpoints); the padded size for both
    # (mmdet3d 1.x re-releases)
    projection: str = field(default="padded_valid", metadata={"choices": ("padded_valid", "unpadded", "padded")})


@dataclass
class StreamPETRHeadConfig(HeadConfig):
    num_queries: int = 644  # learned queries; the decoder also runs the num_propagated memory queries
    in_level: int = 0  # which neck output the head attends to
    depth_num: int = 64
    depth_start: float = 1.0
    position_range: list[float] = field(default_factory=lambda: [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0])
    # the pixel of a feature cell that its frustum starts from (heads/petr.py); the official StreamPETR uses centres
    cell_point: str = field(default="centre", metadata={"choices": ("centre", "corner")})
    query_content: bool = False  # learned per-query decoder content instead of zeros (not official)
    memory_len: int = 1024  # remembered object queries (a queue over past frames)
    topk_proposals: int = 256  # queries of each frame that enter the memory (highest class score)
    num_propagated: int = 256  # newest memory entries that become decoder queries; the rest are attention keys
    with_ego_pos: bool = True  # MLN on queries and memory conditioned on velocity, age and ego motion
    # memory centres also move by their predicted velocity times the elapsed time (not official: ego motion only)
    velocity_extrapolation: bool = False
    ray_bias: bool = False  # PETR's cross-attention prior from cell rays and query anchors (not official)
    depth_supervision: bool = False  # PETR's auxiliary per-camera depth-bin map (not official; training only)
    # PETR's auxiliary per-camera class heatmap, in place of the official 2D auxiliary head (training only)
    heatmap_supervision: bool = False
    # the image tokens and their position embedding: Focal-PETR's (official: MLP tokens, camera-ray MLN, token-gated
    # frustum embedding) or PETR's (linear tokens, frustum embedding + per-camera 2D sine; not official)
    image_tokens: str = field(default="focal", metadata={"choices": ("focal", "petr")})


@dataclass
class MonoDETRHeadConfig(HeadConfig):
    num_queries: int = 50  # per camera image
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    ffn_dims: int = 256
    num_levels: int = 4  # neck levels: the depth predictor fuses the first three at the second's resolution
    num_points: int = 4
    with_box_refine: bool = True  # each layer's projected 3D centres are the next layer's reference points
    depth_bins: int = 80  # linear-increasing depth bins of the depth map (+ one background bin)
    depth_min: float = 1e-3
    depth_max: float = 60.0
    merge_distance: float = 1.0  # metres: cross-camera duplicates of a class closer than this in BEV are merged
    attn_backend: str = field(default="auto", metadata={"choices": ("auto", "reference", "cpu", "cuda")})


class Model(NamedTuple):
    config: type  # the HeadConfig subclass that `model.head` is read into
    module: str  # the module whose build(cfg) builds the model
    # "2d" (normalised cxcywh), "3d" (the 10-d box code) or "mono" (per-camera boxes, lifted and merged per
    # sample): the core's box coder
    boxes: str


MODELS = {
    "detr": Model(DETRHeadConfig, "bev3d.models.detr", "2d"),
    "deformable_detr": Model(DeformableDETRHeadConfig, "bev3d.models.deformable_detr", "2d"),
    "conditional_detr": Model(ConditionalDETRHeadConfig, "bev3d.models.conditional_detr", "2d"),
    "anchor_detr": Model(AnchorDETRHeadConfig, "bev3d.models.anchor_detr", "2d"),
    "efficient_detr": Model(EfficientDETRHeadConfig, "bev3d.models.efficient_detr", "2d"),
    "sparse_rcnn": Model(SparseRCNNHeadConfig, "bev3d.models.sparse_rcnn", "2d"),
    "dynamic_detr": Model(DynamicDETRHeadConfig, "bev3d.models.dynamic_detr", "2d"),
    "petr": Model(PETRHeadConfig, "bev3d.models.heads.petr", "3d"),
    "detr3d": Model(DETR3DHeadConfig, "bev3d.models.heads.detr3d", "3d"),
    "streampetr": Model(StreamPETRHeadConfig, "bev3d.models.heads.streampetr", "3d"),
    "monodetr": Model(MonoDETRHeadConfig, "bev3d.models.heads.monodetr", "mono"),
}
