"""Multi-view 3D detectors (PETR, DETR3D): a shared image backbone and neck over all cameras, a 3D head.

`model(batch)` takes the collated batch of `bev3d.data.collate` (docs: the 3D batch contract). In train
mode it returns the dict of scalar losses; in eval mode one dict per sample with `boxes` (K, 9) in the
LiDAR frame, `scores` (K,) and `labels` (K,).
"""

import torch
import torch.nn as nn

from bev3d.constants import CLASSES
from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.heads.box_coder import NMSFreeDecoder
from bev3d.models.heads.criterion3d import SetCriterion3D
from bev3d.models.heads.denoising import QueryDenoising
from bev3d.models.heads.detr3d import DETR3DHead
from bev3d.models.heads.detr3d_sampling import SAMPLERS
from bev3d.models.heads.matcher3d import HungarianMatcher3D
from bev3d.models.heads.petr import PETRHead
from bev3d.models.necks import build_neck


class MultiViewDetector(nn.Module):
    def __init__(self, backbone, neck, head, criterion, decoder, denoising=None):
        super().__init__()
        self.backbone, self.neck, self.head, self.criterion = backbone, neck, head, criterion
        self.decoder, self.denoising = decoder, denoising

    def extract_feats(self, img):
        """(B, N, 3, H, W) -> list of (B, N, C, H_l, W_l): every camera image goes through the backbone."""
        B, N = img.shape[:2]
        # oneDNN's convolutions and batch norms are faster channels-last: the tiny PETR trains ~10% faster on CPU
        feats = self.neck(self.backbone(img.flatten(0, 1).contiguous(memory_format=torch.channels_last)))
        return [f.view(B, N, *f.shape[1:]) for f in feats]

    def forward(self, batch):
        img = batch["img"]  # (B, N, 3, H_pad, W_pad)
        lidar2img = batch["lidar2img"].to(img)  # (B, N, 4, 4)
        img_shape = torch.as_tensor(batch["img_shape"], device=img.device).view(-1, 2)  # (B, 2) valid (H, W)
        head_args = (self.extract_feats(img), lidar2img, img_shape, tuple(img.shape[-2:]))
        denoising = None
        if self.training and self.denoising is not None:
            denoising = self.denoising(batch["gt_boxes"], batch["gt_labels"], self.head.num_queries, img.device)
        if denoising is None:
            cls_logits, box_code = self.head(*head_args)
        else:
            cls_logits, box_code = self.head(*head_args, denoising=denoising)
        if not self.training:
            return self.decoder(cls_logits[-1], box_code[-1])
        P = 0 if denoising is None else denoising.num_queries  # denoising queries come first
        losses = self.criterion(cls_logits[:, :, P:], box_code[:, :, P:], batch["gt_boxes"], batch["gt_labels"])
        if denoising is not None:
            losses.update(self.criterion.denoising_loss(cls_logits[:, :, :P], box_code[:, :, :P], denoising))
        return losses


def build_head(cfg):
    """ModelConfig -> PETRHead | DETR3DHead."""
    h, in_channels = cfg.head, cfg.neck.out_channels
    common = dict(num_queries=h.num_queries, embed_dims=h.embed_dims, num_heads=h.num_heads,
                  num_decoder_layers=h.num_decoder_layers, ffn_dims=h.ffn_dims, dropout=h.dropout)
    if cfg.type == "petr":
        return PETRHead(in_channels, h.num_classes, cfg.pc_range, in_level=h.in_level, depth_num=h.depth_num,
                        depth_start=h.depth_start, position_range=h.position_range, with_2d_pe=h.with_2d_pe,
                        query_content=h.query_content, ray_bias=h.ray_bias, with_box_refine=h.with_box_refine,
                        **common)
    return DETR3DHead(h.num_classes, cfg.pc_range, num_levels=h.num_levels,
                      with_box_refine=h.with_box_refine, sampler=h.sampler, **common)


def check_model_config(m):
    """Raise Bev3dError for model settings the heads cannot run with."""
    h = m.head
    if h.num_classes != len(CLASSES):
        raise Bev3dError(f"model.head.num_classes is {h.num_classes}, but the nuScenes labels are the "
                         f"{len(CLASSES)} classes of bev3d.constants.CLASSES: set it to {len(CLASSES)}.")
    if h.embed_dims % h.num_heads:
        raise Bev3dError(f"model.head.embed_dims ({h.embed_dims}) must be divisible by model.head.num_heads "
                         f"({h.num_heads}).")
    if m.type == "detr3d":
        if m.neck.out_channels != h.embed_dims:
            raise Bev3dError(f"DETR3D samples the neck features directly: model.neck.out_channels "
                             f"({m.neck.out_channels}) must equal model.head.embed_dims ({h.embed_dims}).")
        if h.sampler not in SAMPLERS:
            raise Bev3dError(f"model.head.sampler is {h.sampler!r}; use one of {', '.join(SAMPLERS)}.")
        if h.num_levels > m.neck.num_outs:
            raise Bev3dError(f"model.head.num_levels ({h.num_levels}) exceeds the neck's levels "
                             f"(model.neck.num_outs = {m.neck.num_outs}).")
    elif h.denoising_groups < 0 or h.denoising_noise < 0:
        raise Bev3dError(f"model.head.denoising_groups ({h.denoising_groups}) and model.head.denoising_noise "
                         f"({h.denoising_noise}) must be >= 0 (denoising_groups: 0 turns query denoising off).")
    elif h.in_level >= m.neck.num_outs:
        raise Bev3dError(f"model.head.in_level ({h.in_level}) must name one of the neck's "
                         f"{m.neck.num_outs} levels (model.neck.num_outs).")


def build(cfg):
    """Config -> MultiViewDetector for `cfg.model.type` in ("petr", "detr3d")."""
    m = cfg.model
    check_model_config(m)
    matcher = HungarianMatcher3D(m.matcher.cost_class, m.matcher.cost_bbox, m.loss.focal_alpha, m.loss.focal_gamma)
    criterion = SetCriterion3D(m.head.num_classes, matcher, m.loss.cls_weight, m.loss.bbox_weight,
                               m.loss.focal_alpha, m.loss.focal_gamma, m.loss.code_weights)
    decoder = NMSFreeDecoder(m.head.num_classes, m.max_detections, m.score_threshold, m.post_center_range)
    denoising = None
    if m.type == "petr" and m.head.denoising_groups > 0:
        denoising = QueryDenoising(m.head.num_classes, m.pc_range, m.head.denoising_groups, m.head.denoising_noise)
    return MultiViewDetector(build_backbone(m.backbone), build_neck(m.neck), build_head(m), criterion, decoder,
                             denoising)
