"""The one output type of every bev3d model; the criterion and the post-processor read it."""

from dataclasses import dataclass
from typing import Optional

import torch

from bev3d.models.core.denoising import DenoisingQueries


@dataclass
class SetPredictions:
    """A set of query predictions for every decoder layer, first layer first.

    logits (L, B, Q, K): class logits; K = num_classes for sigmoid classes, num_classes + 1 (no-object last)
      for softmax classes.
    boxes (L, B, Q, D): boxes in the box coder's form: 2D D = 4 normalised cxcywh; 3D D = 10, the box code
      with centres in metres (bev3d.models.core.box_coder_3d).
    enc: two-stage proposals (L = 1), scored class-agnostically (class 0 is objectness) unless `enc_classes`.
    dn: the denoising queries' predictions, with the queries that say what they must predict.
    enc_classes: the proposals predict the classes (Efficient DETR's dense part) and are matched on them.
    depth_map: a dense per-image depth prediction with a loss of its own (MonoDETR's foreground depth map, PETR's
      depth_supervision).
    heatmap: a dense per-image class heatmap of the projected box centres with a loss of its own (the rig heads'
      heatmap_supervision).
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    enc: Optional["SetPredictions"] = None
    dn: Optional["DenoisingPredictions"] = None
    enc_classes: bool = False
    depth_map: Optional["CameraMapPredictions"] = None
    heatmap: Optional["CameraMapPredictions"] = None


@dataclass
class DenoisingPredictions:
    logits: torch.Tensor  # (L, B, P, K)
    boxes: torch.Tensor  # (L, B, P, D)
    queries: DenoisingQueries


@dataclass
class CameraMapPredictions:
    # (B, M, H, W) per feature cell: depth-bin logits (M = D + 1, the last bin is background) or class heatmap logits
    logits: torch.Tensor
    valid_ratios: torch.Tensor  # (B, 2): the fractions of the map's width and height the unpadded image covers


def split_denoising(logits, boxes, denoising):
    """(L, B, P + Q, K) logits and (L, B, P + Q, D) boxes of a head that ran the P denoising queries in front
    of its Q object queries -> SetPredictions of the object queries, the denoising part as `dn`."""
    if denoising is None:
        return SetPredictions(logits, boxes)
    P = denoising.num_queries
    dn = DenoisingPredictions(logits[:, :, :P], boxes[:, :, :P], denoising)
    return SetPredictions(logits[:, :, P:], boxes[:, :, P:], dn=dn)
