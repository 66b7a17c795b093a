"""3D detection heads (PETR, DETR3D) on the set-prediction core; each module's build(cfg) gives a
MultiViewDetector (bev3d.models.detector)."""

from bev3d.models.heads.detr3d import DETR3DHead
from bev3d.models.heads.petr import PETRHead

__all__ = ["DETR3DHead", "PETRHead"]
