"""3D detection heads (PETR, DETR3D) and their shared box coder, matcher and set loss."""

from bev3d.models.heads.box_coder import NMSFreeDecoder, decode_boxes, encode
from bev3d.models.heads.criterion3d import SetCriterion3D
from bev3d.models.heads.detr3d import DETR3DHead
from bev3d.models.heads.matcher3d import HungarianMatcher3D
from bev3d.models.heads.petr import PETRHead

__all__ = ["DETR3DHead", "HungarianMatcher3D", "NMSFreeDecoder", "PETRHead", "SetCriterion3D", "decode_boxes",
           "encode"]
