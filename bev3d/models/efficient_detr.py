"""Efficient DETR (Yao et al. 2021): a dense part initialises the object containers of a sparse part.

Dense part: Deformable DETR's multi-scale encoder, then a class head and a box head on every encoder token, the
box relative to the token's anchor box (its pixel centre, size 0.05 * 2**level, as in two-stage Deformable
DETR). Its predictions get a set loss of their own (SetPredictions.enc, matched on the classes).
Sparse part: the top-k tokens by their best class score become the object queries; their encoder features are
the query content and their dense boxes (detached) the reference boxes, and one deformable decoder layer refines
them (`num_decoder_layers: 6` is the paper's cascade, every layer refining the previous layer's boxes). The paper
has no official code; the interpretations are listed in docs/models.md. Follows the batch contract in
bev3d/models/detr.py.
"""

import copy
import math

import torch
import torch.nn as nn

from bev3d.errors import Bev3dError
from bev3d.models.backbones import build_backbone
from bev3d.models.core.predictions import SetPredictions
from bev3d.models.detr import SetDetector2D, check_config
from bev3d.models.necks import build_neck
from bev3d.models.transformer import MLP, DeformableDecoder, DeformableEncoder, MSDeformAttn, PositionEmbeddingSine
from bev3d.models.transformer import inverse_sigmoid
from bev3d.models.transformer.deformable_transformer import encoder_proposals, flatten_levels, proposal_pos_embed


def gather_tokens(x, index):
    """x (B, S, D), index (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


class EfficientDETR(SetDetector2D):
    def __init__(self, backbone, neck, position_encoding, num_classes, num_queries=100, embed_dims=256, num_heads=8,
                 num_encoder_layers=3, num_decoder_layers=1, ffn_dims=1024, dropout=0.1, num_levels=4, num_points=4):
        super().__init__(backbone, neck, position_encoding)
        C = embed_dims
        kw = dict(embed_dims=C, ffn_dims=ffn_dims, dropout=dropout, num_levels=num_levels, num_heads=num_heads,
                  num_points=num_points)
        self.num_queries, self.num_levels = num_queries, num_levels
        self.encoder = DeformableEncoder(num_encoder_layers, **kw)
        self.decoder = DeformableDecoder(num_decoder_layers, **kw)
        self.level_embed = nn.Parameter(torch.empty(num_levels, C))
        self.query_pos = MLP(2 * C, C, C, 2)  # sine embedding of a reference box -> its query position
        for part in (self.encoder, self.decoder, self.query_pos):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        class_embed = nn.Linear(C, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # focal prior: p = 0.01
        bbox_embed = MLP(C, C, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)  # start from the anchor / reference box
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        self.dense_class_embed, self.dense_bbox_embed = copy.deepcopy(class_embed), copy.deepcopy(bbox_embed)
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_decoder_layers))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_decoder_layers))
        self.decoder.bbox_embed = self.bbox_embed  # each layer refines the boxes it received

    def set_backend(self, backend):
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.backend = backend

    def predict(self, img, mask, targets=None):
        feats, masks, pos = self.features(img, mask)
        if len(feats) != self.num_levels:
            raise Bev3dError(f"Efficient DETR has num_levels={self.num_levels} but the neck gives {len(feats)} "
                             f"levels: set model.neck.num_outs to model.head.num_levels.")
        src, mask, pos, shapes, starts, ratios = flatten_levels(feats, masks, pos, self.level_embed)
        memory = self.encoder(src, pos, shapes, starts, ratios, mask)  # (B, S, C)

        # dense part: a detection on every token
        anchors, valid = encoder_proposals(memory, mask, shapes)  # (B, S, 4) inverse-sigmoid cxcywh, (B, S)
        dense_logits = self.dense_class_embed(memory)  # (B, S, K)
        dense_boxes = (self.dense_bbox_embed(memory) + anchors).sigmoid()  # (B, S, 4)

        # sparse part: the best-scoring tokens (never padding or border tokens, which have no anchor box)
        scores = dense_logits.detach().amax(-1).masked_fill(~valid, float("-inf"))  # (B, S)
        topk = scores.topk(min(self.num_queries, scores.shape[1]), dim=1).indices  # (B, K)
        reference = gather_tokens(dense_boxes, topk).detach()  # (B, K, 4)
        tgt = gather_tokens(memory, topk)  # (B, K, C)
        query_pos = self.query_pos(proposal_pos_embed(reference, memory.shape[-1] // 2).to(memory.dtype))
        hidden, references = self.decoder(tgt, query_pos, reference, memory, shapes, starts, ratios, mask)
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hidden)])  # (L, B, K, num_classes)
        boxes = torch.stack([(head(h) + inverse_sigmoid(ref)).sigmoid()
                             for head, h, ref in zip(self.bbox_embed, hidden, references)])  # (L, B, K, 4)
        return SetPredictions(logits, boxes, enc=SetPredictions(dense_logits[None], dense_boxes[None]),
                              enc_classes=True)


def build(cfg):
    m, h = cfg.model, cfg.model.head
    check_config(cfg, denoising=False, focal=True)
    # Deformable DETR's sine encoding, positions measured from pixel centres
    position_encoding = PositionEmbeddingSine(h.embed_dims // 2, normalize=True, offset=-0.5)
    backbone = build_backbone(m.backbone)
    neck = build_neck(m.neck, backbone.out_channels)
    model = EfficientDETR(backbone, neck, position_encoding, h.num_classes, h.num_queries, h.embed_dims, h.num_heads,
                          h.num_encoder_layers, h.num_decoder_layers, h.ffn_dims, h.dropout, h.num_levels,
                          h.num_points)
    model.set_backend(h.attn_backend)
    return model
