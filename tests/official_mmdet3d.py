"""Stand-ins for the official PETR (megvii-research/PETR) and DETR3D (WangYueFt/detr3d, mmdet3d 1.x) models:
module trees whose state_dict() has the official key names (docs/models.md, "Official checkpoints"), with
forwards written from the official code's formulas (test-only, independent of bev3d's heads), and the key
sets of the official mmdet ResNet / VoVNetCP backbones. Eval-mode forwards (no dropout)."""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.geometry import intrinsics_4x4, transform_matrix

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
POSITION_RANGE = [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0]


def rig(pad_shape, num_cams=6, f=60.0):
    """(1, N, 4, 4) float64 lidar2img of N cameras at (0.5, 0, 1.6) looking around the car."""
    mats = []
    for yaw in np.linspace(0, 360, num_cams, endpoint=False):
        t = np.radians(yaw + 7.0)
        fwd, right = np.array([np.cos(t), np.sin(t), 0.0]), np.array([np.sin(t), -np.cos(t), 0.0])
        lidar2cam = transform_matrix([0.5, 0.0, 1.6], np.stack([right, [0.0, 0.0, -1.0], fwd], 1), inverse=True)
        K = np.array([[f, 0, pad_shape[1] / 2 - 3.0], [0, f, pad_shape[0] / 2 + 2.0], [0, 0, 1]])
        mats.append(intrinsics_4x4(K) @ lidar2cam)
    return torch.tensor(np.stack(mats))[None]


def inverse_sigmoid(x, eps=1e-5):
    """mmdet's inverse_sigmoid."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def randomize(module, generator, scale=0.2):
    """Random weights around each init (LayerNorm scales around 1), so that every tensor matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale
            p.copy_(1 + noise if name.endswith("weight") and p.dim() == 1 else noise)
    return module


# ----------------------------------------------------------------------------- backbones, necks


def resnet_keys(depth, base=64, dcn_stages=(2, 3)):
    """mmdet ResNet (caffe or pytorch: the same keys) key -> shape, DCNv2's conv_offset in `dcn_stages`."""
    keys = {"conv1.weight": (base, 3, 7, 7)}

    def bn(name, c):
        keys.update({f"{name}.{t}": (c,) for t in ("weight", "bias", "running_mean", "running_var")})
        keys[f"{name}.num_batches_tracked"] = ()

    bn("bn1", base)
    inplanes = base
    for s, n in enumerate({50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]):
        planes = base * 2 ** s
        for b in range(n):
            p = f"layer{s + 1}.{b}."
            keys[p + "conv1.weight"] = (planes, inplanes if b == 0 else planes * 4, 1, 1)
            keys[p + "conv2.weight"] = (planes, planes, 3, 3)
            keys[p + "conv3.weight"] = (planes * 4, planes, 1, 1)
            for i, c in ((1, planes), (2, planes), (3, planes * 4)):
                bn(f"{p}bn{i}", c)
            if s in dcn_stages:
                keys[p + "conv2.conv_offset.weight"] = (27, planes, 3, 3)
                keys[p + "conv2.conv_offset.bias"] = (27,)
            if b == 0:
                keys[p + "downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(p + "downsample.1", planes * 4)
        inplanes = planes * 4
    return keys


def zeros_of(keys, prefix):
    """key -> shape as a state dict of zeros (BatchNorm step counters as int64), keys under `prefix`."""
    return {prefix + k: torch.zeros(s, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
            for k, s in keys.items()}


class ConvModule(nn.Module):
    """mmcv ConvModule without norm / activation: its Conv2d is `.conv`."""

    def __init__(self, c_in, c_out, kernel, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2)

    def forward(self, x):
        return self.conv(x)


class OfficialFPN(nn.Module):
    """mmdet FPN (add_extra_convs 'on_output', relu_before_extra_convs) or, `cpfpn`, PETR's CPFPN (a 3x3 output
    conv on level 0 only, the other outputs bare laterals)."""

    def __init__(self, in_channels, out_channels, num_outs, start_level=0, cpfpn=False):
        super().__init__()
        self.start_level, self.num_outs, self.cpfpn = start_level, num_outs, cpfpn
        n = len(in_channels) - start_level
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels[start_level:])
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3) for _ in range(1 if cpfpn else n))
        for _ in range(num_outs - n):
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, 2))

    def forward(self, inputs):
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        if self.cpfpn:
            return [self.fpn_convs[0](laterals[0])] + laterals[1:]
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals))]
        for i in range(len(laterals), self.num_outs):
            outs.append(self.fpn_convs[i](outs[-1] if i == len(laterals) else F.relu(outs[-1])))
        return outs


# ----------------------------------------------------------------------------- mmcv transformer pieces


class Attention(nn.Module):
    """mmcv MultiheadAttention: identity + attn(q + query_pos, k + key_pos, v), nn.MultiheadAttention as `.attn`."""

    def __init__(self, embed_dims, num_heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads)

    def forward(self, query, key, value, query_pos, key_pos, key_padding_mask=None):  # (L, B, C)
        return query + self.attn(query + query_pos, key + key_pos, value, key_padding_mask=key_padding_mask)[0]


class FFN(nn.Module):
    """mmcv FFN: identity + layers(x), layers = [[Linear, ReLU, Dropout], Linear, Dropout]."""

    def __init__(self, embed_dims, ffn_dims):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(embed_dims, ffn_dims), nn.ReLU(), nn.Dropout(0.0)),
                                    nn.Linear(ffn_dims, embed_dims), nn.Dropout(0.0))

    def forward(self, x):
        return x + self.layers(x)


def cls_branch(embed_dims, num_classes):
    layers = []
    for _ in range(2):
        layers += [nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(embed_dims, num_classes))


def reg_branch(embed_dims):
    return nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims), nn.ReLU(),
                         nn.Linear(embed_dims, 10))


def box_outputs(tmp, reference, pc_range):
    """The official heads' box output: centres (0, 1, 4) sigmoid(raw + inverse_sigmoid(ref)) in metres."""
    reference = inverse_sigmoid(reference)
    tmp = tmp.clone()
    tmp[..., 0:2] = (tmp[..., 0:2] + reference[..., 0:2]).sigmoid()
    tmp[..., 4:5] = (tmp[..., 4:5] + reference[..., 2:3]).sigmoid()
    tmp[..., 0:1] = tmp[..., 0:1] * (pc_range[3] - pc_range[0]) + pc_range[0]
    tmp[..., 1:2] = tmp[..., 1:2] * (pc_range[4] - pc_range[1]) + pc_range[1]
    tmp[..., 4:5] = tmp[..., 4:5] * (pc_range[5] - pc_range[2]) + pc_range[2]
    return tmp


def official_code_to_bev3d(box, family):
    """The official box outputs (..., 10) in bev3d's code (docs/conventions.md): mmdet3d 0.17's yaw' is
    -yaw - pi/2 (sin yaw = -cos yaw', cos yaw = -sin yaw'); mmdet3d 1.x's sizes are (l, w)."""
    out = box.clone()
    if family.endswith("mmdet3d1"):
        out[..., 2], out[..., 3] = box[..., 3], box[..., 2]
    else:
        out[..., 6], out[..., 7] = -box[..., 7], -box[..., 6]
    return out


# ----------------------------------------------------------------------------- PETR


class PETRLayer(nn.Module):
    def __init__(self, embed_dims, num_heads, ffn_dims):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(embed_dims, num_heads), Attention(embed_dims, num_heads)])
        self.ffns = nn.ModuleList([FFN(embed_dims, ffn_dims)])
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query, memory, query_pos, pos, mask):
        query = self.norms[0](self.attentions[0](query, query, query, query_pos, query_pos))
        query = self.norms[1](self.attentions[1](query, memory, memory, query_pos, pos, mask))
        return self.norms[2](self.ffns[0](query))


class Decoder(nn.Module):
    def __init__(self, layers, post_norm):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if post_norm is not None:
            self.post_norm = post_norm


class Transformer(nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder


def pos2posemb3d(pos, num_feats, temperature=10000):
    pos = pos * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    embs = []
    for i in (1, 0, 2):  # y, x, z
        p = pos[..., i, None] / dim_t
        embs.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(embs, -1)


def sine_3d(mask, num_feats, temperature=10000, eps=1e-6):
    """SinePositionalEncoding3D(normalize=True): mask (B, N, H, W) -> (B, N, 3 F, H, W)."""
    not_mask = 1 - mask.to(torch.int)
    embeds = []
    for dim in (1, 2, 3):
        e = not_mask.cumsum(dim, dtype=torch.float32)
        last = e.narrow(dim, e.shape[dim] - 1, 1)
        embeds.append((e + 0.0) / (last + eps) * (2 * math.pi))
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    B, N, H, W = mask.shape
    parts = []
    for e in embeds:  # n, y, x
        p = e[..., None] / dim_t
        # stack at dim 4 of a 5-D tensor, then view: all sines, then all cosines
        parts.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=4).view(B, N, H, W, -1))
    return torch.cat(parts, dim=4).permute(0, 1, 4, 2, 3)


class OfficialPETRHead(nn.Module):
    """PETRHead (LID, with_position, with_multiview) with its transformer; 6 references of one branch pair."""

    def __init__(self, in_channels=256, embed_dims=256, num_heads=8, num_layers=6, ffn_dims=2048, num_queries=900,
                 depth_num=64, num_classes=10, num_pred=6):
        super().__init__()
        C = embed_dims
        self.embed_dims, self.depth_num = C, depth_num
        self.code_weights = nn.Parameter(torch.tensor([1.0] * 8 + [0.2, 0.2]), requires_grad=False)
        self.input_proj = nn.Conv2d(in_channels, C, 1)
        fc_cls, fc_reg = cls_branch(C, num_classes), reg_branch(C)
        self.cls_branches = nn.ModuleList([fc_cls for _ in range(num_pred)])
        self.reg_branches = nn.ModuleList([fc_reg for _ in range(num_pred)])
        self.adapt_pos3d = nn.Sequential(nn.Conv2d(C * 3 // 2, C * 4, 1), nn.ReLU(), nn.Conv2d(C * 4, C, 1))
        self.position_encoder = nn.Sequential(nn.Conv2d(depth_num * 3, C * 4, 1), nn.ReLU(), nn.Conv2d(C * 4, C, 1))
        self.reference_points = nn.Embedding(num_queries, 3)
        self.query_embedding = nn.Sequential(nn.Linear(C * 3 // 2, C), nn.ReLU(), nn.Linear(C, C))
        self.transformer = Transformer(Decoder([PETRLayer(C, num_heads, ffn_dims) for _ in range(num_layers)],
                                               nn.LayerNorm(C)))

    def position_embedding(self, H, W, lidar2img, pad_shape):
        B, N = lidar2img.shape[:2]
        pad_h, pad_w = pad_shape
        coords_h = torch.arange(H).float() * pad_h / H
        coords_w = torch.arange(W).float() * pad_w / W
        index = torch.arange(self.depth_num).float()
        bin_size = (POSITION_RANGE[3] - 1.0) / (self.depth_num * (1 + self.depth_num))
        coords_d = 1.0 + bin_size * index * (index + 1)
        D = self.depth_num
        coords = torch.stack(torch.meshgrid([coords_w, coords_h, coords_d], indexing="ij")).permute(1, 2, 3, 0)
        coords = torch.cat((coords, torch.ones_like(coords[..., :1])), -1)
        coords[..., :2] = coords[..., :2] * torch.maximum(coords[..., 2:3], torch.ones_like(coords[..., 2:3]) * 1e-5)
        img2lidars = coords.new_tensor(np.linalg.inv(lidar2img.numpy()))  # (B, N, 4, 4)
        coords = coords.view(1, 1, W, H, D, 4, 1).repeat(B, N, 1, 1, 1, 1, 1)
        img2lidars = img2lidars.view(B, N, 1, 1, 1, 4, 4).repeat(1, 1, W, H, D, 1, 1)
        coords3d = torch.matmul(img2lidars, coords).squeeze(-1)[..., :3]
        r = POSITION_RANGE
        for i in range(3):
            coords3d[..., i:i + 1] = (coords3d[..., i:i + 1] - r[i]) / (r[i + 3] - r[i])
        coords3d = coords3d.permute(0, 1, 4, 5, 3, 2).contiguous().view(B * N, -1, H, W)
        return self.position_encoder(inverse_sigmoid(coords3d)).view(B, N, self.embed_dims, H, W)

    def forward(self, feats, lidar2img, img_shape, pad_shape, pc_range=PC_RANGE):
        """feats (B, N, C_in, H, W), lidar2img (B, N, 4, 4) float64, img_shape [(h, w)] per sample ->
        class logits and box outputs (L, B, Q, ...) in the official box code."""
        B, N, _, H, W = feats.shape
        masks = feats.new_ones(B, N, *pad_shape)
        for b, (h, w) in enumerate(img_shape):
            masks[b, :, :h, :w] = 0
        x = self.input_proj(feats.flatten(0, 1)).view(B, N, self.embed_dims, H, W)
        masks = F.interpolate(masks, size=(H, W)).to(torch.bool)
        pos_embed = self.position_embedding(H, W, lidar2img, pad_shape)
        sin_embed = self.adapt_pos3d(sine_3d(masks, self.embed_dims // 2).flatten(0, 1)).view(x.size())
        pos_embed = pos_embed + sin_embed
        reference_points = self.reference_points.weight
        query_embeds = self.query_embedding(pos2posemb3d(reference_points, self.embed_dims // 2))
        C = self.embed_dims
        memory = x.permute(1, 3, 4, 0, 2).reshape(-1, B, C)
        pos_embed = pos_embed.permute(1, 3, 4, 0, 2).reshape(-1, B, C)
        query_pos = query_embeds.unsqueeze(1).repeat(1, B, 1)
        target = torch.zeros_like(query_pos)
        decoder, intermediate = self.transformer.decoder, []
        for layer in decoder.layers:
            target = layer(target, memory, query_pos, pos_embed, masks.view(B, -1))
            intermediate.append(decoder.post_norm(target))
        outs_dec = torch.nan_to_num(torch.stack(intermediate).transpose(1, 2))  # (L, B, Q, C)
        reference = reference_points[None].repeat(B, 1, 1)
        cls = torch.stack([self.cls_branches[i](outs_dec[i]) for i in range(len(outs_dec))])
        box = torch.stack([box_outputs(self.reg_branches[i](outs_dec[i]), reference, pc_range)
                           for i in range(len(outs_dec))])
        return cls, box


# ----------------------------------------------------------------------------- DETR3D


class DETR3DCrossAtten(nn.Module):
    def __init__(self, embed_dims, num_levels, num_cams, projection):
        super().__init__()
        self.num_levels, self.num_cams, self.projection = num_levels, num_cams, projection
        self.attention_weights = nn.Linear(embed_dims, num_cams * num_levels)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.position_encoder = nn.Sequential(
            nn.Linear(3, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True),
            nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True))

    def forward(self, query, query_pos, reference_points, feats, lidar2img, img_shape, pad_shape, pc_range):
        inp_residual = query
        query = (query + query_pos).permute(1, 0, 2)
        bs, num_query, _ = query.size()
        attention_weights = self.attention_weights(query).view(bs, 1, num_query, self.num_cams, 1, self.num_levels)
        reference_points_3d, output, mask = self.feature_sampling(feats, reference_points, lidar2img, img_shape,
                                                                  pad_shape, pc_range)
        attention_weights = attention_weights.sigmoid() * torch.nan_to_num(mask)
        output = (torch.nan_to_num(output) * attention_weights).sum(-1).sum(-1).sum(-1).permute(2, 0, 1)
        output = self.output_proj(output)
        pos_feat = self.position_encoder(inverse_sigmoid(reference_points_3d)).permute(1, 0, 2)
        return output + inp_residual + pos_feat

    def feature_sampling(self, mlvl_feats, reference_points, lidar2img, img_shape, pad_shape, pc_range):
        """WangYueFt's feature_sampling ("img_shape": divide by sample 0's valid size, visible in (-1, 1) of it)
        or mmdet3d 1.x's ("pad_shape": divide by the padded size)."""
        lidar2img = reference_points.new_tensor(lidar2img.numpy())
        reference_points = reference_points.clone()
        reference_points_3d = reference_points.clone()
        for i in range(3):
            reference_points[..., i:i + 1] = reference_points[..., i:i + 1] * (pc_range[i + 3] - pc_range[i]) \
                + pc_range[i]
        reference_points = torch.cat((reference_points, torch.ones_like(reference_points[..., :1])), -1)
        B, num_query = reference_points.size()[:2]
        num_cam = lidar2img.size(1)
        reference_points = reference_points.view(B, 1, num_query, 4).repeat(1, num_cam, 1, 1).unsqueeze(-1)
        lidar2img = lidar2img.view(B, num_cam, 1, 4, 4).repeat(1, 1, num_query, 1, 1)
        cam = torch.matmul(lidar2img, reference_points).squeeze(-1)
        eps = 1e-5
        mask = cam[..., 2:3] > eps
        cam = cam[..., 0:2] / torch.maximum(cam[..., 2:3], torch.ones_like(cam[..., 2:3]) * eps)
        h, w = img_shape[0] if self.projection == "img_shape" else pad_shape
        cam[..., 0] /= w
        cam[..., 1] /= h
        cam = (cam - 0.5) * 2
        mask = (mask & (cam[..., 0:1] > -1.0) & (cam[..., 0:1] < 1.0) & (cam[..., 1:2] > -1.0)
                & (cam[..., 1:2] < 1.0))
        mask = mask.view(B, num_cam, 1, num_query, 1, 1).permute(0, 2, 3, 1, 4, 5)
        sampled_feats = []
        for feat in mlvl_feats:
            B, N, C, H, W = feat.size()
            sampled = F.grid_sample(feat.view(B * N, C, H, W), cam.view(B * N, num_query, 1, 2), align_corners=False)
            sampled_feats.append(sampled.view(B, N, C, num_query, 1).permute(0, 2, 3, 1, 4))
        sampled_feats = torch.stack(sampled_feats, -1).view(B, C, num_query, num_cam, 1, len(mlvl_feats))
        return reference_points_3d, sampled_feats, mask


class DETR3DLayer(nn.Module):
    def __init__(self, embed_dims, num_heads, ffn_dims, num_levels, num_cams, projection):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(embed_dims, num_heads),
                                         DETR3DCrossAtten(embed_dims, num_levels, num_cams, projection)])
        self.ffns = nn.ModuleList([FFN(embed_dims, ffn_dims)])
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query, query_pos, reference, *sampling):
        query = self.norms[0](self.attentions[0](query, query, query, query_pos, query_pos))
        query = self.norms[1](self.attentions[1](query, query_pos, reference, *sampling))
        return self.norms[2](self.ffns[0](query))


class DETR3DTransformer(nn.Module):
    def __init__(self, decoder, embed_dims):
        super().__init__()
        self.decoder = decoder
        self.reference_points = nn.Linear(embed_dims, 3)


class OfficialDETR3DHead(nn.Module):
    """Detr3DHead (with_box_refine: distinct branches per layer) with its transformer; `projection`
    "img_shape" (WangYueFt) or "pad_shape" (mmdet3d 1.x)."""

    def __init__(self, embed_dims=256, num_heads=8, num_layers=6, ffn_dims=512, num_queries=900, num_levels=4,
                 num_cams=6, num_classes=10, projection="img_shape"):
        super().__init__()
        C = self.embed_dims = embed_dims
        self.code_weights = nn.Parameter(torch.tensor([1.0] * 8 + [0.2, 0.2]), requires_grad=False)
        self.cls_branches = nn.ModuleList(cls_branch(C, num_classes) for _ in range(num_layers))
        self.reg_branches = nn.ModuleList(reg_branch(C) for _ in range(num_layers))
        self.query_embedding = nn.Embedding(num_queries, C * 2)
        layers = [DETR3DLayer(C, num_heads, ffn_dims, num_levels, num_cams, projection) for _ in range(num_layers)]
        self.transformer = DETR3DTransformer(Decoder(layers, None), C)

    def forward(self, feats, lidar2img, img_shape, pad_shape, pc_range=PC_RANGE):
        """feats: list of (B, N, C, H_l, W_l); lidar2img (B, N, 4, 4) float64; img_shape [(h, w)] per sample."""
        bs = feats[0].shape[0]
        query_pos, query = torch.split(self.query_embedding.weight, self.embed_dims, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
        query = query.unsqueeze(0).expand(bs, -1, -1)
        reference_points = self.transformer.reference_points(query_pos).sigmoid()
        init_reference = reference_points
        output, query_pos = query.permute(1, 0, 2), query_pos.permute(1, 0, 2)
        states, references = [], []
        for lid, layer in enumerate(self.transformer.decoder.layers):
            output = layer(output, query_pos, reference_points, feats, lidar2img, img_shape, pad_shape, pc_range)
            tmp = self.reg_branches[lid](output.permute(1, 0, 2))
            new = torch.zeros_like(reference_points)
            new[..., :2] = tmp[..., :2] + inverse_sigmoid(reference_points[..., :2])
            new[..., 2:3] = tmp[..., 4:5] + inverse_sigmoid(reference_points[..., 2:3])
            reference_points = new.sigmoid().detach()
            states.append(output.permute(1, 0, 2))
            references.append(reference_points)
        cls, box = [], []
        for lvl, hs in enumerate(states):
            reference = init_reference if lvl == 0 else references[lvl - 1]
            cls.append(self.cls_branches[lvl](hs))
            box.append(box_outputs(self.reg_branches[lvl](hs), reference, pc_range))
        return torch.stack(cls), torch.stack(box)


def detector_state(backbone, neck, head):
    """The official detector's state dict: img_backbone. / img_neck. / pts_bbox_head. prefixes."""
    state = dict(backbone)
    state.update({f"img_neck.{k}": v for k, v in neck.state_dict().items()})
    state.update({f"pts_bbox_head.{k}": v for k, v in head.state_dict().items()})
    return state


# ----------------------------------------------------------------------------- tiny official checkpoints

PAD = (64, 96)  # (H_pad, W_pad) of the tiny tests; valid images are smaller, so padding matters
SMALL = ["model.backbone.base_channels=8", "model.neck.out_channels=32", "model.head.embed_dims=32",
         "model.head.num_heads=4", "model.head.ffn_dims=64", "model.head.num_decoder_layers=2"]
PETR_SMALL = SMALL + ["model.head.num_queries=20", "model.head.depth_num=8"]
DETR3D_SMALL = SMALL + ["model.head.num_queries=40"]


def tiny_petr(seed=0):
    """A random official PETR R50-DCN (CPFPN on C4, C5) at the widths of PETR_SMALL over
    petr_r50dcn_gridmask_p4_nus -> (state dict, its neck, its head), neck and head in eval mode."""
    g = torch.Generator().manual_seed(seed)
    head = randomize(OfficialPETRHead(32, 32, 4, 2, 64, 20, 8), g).eval()
    with torch.no_grad():
        head.reference_points.weight.uniform_(0, 1, generator=g)
    neck = randomize(OfficialFPN([128, 256], 32, 2, cpfpn=True), g).eval()
    backbone = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in zeros_of(resnet_keys(50, 8), "img_backbone.").items()}
    return detector_state(backbone, neck, head), neck, head


def tiny_detr3d(projection, seed=0):
    """A random official DETR3D R101-DCN (FPN on C3-C5 + 1 extra level) at the widths of DETR3D_SMALL over
    detr3d_r101dcn_gridmask_nus -> (state dict, its neck, its head)."""
    g = torch.Generator().manual_seed(seed)
    head = randomize(OfficialDETR3DHead(32, 4, 2, 64, 40, projection=projection), g).eval()
    neck = randomize(OfficialFPN([32, 64, 128, 256], 32, 4, start_level=1), g).eval()
    backbone = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in zeros_of(resnet_keys(101, 8), "img_backbone.").items()}
    return detector_state(backbone, neck, head), neck, head
