"""The set-prediction core under every head: the output type, box coders, matcher, criterion, post-processor
and query denoising (docs/architecture.md)."""

from bev3d.models.core.box_coder_2d import BoxCoder2D
from bev3d.models.core.box_coder_3d import BoxCoder3D
from bev3d.models.core.criterion import SetCriterion, sigmoid_focal_loss
from bev3d.models.core.denoising import DenoisingQueries, QueryDenoising
from bev3d.models.core.matcher import HungarianMatcher, hungarian_assign
from bev3d.models.core.postprocess import PostProcess
from bev3d.models.core.predictions import DenoisingPredictions, SetPredictions, split_denoising

__all__ = ["BoxCoder2D", "BoxCoder3D", "DenoisingPredictions", "DenoisingQueries", "HungarianMatcher", "PostProcess",
           "QueryDenoising", "SetCriterion", "SetPredictions", "hungarian_assign", "sigmoid_focal_loss",
           "split_denoising"]
