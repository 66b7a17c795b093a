"""DETR (Carion et al. 2020): ResNet -> 1x1 projection -> transformer -> class and box per object query.

The batch contract of every 2D model (see docs/models.md, "2D core"): batch["img"] (B, 3, H, W) normalised
and padded, batch["mask"] (B, H, W) True at padding -> SetPredictions with logits (L, B, Q, K) and boxes
(L, B, Q, 4) normalised cxcywh of the unpadded image. Targets (for the criterion) are per image
{"labels" (T,) int64, "boxes" (T, 4) cxcywh in [0, 1]}.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.core.build import build_denoising
from bev3d.models.core.predictions import split_denoising
from bev3d.models.necks import build_neck
from bev3d.models.transformer import MLP, Transformer, build_position_encoding, inverse_sigmoid
from bev3d.models.transformer.deformable_transformer import proposal_pos_embed


class SetDetector2D(nn.Module):
    """What the 2D models share: features + padding masks + positions (none without a position encoding), and
    DN-DETR query denoising for the models that support it."""

    def __init__(self, backbone, neck, position_encoding):
        super().__init__()
        self.backbone, self.neck, self.position_encoding = backbone, neck, position_encoding
        self.denoising = None  # QueryDenoising (not a module: no state)

    def enable_denoising(self, denoising, num_classes, embed_dims, position=True):
        """DN-DETR: while training, noisy copies of the ground-truth boxes and labels join the decoder queries. A
        copy's content embeds its (possibly flipped) label: num_classes + 1 entries, the last one for padding
        slots. With `position` its query position is an MLP of the sine embedding of its noisy box (models whose
        query positions come from their anchors embed the copies' anchors themselves). Called after the model
        has built its own modules, so that a config without denoising keeps its initial weights."""
        self.denoising = denoising
        if denoising is not None:
            self.label_embed = nn.Embedding(num_classes + 1, embed_dims)
            self.dn_position = MLP(2 * embed_dims, embed_dims, embed_dims, 2) if position else None

    def denoising_queries(self, targets, num_queries, device):
        """-> DenoisingQueries in front of `num_queries` object queries; None without targets or denoising."""
        if targets is None or self.denoising is None:
            return None
        return self.denoising(targets, num_queries, device)

    def denoising_embeddings(self, dn):
        """DenoisingQueries -> the copies' content (B, P, C) and query position (B, P, C)."""
        C = self.label_embed.embedding_dim
        position = proposal_pos_embed(dn.reference, C // 2).to(self.label_embed.weight.dtype)
        return self.label_embed(dn.input_labels), self.dn_position(position)

    def features(self, img, mask):
        """img (B, 3, H, W), mask (B, H, W) -> per level features (B, C, H_l, W_l), masks, positions."""
        feats = self.neck(self.backbone(img))
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool() for f in feats]
        if self.position_encoding is None:
            return feats, masks, [None] * len(feats)
        pos = [self.position_encoding(m).to(f.dtype) for f, m in zip(feats, masks)]
        return feats, masks, pos

    def forward(self, batch, targets=None):
        img = batch["img"]
        mask = batch.get("mask")
        if mask is None:
            mask = torch.zeros(img.shape[0], *img.shape[-2:], dtype=torch.bool, device=img.device)
        return self.predict(img, mask, targets)


class DETR(SetDetector2D):
    def __init__(self, backbone, neck, transformer, position_encoding, num_logits, num_queries=100):
        super().__init__(backbone, neck, position_encoding)
        C = transformer.embed_dims
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, C)
        self.class_embed = nn.Linear(C, num_logits)
        self.bbox_embed = MLP(C, C, 4, 3)

    def predict(self, img, mask, targets=None):
        feats, masks, pos = self.features(img, mask)
        query_pos = self.query_embed.weight[None].expand(img.shape[0], -1, -1)  # (B, Q, C)
        tgt = torch.zeros_like(query_pos)
        dn = self.denoising_queries(targets, query_pos.shape[1], img.device)
        if dn is not None:  # the copies go in front; DETR's boxes are absolute, so theirs are too
            dn_content, dn_pos = self.denoising_embeddings(dn)
            tgt, query_pos = torch.cat([dn_content, tgt], 1), torch.cat([dn_pos, query_pos], 1)
        hidden = self.transformer(feats[-1], masks[-1], query_pos, pos[-1], tgt,
                                  None if dn is None else dn.attn_mask)  # (L, B, P + Q, C)
        return split_denoising(self.class_embed(hidden), self.bbox_embed(hidden).sigmoid(), dn)


def boxes_around_points(delta, reference):
    """Box deltas (..., 4) in logit space around 2D reference points (..., 2) in [0, 1] -> cxcywh boxes in [0, 1]:
    the centre is the reference moved in inverse-sigmoid space, the size the delta alone (Conditional / Anchor
    DETR)."""
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


def check_config(cfg, denoising=True, focal=False, single_level=False, fpn=False):
    """Raise Bev3dError for 2D settings the model cannot run with. What the model needs: `denoising`, it supports
    model.denoising; `focal`, the sigmoid focal loss; `single_level`, one feature map; `fpn`, an FPN of
    model.head.embed_dims channels (its RoIs and convolutions read the levels as they are)."""
    m, h = cfg.model, cfg.model.head
    if h.embed_dims % h.num_heads:
        raise Bev3dError(f"model.head.embed_dims ({h.embed_dims}) must be divisible by model.head.num_heads "
                         f"({h.num_heads}).")
    if m.denoising.groups > 0 and not denoising:
        raise Bev3dError(f"model.denoising is not available for model.type {m.type}; set model.denoising.groups: 0.")
    if focal and not m.loss.use_focal:
        raise Bev3dError(f"model.type {m.type} is trained with the sigmoid focal loss: set model.loss.use_focal: "
                         f"true.")
    if single_level and m.neck.num_outs != 1:
        raise Bev3dError(f"model.type {m.type} attends to one feature map but model.neck.num_outs is "
                         f"{m.neck.num_outs}: set it to 1 (and model.backbone.out_indices to [3]).")
    if fpn and (m.neck.type != "fpn" or m.neck.out_channels != h.embed_dims):
        raise Bev3dError(f"model.type {m.type} reads its levels from an FPN of model.head.embed_dims channels: set "
                         f"model.neck.type: fpn and model.neck.out_channels: {h.embed_dims}.")


def build(cfg):
    m, h = cfg.model, cfg.model.head
    check_config(cfg)
    transformer = Transformer(h.embed_dims, h.num_heads, h.num_encoder_layers, h.num_decoder_layers, h.ffn_dims,
                              h.dropout)
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels)
    # softmax classes have a last "no object" logit
    num_logits = h.num_classes + (0 if m.loss.use_focal else 1)
    model = DETR(backbone, neck, transformer, build_position_encoding(h.position_encoding, h.embed_dims), num_logits,
                 h.num_queries)
    model.enable_denoising(build_denoising(cfg), h.num_classes, h.embed_dims)
    return model
