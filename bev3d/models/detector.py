"""Multi-view 3D detectors (PETR, DETR3D): a shared image backbone and neck over all cameras, a 3D head.

`model(batch, targets=None)` takes the collated batch of `bev3d.data.collate` (docs/models.md: the 3D
batch contract) and returns SetPredictions (boxes: the 10-d code of bev3d.models.core.box_coder_3d, centres
in metres). With `targets` and query denoising on, the head also runs the denoising queries.
"""

import torch
import torch.nn as nn

from bev3d.constants import CLASSES
from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.core.build import build_denoising
from bev3d.models.necks import build_neck


class MultiViewDetector(nn.Module):
    def __init__(self, backbone, neck, head, denoising=None):
        super().__init__()
        self.backbone, self.neck, self.head, self.denoising = backbone, neck, head, denoising

    def extract_feats(self, img):
        """(B, N, 3, H, W) -> list of (B, N, C, H_l, W_l): every camera image goes through the backbone."""
        B, N = img.shape[:2]
        # oneDNN's convolutions and batch norms are faster channels-last: the tiny PETR trains ~10% faster on CPU
        feats = self.neck(self.backbone(img.flatten(0, 1).contiguous(memory_format=torch.channels_last)))
        return [f.view(B, N, *f.shape[1:]) for f in feats]

    def forward(self, batch, targets=None):
        img = batch["img"]  # (B, N, 3, H_pad, W_pad)
        lidar2img = batch["lidar2img"].to(img)  # (B, N, 4, 4)
        img_shape = torch.as_tensor(batch["img_shape"], device=img.device).view(-1, 2)  # (B, 2) valid (H, W)
        feats = self.extract_feats(img)
        denoising = None
        if targets is not None and self.denoising is not None:
            denoising = self.denoising(targets, self.head.num_queries, img.device)
        return self.head(feats, lidar2img, img_shape, tuple(img.shape[-2:]), denoising)


def check_config(cfg):
    """Raise Bev3dError for settings no 3D head can run with."""
    m, h = cfg.model, cfg.model.head
    if h.num_classes != len(CLASSES):
        raise Bev3dError(f"model.head.num_classes is {h.num_classes}, but the nuScenes labels are the "
                         f"{len(CLASSES)} classes of bev3d.constants.CLASSES: set it to {len(CLASSES)}.")
    if h.embed_dims % h.num_heads:
        raise Bev3dError(f"model.head.embed_dims ({h.embed_dims}) must be divisible by model.head.num_heads "
                         f"({h.num_heads}).")
    if not m.loss.use_focal:
        raise Bev3dError(f"{m.type} is trained with the sigmoid focal loss (no no-object class): set "
                         f"model.loss.use_focal: true.")


def build(cfg, build_head):
    """Config -> MultiViewDetector with the head `build_head(cfg)` (built after the backbone and neck)."""
    check_config(cfg)
    backbone = build_backbone(cfg.model.backbone)
    neck = build_neck(cfg.model.neck, backbone.out_channels)
    return MultiViewDetector(backbone, neck, build_head(cfg), build_denoising(cfg))
