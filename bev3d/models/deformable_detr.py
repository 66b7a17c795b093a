"""Deformable DETR (Zhu et al. 2021): multi-scale deformable attention, box refinement, two-stage queries.

Follows the batch contract in bev3d/models/detr.py; two-stage proposals come back as SetPredictions.enc.
"""

import copy
import math

import torch
import torch.nn as nn

from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.core.build import build_denoising
from bev3d.models.core.predictions import SetPredictions, split_denoising
from bev3d.models.detr import SetDetector2D, check_config
from bev3d.models.necks import build_neck
from bev3d.models.transformer import MLP, DeformableTransformer, PositionEmbeddingSine, inverse_sigmoid


class DeformableDETR(SetDetector2D):
    """Without refinement one class/box head is shared by all decoder layers; with it each layer has its own
    and refines the previous layer's boxes. Two-stage adds one more head pair that scores encoder proposals."""

    def __init__(self, backbone, neck, transformer, position_encoding, num_classes, num_queries=300, num_levels=4,
                 with_box_refine=False, two_stage=False):
        super().__init__(backbone, neck, position_encoding)
        C = transformer.embed_dims
        self.transformer, self.num_levels = transformer, num_levels
        self.with_box_refine, self.two_stage = with_box_refine, two_stage
        class_embed = nn.Linear(C, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # focal prior: p = 0.01
        bbox_embed = MLP(C, C, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        num_pred = len(transformer.decoder.layers) + int(two_stage)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)  # first boxes start small
            transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            # Proposals already carry a size: the box heads start from the proposal, not from -2.
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])
            transformer.enc_class_embed, transformer.enc_bbox_embed = self.class_embed[-1], self.bbox_embed[-1]
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * C)  # (position, content) per query

    def predict(self, img, mask, targets=None):
        feats, masks, pos = self.features(img, mask)
        if len(feats) != self.num_levels:
            raise Bev3dError(f"Deformable DETR has num_levels={self.num_levels} but the neck gives {len(feats)} "
                             f"levels: set model.neck.num_outs to model.head.num_levels.")
        query_embed = None if self.two_stage else self.query_embed.weight
        if self.two_stage:
            num_queries = min(self.transformer.num_proposals, sum(f.shape[-2] * f.shape[-1] for f in feats))
        else:
            num_queries = query_embed.shape[0]
        dn = self.denoising_queries(targets, num_queries, img.device)
        extra = None
        if dn is not None:  # the copies' references: their noisy boxes, or centres where the queries have points
            dn_content, dn_pos = self.denoising_embeddings(dn)
            dn_reference = dn.reference if self.two_stage else dn.reference[..., :2]
            extra = dn_content, dn_pos, dn_reference, dn.attn_mask
        hidden, references, enc_outputs = self.transformer(feats, masks, pos, query_embed, extra)
        logits, boxes = [], []
        for lvl in range(hidden.shape[0]):
            delta = self.bbox_embed[lvl](hidden[lvl])  # (B, Q, 4)
            ref = inverse_sigmoid(references[lvl])
            if ref.shape[-1] == 4:
                delta = delta + ref
            else:
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hidden[lvl]))
            boxes.append(delta.sigmoid())
        enc = None
        if enc_outputs is not None:
            enc_logits, enc_boxes = enc_outputs  # (B, S, num_classes), (B, S, 4)
            enc = SetPredictions(enc_logits[None], enc_boxes[None])
        out = split_denoising(torch.stack(logits), torch.stack(boxes), dn)
        out.enc = enc
        return out


def build(cfg):
    m, h = cfg.model, cfg.model.head
    check_config(cfg, focal=True)
    transformer = DeformableTransformer(h.embed_dims, h.num_heads, h.num_encoder_layers, h.num_decoder_layers,
                                        h.ffn_dims, h.dropout, h.num_levels, h.num_points, h.two_stage, h.num_queries,
                                        h.two_stage_topk)
    transformer.set_backend(h.attn_backend)
    # Deformable DETR's sine encoding measures positions from pixel centres (offset -0.5).
    position_encoding = PositionEmbeddingSine(h.embed_dims // 2, normalize=True, offset=-0.5)
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels)
    model = DeformableDETR(backbone, neck, transformer, position_encoding, h.num_classes, h.num_queries,
                           h.num_levels, h.with_box_refine, h.two_stage)
    model.enable_denoising(build_denoising(cfg), h.num_classes, h.embed_dims)
    return model
