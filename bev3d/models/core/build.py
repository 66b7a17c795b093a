"""Config -> the core's parts for a model: box coder, criterion, post-processor, query denoising."""

from bev3d.errors import Bev3dError
from bev3d.models.core.box_coder_2d import BoxCoder2D
from bev3d.models.core.box_coder_3d import BoxCoder3D
from bev3d.models.core.box_coder_mono import (BoxCoderMono, CameraMapCriterion, MonoPostProcess, MonoSetCriterion,
                                              lid_edges)
from bev3d.models.core.criterion import SetCriterion
from bev3d.models.core.denoising import QueryDenoising
from bev3d.models.core.matcher import HungarianMatcher
from bev3d.models.core.postprocess import PostProcess
from bev3d.models.registry import MODELS


def build_box_coder(cfg):
    m = cfg.model
    if MODELS[m.type].boxes == "3d":
        return BoxCoder3D(m.pc_range, m.loss.code_weights, m.post_center_range)
    if MODELS[m.type].boxes == "mono":
        return BoxCoderMono()
    return BoxCoder2D()


def class_mode(cfg):
    """"focal" (sigmoid classes) or "softmax" (a no-object class, DETR), from model.loss.use_focal."""
    return "focal" if cfg.model.loss.use_focal else "softmax"


def build_criterion(cfg):
    m, loss = cfg.model, cfg.model.loss
    coder, mode = build_box_coder(cfg), class_mode(cfg)
    costs = {"bbox": m.matcher.cost_bbox, "giou": m.matcher.cost_giou, "center": m.matcher.cost_center}
    matcher = HungarianMatcher(coder, m.matcher.cost_class, costs, mode, loss.focal_alpha, loss.focal_gamma)
    weights = {"loss_cls": loss.cls_weight, "loss_bbox": loss.bbox_weight, "loss_giou": loss.giou_weight}
    h = m.head
    if MODELS[m.type].boxes == "mono":
        w = loss.mono
        weights.update(loss_center=w.center_weight, loss_depth=w.depth_weight, loss_dim=w.dim_weight,
                       loss_angle=w.angle_weight, loss_depth_map=loss.depth_map_weight)
        return MonoSetCriterion(h.num_classes, matcher, coder, weights, mode, loss.focal_alpha, loss.focal_gamma,
                                loss.no_object_weight, loss.aux_loss,
                                depth_edges=lid_edges(h.depth_bins, h.depth_min, h.depth_max))
    if h.camera_maps():
        # the depth map's bins are the head's own frustum depths (PETR's LID bins up to the position range)
        weights.update(loss_depth_map=loss.depth_map_weight, loss_heatmap=loss.heatmap_weight)
        return CameraMapCriterion(h.num_classes, matcher, coder, weights, mode, loss.focal_alpha, loss.focal_gamma,
                                  loss.no_object_weight, loss.aux_loss,
                                  depth_edges=lid_edges(h.depth_num, h.depth_start, h.position_range[3]))
    return SetCriterion(m.head.num_classes, matcher, coder, weights, mode, loss.focal_alpha, loss.focal_gamma,
                        loss.no_object_weight, loss.aux_loss)


def build_postprocess(cfg):
    m = cfg.model
    if MODELS[m.type].boxes == "mono":
        return MonoPostProcess(build_box_coder(cfg), class_mode(cfg), m.max_detections, m.score_threshold,
                               m.head.merge_distance)
    return PostProcess(build_box_coder(cfg), class_mode(cfg), m.max_detections, m.score_threshold)


def build_denoising(cfg):
    """QueryDenoising of `model.denoising`, or None when it is off (groups: 0)."""
    m, dn = cfg.model, cfg.model.denoising
    if dn.groups < 0 or dn.box_noise < 0 or not 0 <= dn.label_noise <= 1:
        raise Bev3dError(f"model.denoising: groups ({dn.groups}) and box_noise ({dn.box_noise}) must be >= 0 and "
                         f"label_noise ({dn.label_noise}) in [0, 1] (groups: 0 turns query denoising off).")
    if dn.groups == 0:
        return None
    return QueryDenoising(m.head.num_classes, build_box_coder(cfg), dn.groups, dn.box_noise, dn.label_noise,
                          dn.positive_radius)
