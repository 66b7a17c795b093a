"""PETR head (Liu et al. 2022, megvii-research/PETR): 3D position-aware image tokens, global decoder.

Every feature pixel of every camera gets a frustum of depth candidates, lifted to 3D with the inverse
of its camera's `lidar2img`; an MLP turns those points into a 3D position embedding, so plain global
cross-attention over all N_cam x H x W tokens (DETR's decoder on SDPA) reasons in 3D.
"""

import math

import torch
import torch.nn as nn

from bev3d.errors import Bev3dError
from bev3d.geometry import lid_depths, transform_points
from bev3d.models import detector
from bev3d.models.core.box_coder_3d import denormalize_points, normalize_points
from bev3d.models.core.predictions import CameraMapPredictions, split_denoising
from bev3d.models.heads.common import PredictionBranches, sine_embed_points
from bev3d.models.heads.ray_bias import LowRankBias, LowRankBiasAttention
from bev3d.models.transformer.attention import MultiheadAttention
from bev3d.models.transformer.detr_transformer import TransformerDecoder
from bev3d.models.transformer.position_encoding import PositionEmbeddingSine
from bev3d.models.transformer.utils import inverse_sigmoid


def depth_bins(depth_num, depth_start, depth_max):
    """(D,) linear-increasing depths: d_i = start + (max - start) * i (i + 1) / (D (D + 1))."""
    return lid_depths(torch.arange(depth_num, dtype=torch.float32), depth_num, depth_start, depth_max)


HEATMAP_PRIOR = 0.1  # CenterNet's initial heatmap output: the loss starts near a background map's

# where in its cell a feature cell's pixel lies, in cells: the centre, or the top-left corner (the official PETR)
CELL_OFFSETS = {"centre": 0.5, "corner": 0.0}


def cell_pixels(feat_hw, pad_shape, device, offset=0.5):
    """Pixel coordinates (v (H_f,), u (W_f,)) of the feature cells in the padded image: their centres, or with
    `offset` 0 their top-left corners."""
    H, W = feat_hw
    v = (torch.arange(H, device=device) + offset) * (pad_shape[0] / H)
    u = (torch.arange(W, device=device) + offset) * (pad_shape[1] / W)
    return v, u


def inverse_4x4(m):
    """(..., 4, 4) torch -> the inverse by the adjugate over 2x2 minors: elementwise arithmetic only, for graphs
    without a matrix inverse (ONNX has none); `invert` takes it in ONNX export."""
    a = [[m[..., i, j] for j in range(4)] for i in range(4)]
    s = [a[0][0] * a[1][1] - a[1][0] * a[0][1], a[0][0] * a[1][2] - a[1][0] * a[0][2],
         a[0][0] * a[1][3] - a[1][0] * a[0][3], a[0][1] * a[1][2] - a[1][1] * a[0][2],
         a[0][1] * a[1][3] - a[1][1] * a[0][3], a[0][2] * a[1][3] - a[1][2] * a[0][3]]
    c = [a[2][0] * a[3][1] - a[3][0] * a[2][1], a[2][0] * a[3][2] - a[3][0] * a[2][2],
         a[2][0] * a[3][3] - a[3][0] * a[2][3], a[2][1] * a[3][2] - a[3][1] * a[2][2],
         a[2][1] * a[3][3] - a[3][1] * a[2][3], a[2][2] * a[3][3] - a[3][2] * a[2][3]]
    det = s[0] * c[5] - s[1] * c[4] + s[2] * c[3] + s[3] * c[2] - s[4] * c[1] + s[5] * c[0]
    adj = [[a[1][1] * c[5] - a[1][2] * c[4] + a[1][3] * c[3], -a[0][1] * c[5] + a[0][2] * c[4] - a[0][3] * c[3],
            a[3][1] * s[5] - a[3][2] * s[4] + a[3][3] * s[3], -a[2][1] * s[5] + a[2][2] * s[4] - a[2][3] * s[3]],
           [-a[1][0] * c[5] + a[1][2] * c[2] - a[1][3] * c[1], a[0][0] * c[5] - a[0][2] * c[2] + a[0][3] * c[1],
            -a[3][0] * s[5] + a[3][2] * s[2] - a[3][3] * s[1], a[2][0] * s[5] - a[2][2] * s[2] + a[2][3] * s[1]],
           [a[1][0] * c[4] - a[1][1] * c[2] + a[1][3] * c[0], -a[0][0] * c[4] + a[0][1] * c[2] - a[0][3] * c[0],
            a[3][0] * s[4] - a[3][1] * s[2] + a[3][3] * s[0], -a[2][0] * s[4] + a[2][1] * s[2] - a[2][3] * s[0]],
           [-a[1][0] * c[3] + a[1][1] * c[1] - a[1][2] * c[0], a[0][0] * c[3] - a[0][1] * c[1] + a[0][2] * c[0],
            -a[3][0] * s[3] + a[3][1] * s[1] - a[3][2] * s[0], a[2][0] * s[3] - a[2][1] * s[1] + a[2][2] * s[0]]]
    return torch.stack([torch.stack(row, -1) for row in adj], -2) / det[..., None, None]


def invert(m):
    """(..., 4, 4) -> the inverse: torch.linalg.inv, or inverse_4x4 while exporting to ONNX (no matrix inverse)."""
    return inverse_4x4(m) if torch.onnx.is_in_onnx_export() else torch.linalg.inv(m)


def image_to_lidar(lidar2img):
    """(..., 4, 4) lidar2img -> its inverse, computed in float64: lidar2img mixes focal lengths (~1e3) with
    rotations, and a float32 inverse loses millimetres."""
    return invert(lidar2img.double()).float()


def camera_rays(lidar2img, pad_shape, feat_hw, offset=0.5):
    """lidar2img (B, N, 4, 4) -> camera centres (B, N, 3) and unit directions (B, N, H_f*W_f, 3) of the rays
    through the feature cells' pixels (cell_pixels), in the LiDAR frame."""
    v, u = cell_pixels(feat_hw, pad_shape, lidar2img.device, offset)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    # the image point (u d, v d, d) is d * (u, v, 1) + 0: its LiDAR point is d * direction + centre
    pixels = torch.stack([uu, vv, torch.ones_like(uu)], -1).view(1, 1, -1, 3)  # (1, 1, H*W, 3)
    img2lidar = image_to_lidar(lidar2img)
    directions = pixels @ img2lidar[..., :3, :3].transpose(-1, -2)
    return img2lidar[..., :3, 3], directions / directions.norm(dim=-1, keepdim=True)


def frustum_points(lidar2img, pad_shape, feat_hw, depths, position_range, offset=0.5):
    """lidar2img (B, N, 4, 4) -> (B, N, H_f*W_f*D, 3) float32: every feature cell's pixel (cell_pixels) at every
    depth of `depths` (D,), lifted to LiDAR and normalised to fractions of position_range; cell-major, depth-minor."""
    H, W = feat_hw
    D = depths.numel()
    v, u = cell_pixels(feat_hw, pad_shape, lidar2img.device, offset)
    vv, uu, dd = torch.meshgrid(v, u, depths, indexing="ij")  # (H, W, D) each
    frustum = torch.stack([uu * dd, vv * dd, dd], -1).view(1, 1, H * W * D, 3)  # image coords times depth
    img2lidar = image_to_lidar(lidar2img)
    with torch.autocast(lidar2img.device.type, enabled=False):  # geometry stays float32 under AMP
        points = transform_points(frustum.float(), img2lidar)  # (B, N, H*W*D, 3) LiDAR
        return normalize_points(points, position_range)


def padding_mask(img_shape, pad_shape, feat_hw, offset=0.5):
    """img_shape (B, 2) valid (H, W), pad_shape (H_pad, W_pad) -> (B, H_f, W_f) True where a feature
    cell's pixel (cell_pixels) lies in the padding. With corners this is the official nearest-neighbour
    downsampling of the pixel mask."""
    v, u = cell_pixels(feat_hw, pad_shape, img_shape.device, offset)
    return (v[None, :, None] >= img_shape[:, 0, None, None]) | (u[None, None, :] >= img_shape[:, 1, None, None])


def key_padding(mask, batch_size):
    """Padding mask of the tokens (any shape, batch first) -> the attention's key padding mask (B, tokens), or None
    where nothing is padded: None keeps SDPA's fused kernels. An exported graph always takes the mask, since
    img_shape is one of its inputs."""
    return mask.reshape(batch_size, -1) if torch.onnx.is_in_onnx_export() or mask.any() else None


def multiview_sine(mask, num_feats, temperature=10000, eps=1e-6):
    """mask (B, N, H, W), True at padding -> (B*N, 3*num_feats, H, W): the official PETR's 2D embedding
    (SinePositionalEncoding3D), channels [camera, y, x]. Each coordinate is the cumulative count of valid
    cells along its axis (cameras in their order), scaled to (0, 2 pi] by the last; each part is the sines
    of the even frequencies followed by the cosines of the odd ones (blocks, unlike the interleaved 2D sine)."""
    valid = (~mask).float()
    n, y, x = valid.cumsum(1), valid.cumsum(2), valid.cumsum(3)
    n = n / (n[:, -1:] + eps) * (2 * math.pi)
    y = y / (y[:, :, -1:] + eps) * (2 * math.pi)
    x = x / (x[..., -1:] + eps) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    parts = []
    for coord in (n, y, x):
        pos = coord[..., None] / dim_t  # (B, N, H, W, F)
        parts += [pos[..., 0::2].sin(), pos[..., 1::2].cos()]
    return torch.cat(parts, -1).flatten(0, 1).permute(0, 3, 1, 2)


def ray_bias_scales(num_heads):
    """(M,) initial log-widths of the ray bias: one feature cell (~3 degrees at stride 16) to a near object."""
    return torch.linspace(math.log(400.0), math.log(6.0), num_heads)


def ray_attention_bias(reference, centres, directions, log_scale, pc_range):
    """reference (B, Q, 3) fractions of pc_range, camera_rays' centres (B, N, 3) and directions
    (B, N, H_f*W_f, 3), log_scale (M,) -> cross-attention bias scale_m * cos(angle between a cell's ray and the
    direction from the cell's camera to the reference point), scale_m = exp(log_scale_m), as a LowRankBias of
    rank 3 N: per camera, the unit vectors towards the point (queries) dotted with the cells' ray directions
    (keys), zero for other cameras' cells. (Softmax ignores a constant per query: this is scale_m * (cos - 1)
    up to one.)"""
    points = denormalize_points(reference, pc_range)  # (B, Q, 3) metres
    to_point = points[:, :, None] - centres[:, None]  # (B, Q, N, 3)
    to_point = to_point / to_point.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    B, Q, N, _ = to_point.shape
    scale = log_scale.exp().view(1, -1, 1, 1)  # (1, M, 1, 1)
    query = scale * to_point.reshape(B, 1, Q, N * 3)  # (B, M, Q, 3N)
    HW = directions.shape[2]
    own_camera = torch.eye(N, device=directions.device, dtype=directions.dtype).view(1, N, 1, N, 1)
    key = (directions[:, :, :, None] * own_camera).reshape(B, N * HW, N * 3)  # keys in memory order
    return LowRankBias(query, key)


class CameraMapHead(nn.Sequential):
    """Optional (not in the official PETR): a dense map of every camera, trained on what the camera sees
    (core.box_coder_mono.CameraMapCriterion) and read by nothing at inference. The depth-bin map (the frustum's
    own depth bins plus background): the position embedding says where each depth of a cell's ray lies, this term
    makes the features say which depth holds an object. The class heatmap of the projected box centres: which
    cells hold the centre of an object of which class. Both are signals per cell that a from-scratch model
    otherwise gets only through the set loss. `prior`: the initial sigmoid output of every cell (a heatmap's)."""

    def __init__(self, in_channels, out_channels, prior=None):
        super().__init__(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(in_channels, out_channels, 1))
        if prior is not None:
            nn.init.constant_(self[2].bias, -math.log((1 - prior) / prior))

    def predict(self, x, img_shape, pad_shape):
        """x (B*N, C, H, W) features of B rigs of N cameras, img_shape (B, 2) valid (H, W) -> CameraMapPredictions
        with logits (B*N, out_channels, H, W)."""
        N = len(x) // len(img_shape)
        valid = img_shape.flip(-1).float() / img_shape.new_tensor(pad_shape[::-1]).float()  # (B, 2) w, h
        return CameraMapPredictions(self(x), valid.repeat_interleave(N, 0))


class PETRHead(nn.Module):
    def __init__(self, in_channels, num_classes, pc_range, num_queries=900, embed_dims=256, num_heads=8,
                 num_decoder_layers=6, ffn_dims=2048, dropout=0.1, in_level=0, depth_num=64, depth_start=1.0,
                 position_range=(-61.2, -61.2, -10.0, 61.2, 61.2, 10.0), with_2d_pe=True, query_content=False,
                 ray_bias=False, with_box_refine=False, cell_point="centre", with_multiview=False,
                 depth_supervision=False, heatmap_supervision=False):
        super().__init__()
        if cell_point not in CELL_OFFSETS:
            raise Bev3dError(f"model.head.cell_point must be one of {sorted(CELL_OFFSETS)}, got {cell_point!r}.")
        self.in_level, self.pc_range, self.position_range = in_level, list(pc_range), list(position_range)
        self.num_queries, self.with_box_refine = num_queries, with_box_refine
        self.cell_offset = CELL_OFFSETS[cell_point]
        self.register_buffer("depths", depth_bins(depth_num, depth_start, position_range[3]), persistent=False)
        self.input_proj = nn.Conv2d(in_channels, embed_dims, 1)
        self.position_encoder = nn.Sequential(
            nn.Conv2d(depth_num * 3, embed_dims * 4, 1), nn.ReLU(inplace=True), nn.Conv2d(embed_dims * 4, embed_dims, 1))
        # 2D sine embedding of each camera's own pixel grid: no camera index, so the camera order is irrelevant.
        # The official one (with_multiview) also encodes the camera index.
        self.with_multiview = with_2d_pe and with_multiview
        self.sine_2d = None
        if with_2d_pe and not with_multiview:
            self.sine_2d = PositionEmbeddingSine(embed_dims // 2, normalize=True)
            self.adapt_pos2d = nn.Sequential(
                nn.Conv2d(embed_dims, embed_dims, 1), nn.ReLU(inplace=True), nn.Conv2d(embed_dims, embed_dims, 1))
        if self.with_multiview:
            self.adapt_pos3d = nn.Sequential(nn.Conv2d(embed_dims * 3 // 2, embed_dims * 4, 1), nn.ReLU(inplace=True),
                                             nn.Conv2d(embed_dims * 4, embed_dims, 1))
        self.reference_points = nn.Embedding(num_queries, 3)
        nn.init.uniform_(self.reference_points.weight, 0, 1)
        # Official PETR starts the decoder from zero content. Trained from scratch (no pretrained backbone),
        # every query then reads the same near-uniform global average in the first layer and the class loss
        # stalls on the all-queries-alike plateau; a learned per-query content makes them separable at once.
        self.query_content = nn.Embedding(num_queries, embed_dims) if query_content else None
        # Optional geometric prior (not in the official PETR): a query attends less to cells whose camera ray
        # points away from its reference point, with a learned log-width per head. With it, a from-scratch
        # PETR does not have to discover from the loss alone which tokens its anchor sees. The initial widths
        # span one feature cell (~3 degrees at stride 16, 1 - cos = 0.0014) to a near object (~30 degrees,
        # 0.13). Learned widths (and anchors that get a gradient through the bias) beat fixed ones
        # (docs/models.md).
        self.ray_bias_scale = None
        if ray_bias:
            self.ray_bias_scale = nn.Parameter(ray_bias_scales(num_heads))
        self.depth_head = CameraMapHead(embed_dims, depth_num + 1) if depth_supervision else None
        self.query_embedding = nn.Sequential(
            nn.Linear(embed_dims * 3 // 2, embed_dims), nn.ReLU(inplace=True), nn.Linear(embed_dims, embed_dims))
        self.decoder = TransformerDecoder(num_decoder_layers, embed_dims, num_heads=num_heads, ffn_dims=ffn_dims,
                                          dropout=dropout, cross_attn=LowRankBiasAttention if ray_bias else
                                          MultiheadAttention)
        # Shared across layers as in the official PETR, where every layer uses the same anchors. With refinement
        # (as in DETR3D) each layer re-anchors its queries, its query positions and its ray bias on the centres
        # the previous layer predicted, and has branches of its own.
        self.branches = PredictionBranches(embed_dims, num_classes, num_decoder_layers, pc_range,
                                           shared=not with_box_refine)
        self.heatmap_head = None
        if heatmap_supervision:
            self.heatmap_head = CameraMapHead(embed_dims, num_classes, HEATMAP_PRIOR)

    def position_embedding(self, lidar2img, pad_shape, feat_hw):
        """lidar2img (B, N, 4, 4) -> (B*N, D*3, H, W) inverse-sigmoid frustum points in position_range."""
        H, W = feat_hw
        B, N = lidar2img.shape[:2]
        D = self.depths.numel()
        with torch.autocast(lidar2img.device.type, enabled=False):  # geometry stays float32 under AMP
            points = inverse_sigmoid(frustum_points(lidar2img, pad_shape, feat_hw, self.depths, self.position_range,
                                                    self.cell_offset))
        return points.view(B * N, H, W, D * 3).permute(0, 3, 1, 2)

    def ray_attention_bias(self, reference, centres, directions):
        """The module-level ray_attention_bias with this head's learned per-head log-widths."""
        return ray_attention_bias(reference, centres, directions, self.ray_bias_scale, self.pc_range)

    def forward(self, feats, lidar2img, img_shape, pad_shape, denoising=None):
        """feats: list of (B, N, C_in, H_l, W_l); lidar2img (B, N, 4, 4); img_shape (B, 2) valid (H, W);
        denoising: DenoisingQueries or None -> SetPredictions (L layers, box codes with centres in metres)."""
        x = feats[self.in_level]
        B, N, _, H, W = x.shape
        mask = padding_mask(img_shape, pad_shape, (H, W), self.cell_offset)[:, None].expand(B, N, H, W)
        mask = mask.reshape(B * N, H, W)
        memory = self.input_proj(x.flatten(0, 1))  # (B*N, C, H, W)
        # the per-camera maps are a training signal only: inference does not compute them
        depth_map = heatmap = None
        if self.depth_head is not None and self.training:
            depth_map = self.depth_head.predict(memory, img_shape, pad_shape)
        if self.heatmap_head is not None and self.training:
            heatmap = self.heatmap_head.predict(memory, img_shape, pad_shape)
        pos = self.position_encoder(self.position_embedding(lidar2img, pad_shape, (H, W)))
        if self.sine_2d is not None:
            pos = pos + self.adapt_pos2d(self.sine_2d(mask))
        if self.with_multiview:
            pos = pos + self.adapt_pos3d(multiview_sine(mask.view(B, N, H, W), memory.shape[1] // 2))
        C = memory.shape[1]
        memory = memory.view(B, N, C, H * W).permute(0, 1, 3, 2).reshape(B, N * H * W, C)
        pos = pos.view(B, N, C, H * W).permute(0, 1, 3, 2).reshape(B, N * H * W, C)

        reference = self.reference_points.weight[None].expand(B, -1, -1)  # (B, Q, 3) fractions of pc_range
        if self.query_content is None:
            content = reference.new_zeros(*reference.shape[:2], C)
        else:
            content = self.query_content.weight[None].expand(B, -1, -1)  # (B, Q, C)
        self_attn_mask = None
        if denoising is not None:
            reference = torch.cat([denoising.reference, reference], 1)  # (B, P + Q, 3)
            content = torch.cat([content.new_zeros(B, denoising.num_queries, C), content], 1)
            self_attn_mask = denoising.attn_mask
        key_padding_mask = key_padding(mask, B)
        rays = None if self.ray_bias_scale is None else camera_rays(lidar2img, pad_shape, (H, W), self.cell_offset)
        cls_out, box_out = [], []
        for i, layer in enumerate(self.decoder.layers):
            if i == 0 or self.with_box_refine:
                query_pos = self.query_embedding(sine_embed_points(reference, C // 2))
                cross_attn_mask = None if rays is None else self.ray_attention_bias(reference, *rays)
            content = layer(content, memory, query_pos, pos, key_padding_mask, self_attn_mask, cross_attn_mask)
            logits, boxes, centres = self.branches(i, self.decoder.norm(content), reference)
            cls_out.append(logits)
            box_out.append(boxes)
            if self.with_box_refine:
                # Gradients do not flow through the next layer's anchors (as in Deformable DETR and DETR3D).
                reference = centres.detach()
        out = split_denoising(torch.stack(cls_out), torch.stack(box_out), denoising)
        out.depth_map, out.heatmap = depth_map, heatmap
        return out


def check_in_level(cfg):
    """The head reads one neck level: model.head.in_level must be one of them."""
    m, h = cfg.model, cfg.model.head
    if h.in_level >= m.neck.num_outs:
        raise Bev3dError(f"model.head.in_level ({h.in_level}) must name one of the neck's "
                         f"{m.neck.num_outs} levels (model.neck.num_outs).")


def build_head(cfg):
    m, h = cfg.model, cfg.model.head
    if h.with_multiview and not h.with_2d_pe:
        raise Bev3dError("model.head.with_multiview is the official form of the 2D position embedding: it needs "
                         "model.head.with_2d_pe: true.")
    check_in_level(cfg)
    return PETRHead(m.neck.out_channels, h.num_classes, m.pc_range, num_queries=h.num_queries,
                    embed_dims=h.embed_dims, num_heads=h.num_heads, num_decoder_layers=h.num_decoder_layers,
                    ffn_dims=h.ffn_dims, dropout=h.dropout, in_level=h.in_level, depth_num=h.depth_num,
                    depth_start=h.depth_start, position_range=h.position_range, with_2d_pe=h.with_2d_pe,
                    query_content=h.query_content, ray_bias=h.ray_bias, with_box_refine=h.with_box_refine,
                    cell_point=h.cell_point, with_multiview=h.with_multiview,
                    depth_supervision=h.depth_supervision, heatmap_supervision=h.heatmap_supervision)


def build(cfg):
    """Config -> MultiViewDetector with a PETR head."""
    return detector.build(cfg, build_head)
