"""Deformable DETR's transformer (Zhu et al. 2021): multi-scale deformable attention encoder and decoder.

Flattened multi-scale memory is (B, S, C) with S = sum_l H_l*W_l; `spatial_shapes` (L, 2) holds (H_l, W_l)
and `level_start_index` (L,) where each level starts. Reference points are normalised (x, y) or
(cx, cy, w, h) in [0, 1] of the *valid* (unpadded) image; `valid_ratios` (B, L, 2) maps them onto
each padded level.
"""

import math

import torch
import torch.nn as nn

from bev3d.models.transformer.attention import MultiheadAttention
from bev3d.models.transformer.utils import FFN, inverse_sigmoid
from bev3d.ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to `num_points` learned offsets around its reference point on every level."""

    def __init__(self, embed_dims=256, num_levels=4, num_heads=8, num_points=4, backend="auto"):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} must be divisible by num_heads {num_heads}")
        self.embed_dims, self.num_levels = embed_dims, num_levels
        self.num_heads, self.num_points = num_heads, num_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self):
        # Initial offsets: head h looks along direction 2*pi*h/M, point p at distance p+1 (in pixels of the
        # level, as a square ring), so every head starts with a distinct, spread-out sampling pattern.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index, padding_mask=None):
        """query (B, Q, C), reference_points (B, Q, L, 2 or 4), value (B, S, C), padding_mask (B, S) -> (B, Q, C)."""
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, value.shape[1], M, -1)  # (B, S, M, D)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l).
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            # Box references: offsets are fractions of the box half-size, 1/P per point.
            centre, size = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / P * size * 0.5
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights,
                             backend=self.backend)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    def __init__(self, embed_dims=256, ffn_dims=1024, dropout=0.1, num_levels=4, num_heads=8, num_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(embed_dims, num_levels, num_heads, num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        return self.ffn(self.norm(src + self.dropout(attended)))


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries (standard), deformable cross-attention to the memory, FFN; post-norm."""

    def __init__(self, embed_dims=256, ffn_dims=1024, dropout=0.1, num_levels=4, num_heads=8, num_points=4):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.cross_attn = MSDeformAttn(embed_dims, num_levels, num_heads, num_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask=None,
                self_attn_mask=None):
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, query_pos=query_pos, attn_mask=self_attn_mask)))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                                   padding_mask)
        return self.ffn(self.norm2(tgt + self.dropout2(attended)))


def encoder_reference_points(spatial_shapes, valid_ratios):
    """Pixel centres of every level, normalised by the valid extent -> (B, S, L, 2) on every level."""
    refs = []
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(torch.linspace(0.5, H - 0.5, H, device=valid_ratios.device),
                                torch.linspace(0.5, W - 0.5, W, device=valid_ratios.device), indexing="ij")
        ref_y = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)  # (B, H*W)
        ref_x = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
        refs.append(torch.stack((ref_x, ref_y), -1))
    refs = torch.cat(refs, 1)  # (B, S, 2) in the valid image of its own level
    return refs[:, :, None] * valid_ratios[:, None]  # (B, S, L, 2) on each padded level


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask=None):
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoder(nn.Module):
    """Decoder layers with optional iterative box refinement.

    With `bbox_embed` set (one head per layer), each layer's box prediction becomes the next layer's
    reference (detached, as in the paper). Returns hidden states (num_layers, B, Q, C) and the list of
    references each layer *received*, (B, Q, 2) points or (B, Q, 4) boxes (the first may be points
    and the rest boxes when refining from point references).
    """

    def __init__(self, num_layers, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.bbox_embed = None  # set by the model when refining boxes

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
                padding_mask=None, self_attn_mask=None):
        hidden, references = [], []
        for lid, layer in enumerate(self.layers):
            scale = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            ref_input = reference_points[:, :, None] * scale[:, None]  # (B, Q, L, 2 or 4)
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask,
                        self_attn_mask)
            hidden.append(tgt)
            references.append(reference_points)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](tgt)
                if reference_points.shape[-1] == 4:
                    new = delta + inverse_sigmoid(reference_points)
                else:
                    new = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = new.sigmoid().detach()
        return torch.stack(hidden), references


def valid_ratio(mask):
    """mask (B, H, W), True at padding -> (B, 2) valid fraction of width and height."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / W, valid_h / H], -1)


def flatten_levels(srcs, masks, pos_embeds, level_embed):
    """Per level (B, C, H_l, W_l) features, (B, H_l, W_l) masks and positions -> the flattened memory (B, S, C),
    its mask (B, S) and positions + level embeddings (B, S, C), spatial_shapes (L, 2), level_start_index (L,)
    and valid_ratios (B, L, 2)."""
    shapes = [src.shape[-2:] for src in srcs]
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=srcs[0].device)  # (L, 2)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
    mask = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
    pos = torch.cat([(p.flatten(2).transpose(1, 2) + level_embed[lvl]) for lvl, p in enumerate(pos_embeds)], 1)
    valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)  # (B, L, 2)
    return src, mask, pos, spatial_shapes, level_start_index, valid_ratios


def encoder_proposals(memory, padding_mask, spatial_shapes):
    """Two-stage: one proposal per memory position (its pixel centre, size 0.05 * 2**level).

    -> proposals (B, S, 4) as inverse-sigmoid cxcywh (+inf where padded or too close to the border)
    and a validity mask (B, S).
    """
    B = memory.shape[0]
    proposals, start = [], 0
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        pad = padding_mask[:, start:start + H * W].view(B, H, W)
        valid_h = (~pad[:, :, 0]).sum(1)
        valid_w = (~pad[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(H, dtype=memory.dtype, device=memory.device),
                                torch.arange(W, dtype=memory.dtype, device=memory.device), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None]  # (1, H, W, 2)
        scale = torch.stack([valid_w, valid_h], -1).view(B, 1, 1, 2).to(memory.dtype)
        grid = (grid + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * 2.0**lvl)
        proposals.append(torch.cat([grid, wh], -1).view(B, -1, 4))
        start += H * W
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask  # (B, S)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid[..., None], float("inf"))
    return proposals, valid


def proposal_pos_embed(proposals, num_feats=128, temperature=10000):
    """proposals (B, K, 4) in [0, 1] -> sine embedding (B, K, 4*num_feats)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = proposals[..., None] * (2 * math.pi) / dim_t  # (B, K, 4, F)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


class DeformableTransformer(nn.Module):
    """Multi-scale features -> decoder hidden states and references.

    srcs/masks/pos: per level (B, C, H_l, W_l) / (B, H_l, W_l) / (B, C, H_l, W_l).
    Single stage: `query_embed` (Q, 2C) splits into query position and content; reference points are a
    linear map of the position. Two stage: the encoder output scores every position as a proposal and
    the top-k proposals become reference boxes and (through pos_trans) the queries; `two_stage_topk` "all"
    ranks every position as the original does, "valid" only those inside the image and off its border.
    """

    def __init__(self, embed_dims=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, ffn_dims=1024,
                 dropout=0.1, num_levels=4, num_points=4, two_stage=False, two_stage_num_proposals=300,
                 two_stage_topk="all"):
        super().__init__()
        if two_stage_topk not in ("all", "valid"):
            raise ValueError(f"two_stage_topk must be 'all' or 'valid', got {two_stage_topk!r}")
        kw = dict(embed_dims=embed_dims, ffn_dims=ffn_dims, dropout=dropout, num_levels=num_levels,
                  num_heads=num_heads, num_points=num_points)
        self.embed_dims, self.two_stage, self.num_proposals = embed_dims, two_stage, two_stage_num_proposals
        self.two_stage_topk = two_stage_topk
        self.encoder = DeformableEncoder(num_encoder_layers, **kw)
        self.decoder = DeformableDecoder(num_decoder_layers, **kw)
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dims))
        if two_stage:
            self.enc_output = nn.Linear(embed_dims, embed_dims)
            self.enc_output_norm = nn.LayerNorm(embed_dims)
            self.pos_trans = nn.Linear(embed_dims * 2, embed_dims * 2)
            self.pos_trans_norm = nn.LayerNorm(embed_dims * 2)
            self.enc_class_embed = self.enc_bbox_embed = None  # set by the model (its extra prediction heads)
        else:
            self.reference_points = nn.Linear(embed_dims, 2)
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def set_backend(self, backend):
        """ms_deform_attn backend of every deformable attention ("auto", "reference", "cpu", "cuda")."""
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.backend = backend

    def forward(self, srcs, masks, pos_embeds, query_embed=None, extra_queries=None):
        """extra_queries: (content (B, P, C), position (B, P, C), references (B, P, 2 or 4, as the object queries'),
        self-attention mask (P + Q, P + Q)) of queries that go in front of the object queries (query denoising)."""
        src, mask, pos, spatial_shapes, level_start_index, valid_ratios = flatten_levels(srcs, masks, pos_embeds,
                                                                                         self.level_embed)
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, mask)

        B, C = memory.shape[0], self.embed_dims
        enc = None  # two-stage: the encoder's (class logits (B, S, K), boxes (B, S, 4)), for the loss
        if self.two_stage:
            proposals, valid = encoder_proposals(memory, mask, spatial_shapes)
            out_memory = memory.masked_fill(~valid[..., None], 0.0)
            out_memory = self.enc_output_norm(self.enc_output(out_memory))
            enc_logits = self.enc_class_embed(out_memory)  # (B, S, num_classes)
            enc_coord_unact = self.enc_bbox_embed(out_memory) + proposals
            objectness = enc_logits[..., 0]  # (B, S)
            if self.two_stage_topk == "valid":  # padded and border positions never become queries
                objectness = objectness.masked_fill(~valid, float("-inf"))
            topk = objectness.topk(min(self.num_proposals, objectness.shape[1]), dim=1)[1]  # (B, K)
            coords = torch.gather(enc_coord_unact, 1, topk[..., None].expand(-1, -1, 4)).detach()
            reference_points = coords.sigmoid()
            embed = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(reference_points, C // 2)))  # (B, K, 2C)
            query_pos, tgt = embed.split(C, -1)
            enc = enc_logits, enc_coord_unact.sigmoid()
        else:
            query_pos, tgt = query_embed.split(C, dim=1)  # (Q, C) each
            query_pos, tgt = query_pos[None].expand(B, -1, -1), tgt[None].expand(B, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)

        self_attn_mask = None
        if extra_queries is not None:
            extra_tgt, extra_pos, extra_ref, self_attn_mask = extra_queries
            tgt, query_pos = torch.cat([extra_tgt, tgt], 1), torch.cat([extra_pos, query_pos], 1)
            reference_points = torch.cat([extra_ref, reference_points], 1)
        hidden, references = self.decoder(tgt, query_pos, reference_points, memory, spatial_shapes,
                                          level_start_index, valid_ratios, mask, self_attn_mask)
        return hidden, references, enc
