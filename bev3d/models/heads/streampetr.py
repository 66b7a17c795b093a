"""StreamPETR (Wang et al. 2023, exiawsh/StreamPETR): PETR with an object-query memory propagated over frames.

Per frame the decoder runs the learned queries and the `num_propagated` newest memory entries as queries; the
rest of the memory joins every layer's self-attention as extra keys and values (the temporal attention). The
memory is moved into the current frame by the ego motion (bev3d.models.heads.memory), and motion-aware layer
norms tell queries and memory their age, ego motion and velocity. After the decoder, the frame's top
`topk_proposals` queries enter the memory. The image side is Focal-PETR's (the official one): an MLP on the
tokens, an MLN on each token's camera ray, and the frustum position embedding of PETR gated by the token; or, with
`image_tokens="petr"`, PETR's own: a linear projection of the tokens, the frustum embedding plus a per-camera 2D
sine.

The model holds the memory between calls (`StreamingDetector.memory`, `reset_memory()`); `step` is the pure
form `(batch, targets, memory, prev_exists) -> (SetPredictions, memory)`, `export_step` the same on named
tensors. The memory's rows are kept under the samples they were recorded at: a batch row continues the row of its
`prev_token` unless `prev_exists` (set by the streaming loaders at scene and segment starts) is False.
"""

import torch
import torch.nn as nn

from bev3d.errors import Bev3dError
from bev3d.models import detector
from bev3d.models.core.box_coder_3d import denormalize_points, normalize_points
from bev3d.models.core.predictions import split_denoising
from bev3d.models.heads.common import PredictionBranches, sine_embed_points
from bev3d.models.heads.memory import (MLN, StreamMemory, TokenGate, align_memory, empty_memory, motion_code,
                                       push_memory, sine_embed_1d)
from bev3d.models.heads.petr import (CELL_OFFSETS, HEATMAP_PRIOR, CameraMapHead, camera_rays, check_in_level,
                                     depth_bins, frustum_points, key_padding, padding_mask, ray_attention_bias,
                                     ray_bias_scales)
from bev3d.models.heads.ray_bias import LowRankBiasAttention
from bev3d.models.transformer.attention import MultiheadAttention
from bev3d.models.transformer.detr_transformer import TransformerDecoderLayer
from bev3d.models.transformer.position_encoding import PositionEmbeddingSine
from bev3d.models.transformer.utils import inverse_sigmoid

MOTION_DIMS = 180  # motion_code of 15 numbers at 6 frequencies
CONE_DIMS = 8  # focal lengths and two points of a token's ray
CONE_NEAR_OFFSET = 30  # the ray's second point: the depth bin 30 from the far end (the official choice)


class TemporalDecoderLayer(TransformerDecoderLayer):
    """A decoder layer whose self-attention also attends to the memory entries that are not queries."""

    def forward(self, tgt, memory, query_pos, pos, key_padding_mask, self_attn_mask, temp, temp_pos,
                cross_attn_mask=None):
        """tgt (B, Q, C), memory (B, S, C) image tokens, temp (B, T, C) memory entries; positions alike."""
        keys = torch.cat([tgt, temp], 1)
        key_pos = torch.cat([query_pos, temp_pos], 1)
        attended = self.self_attn(tgt, keys, keys, query_pos=query_pos, key_pos=key_pos, attn_mask=self_attn_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.cross_attn(tgt, memory, memory, query_pos=query_pos, key_pos=pos,
                                   key_padding_mask=key_padding_mask, attn_mask=cross_attn_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.ffn(tgt)


class TemporalDecoder(nn.Module):
    def __init__(self, num_layers, embed_dims, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(TemporalDecoderLayer(embed_dims, **layer_kwargs) for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dims)


class StreamPETRHead(nn.Module):
    def __init__(self, in_channels, num_classes, pc_range, num_queries=644, embed_dims=256, num_heads=8,
                 num_decoder_layers=6, ffn_dims=2048, dropout=0.1, in_level=0, depth_num=64, depth_start=1.0,
                 position_range=(-61.2, -61.2, -10.0, 61.2, 61.2, 10.0), cell_point="centre", query_content=False,
                 memory_len=1024, topk_proposals=256, num_propagated=256, with_ego_pos=True,
                 velocity_extrapolation=False, ray_bias=False, depth_supervision=False,
                 heatmap_supervision=False, image_tokens="focal"):
        super().__init__()
        if image_tokens not in ("focal", "petr"):
            raise Bev3dError(f"model.head.image_tokens must be 'focal' or 'petr', got {image_tokens!r}.")
        if not num_propagated <= memory_len or not topk_proposals <= num_queries + num_propagated:
            raise Bev3dError(f"model.head: num_propagated ({num_propagated}) must be <= memory_len ({memory_len}) and "
                             f"topk_proposals ({topk_proposals}) <= num_queries + num_propagated "
                             f"({num_queries + num_propagated}).")
        C = embed_dims
        self.in_level, self.pc_range, self.position_range = in_level, list(pc_range), list(position_range)
        self.num_learned, self.num_propagated = num_queries, num_propagated
        self.num_queries = num_queries + num_propagated  # what the decoder runs (and the denoising mask sees)
        self.memory_len, self.topk_proposals = memory_len, topk_proposals
        self.embed_dims, self.with_ego_pos = C, with_ego_pos
        self.velocity_extrapolation = velocity_extrapolation
        self.cell_offset = CELL_OFFSETS[cell_point]
        self.register_buffer("depths", depth_bins(depth_num, depth_start, position_range[3]), persistent=False)
        # (built in this order so that the default's initial weights do not depend on the option)
        self.focal_tokens = image_tokens == "focal"
        if self.focal_tokens:
            self.memory_embed = nn.Sequential(nn.Linear(in_channels, C), nn.ReLU(), nn.Linear(C, C))
        else:  # PETRHead's layers, as linear maps on the flattened tokens
            self.input_proj = nn.Linear(in_channels, C)
        self.position_encoder = nn.Sequential(nn.Linear(depth_num * 3, C * 4), nn.ReLU(), nn.Linear(C * 4, C))
        if self.focal_tokens:
            self.spatial_alignment = MLN(CONE_DIMS, C)
            self.featurized_pe = TokenGate(C)
        else:
            self.sine_2d = PositionEmbeddingSine(C // 2, normalize=True)
            self.adapt_pos2d = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C))
        self.reference_points = nn.Embedding(num_queries, 3)
        nn.init.uniform_(self.reference_points.weight, 0, 1)
        # where the propagated queries of a frame without a past start (fixed, as in the official code)
        self.register_buffer("pseudo_reference_points", torch.rand(num_propagated, 3))
        self.query_content = nn.Embedding(num_queries, C) if query_content else None
        self.query_embedding = nn.Sequential(nn.Linear(C * 3 // 2, C), nn.ReLU(), nn.Linear(C, C))
        self.time_embedding = nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C))
        if with_ego_pos:
            self.ego_pose_pe = MLN(MOTION_DIMS, C)
            self.ego_pose_memory = MLN(MOTION_DIMS, C)
        # PETR's optional geometric prior (heads/petr.py, not official): attend less to cells whose ray points away
        # from the query's reference point
        self.ray_bias_scale = nn.Parameter(ray_bias_scales(num_heads)) if ray_bias else None
        self.decoder = TemporalDecoder(num_decoder_layers, C, num_heads=num_heads, ffn_dims=ffn_dims,
                                       dropout=dropout, cross_attn=LowRankBiasAttention if ray_bias else
                                       MultiheadAttention)
        self.branches = PredictionBranches(C, num_classes, num_decoder_layers, pc_range, shared=True)
        # PETR's optional per-camera depth-bin map and class heatmap on the image features (heads/petr.CameraMapHead,
        # training only)
        self.depth_head = CameraMapHead(in_channels, depth_num + 1) if depth_supervision else None
        self.heatmap_head = CameraMapHead(in_channels, num_classes, HEATMAP_PRIOR) if heatmap_supervision else None

    def image_tokens(self, x, lidar2img, intrinsics, pad_shape, mask):
        """x (B, N, C_in, H, W), mask (B, N, H, W) True at padding -> tokens (B, N*H*W, C) and their position
        embedding (B, N*H*W, C)."""
        B, N, _, H, W = x.shape
        D = self.depths.numel()
        tokens = x.permute(0, 1, 3, 4, 2).reshape(B, N * H * W, -1)
        with torch.autocast(x.device.type, enabled=False):
            points = frustum_points(lidar2img, pad_shape, (H, W), self.depths, self.position_range,
                                    self.cell_offset).view(B, N, H * W, D, 3)
            if self.focal_tokens:
                focal = torch.stack([intrinsics[..., 0, 0], intrinsics[..., 1, 1]], -1).abs().float() / 1e3
                near = max(D - CONE_NEAR_OFFSET, 0)
                cone = torch.cat([focal[:, :, None].expand(-1, -1, H * W, -1), points[..., -1, :],
                                  points[..., near, :]], -1).view(B, N * H * W, CONE_DIMS)
            points = inverse_sigmoid(points).view(B, N * H * W, D * 3)
        pos = self.position_encoder(points)
        if not self.focal_tokens:
            sine = self.sine_2d(mask.flatten(0, 1)).view(B, N, -1, H * W).transpose(2, 3).reshape(B, N * H * W, -1)
            return self.input_proj(tokens), pos + self.adapt_pos2d(sine)
        tokens = self.spatial_alignment(self.memory_embed(tokens), cone)
        return tokens, self.featurized_pe(pos, tokens)

    def queries(self, B, denoising):
        """-> reference (B, P_dn + Q, 3) fractions of pc_range, content and query_pos (B, P_dn + Q, C)."""
        C = self.embed_dims
        reference = self.reference_points.weight[None].expand(B, -1, -1)
        if self.query_content is None:
            content = reference.new_zeros(B, self.num_learned, C)
        else:
            content = self.query_content.weight[None].expand(B, -1, -1)
        if denoising is not None:
            reference = torch.cat([denoising.reference, reference], 1)
            content = torch.cat([content.new_zeros(B, denoising.num_queries, C), content], 1)
        return reference, content, self.query_embedding(sine_embed_points(reference, C // 2))

    def temporal_alignment(self, reference, content, query_pos, memory):
        """Condition the current queries and the memory on their motion; the newest num_propagated entries join
        the queries. -> reference (B, L, 3), content, query_pos (B, L, C); memory keys and positions (B, T, C)."""
        C, P = self.embed_dims, self.num_propagated
        temp_reference = normalize_points(memory.reference, self.pc_range)  # (B, M, 3)
        temp_pos = self.query_embedding(sine_embed_points(temp_reference, C // 2))
        temp = memory.embedding
        if self.with_ego_pos:
            # the current queries: no velocity, age 0, the identity pose
            still = motion_code(reference.new_zeros(1, 1, 2), reference.new_zeros(1, 1, 1),
                                torch.eye(4, device=reference.device).view(1, 1, 4, 4))
            content = self.ego_pose_memory(content, still)
            query_pos = self.ego_pose_pe(query_pos, still)
            moved = motion_code(memory.velocity, memory.age, memory.pose)  # (B, M, 180)
            temp_pos = self.ego_pose_pe(temp_pos, moved)
            temp = self.ego_pose_memory(temp, moved)
        query_pos = query_pos + self.time_embedding(sine_embed_1d(reference.new_zeros(1, 1, 1), C))
        temp_pos = temp_pos + self.time_embedding(sine_embed_1d(memory.age, C))
        reference = torch.cat([reference, temp_reference[:, :P]], 1)
        content = torch.cat([content, temp[:, :P]], 1)
        query_pos = torch.cat([query_pos, temp_pos[:, :P]], 1)
        return reference, content, query_pos, temp[:, P:], temp_pos[:, P:]

    def pseudo_memory(self, memory, prev_exists):
        """Samples without a past start their propagated queries at the fixed pseudo reference points."""
        P = self.num_propagated
        fresh = (~prev_exists).to(memory.reference.dtype).view(-1, 1, 1)
        pseudo = denormalize_points(self.pseudo_reference_points, self.pc_range)  # (P, 3) metres
        reference, pose = memory.reference.clone(), memory.pose.clone()
        reference[:, :P] = reference[:, :P] + fresh * pseudo
        pose[:, :P] = pose[:, :P] + fresh[..., None] * torch.eye(4, device=pose.device)
        return StreamMemory(memory.embedding, reference, memory.velocity, memory.age, pose, memory.time,
                            memory.frame2global)

    def forward(self, feats, lidar2img, intrinsics, img_shape, pad_shape, time, frame2global, prev_exists,
                memory=None, denoising=None):
        """feats: list of (B, N, C_in, H_l, W_l); lidar2img (B, N, 4, 4); intrinsics (B, N, 3, 3) (None with PETR's
        image tokens); img_shape (B, 2);
        time (B,) float64 seconds; frame2global (B, 4, 4) float64; prev_exists (B,) bool; memory: StreamMemory of
        the previous step or None -> (SetPredictions over the num_queries + num_propagated queries, StreamMemory)."""
        x = feats[self.in_level]
        B, N, _, H, W = x.shape
        if memory is None:
            memory = empty_memory(B, self.memory_len, self.embed_dims, x.device)
            prev_exists = torch.zeros_like(prev_exists)
        memory = align_memory(memory, time, frame2global, prev_exists, self.velocity_extrapolation)
        memory = self.pseudo_memory(memory, prev_exists)

        mask = padding_mask(img_shape, pad_shape, (H, W), self.cell_offset)[:, None].expand(B, N, H, W)
        tokens, pos = self.image_tokens(x, lidar2img, intrinsics, pad_shape, mask)
        key_padding_mask = key_padding(mask, B)
        reference, content, query_pos = self.queries(B, denoising)
        reference, content, query_pos, temp, temp_pos = self.temporal_alignment(reference, content, query_pos, memory)
        self_attn_mask = None
        if denoising is not None:
            # the denoising mask covers the queries; every query may attend to the memory keys
            extra = denoising.attn_mask.new_ones(len(denoising.attn_mask), temp.shape[1])
            self_attn_mask = torch.cat([denoising.attn_mask, extra], 1)
        cross_attn_mask = None
        if self.ray_bias_scale is not None:
            rays = camera_rays(lidar2img, pad_shape, (H, W), self.cell_offset)
            cross_attn_mask = ray_attention_bias(reference, *rays, self.ray_bias_scale, self.pc_range)
        cls_out, box_out, hidden = [], [], None
        for i, layer in enumerate(self.decoder.layers):
            content = layer(content, tokens, query_pos, pos, key_padding_mask, self_attn_mask, temp, temp_pos,
                            cross_attn_mask)
            hidden = self.decoder.norm(content)
            logits, boxes, _ = self.branches(i, hidden, reference)
            cls_out.append(logits)
            box_out.append(boxes)
        outputs = split_denoising(torch.stack(cls_out), torch.stack(box_out), denoising)
        if self.depth_head is not None and self.training:
            outputs.depth_map = self.depth_head.predict(x.flatten(0, 1), img_shape, pad_shape)
        if self.heatmap_head is not None and self.training:
            outputs.heatmap = self.heatmap_head.predict(x.flatten(0, 1), img_shape, pad_shape)
        return outputs, self.remember(outputs, hidden, memory, time, frame2global)

    @torch.no_grad()
    def remember(self, outputs, hidden, memory, time, frame2global):
        """The last layer's top-k queries by best class score (denoising queries excluded) -> the new memory."""
        Q = outputs.logits.shape[2]
        hidden = hidden[:, -Q:].float()  # the denoising queries run in front
        score = outputs.logits[-1].float().sigmoid().amax(-1)  # (B, Q)
        idx = score.topk(self.topk_proposals, dim=1).indices  # (B, K)
        boxes = outputs.boxes[-1].float().gather(1, idx[..., None].expand(-1, -1, outputs.boxes.shape[-1]))
        embedding = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        centres = boxes[..., [0, 1, 4]]  # the box code's cx cy ... cz, metres
        return push_memory(memory, embedding, centres, boxes[..., 8:10], self.memory_len, time, frame2global)


class StreamingDetector(detector.MultiViewDetector):
    """MultiViewDetector whose head carries a memory from call to call (see the module docstring)."""

    streaming = True

    @property
    def export_batch_keys(self):
        """bev3d.models.export: the batch entries the graph reads beyond img, lidar2img, img_shape (PETR's image
        tokens read no intrinsics, and an ONNX graph has no unused inputs)."""
        return (("intrinsics",) if self.head.focal_tokens else ()) + ("timestamp", "frame2global")

    def __init__(self, backbone, neck, head, denoising=None):
        super().__init__(backbone, neck, head, denoising)
        self.memory, self.memory_tokens = None, None
        # the memory keeps the rows of this many latest calls: K for streams interleaved in K groups of batches
        self.memory_groups = 1

    def reset_memory(self):
        self.memory, self.memory_tokens = None, None

    def memory_state(self):
        """The memory as CPU tensors and the sample tokens of its rows (for checkpoints), or None."""
        if self.memory is None:
            return None
        return {"memory": {k: v.cpu() for k, v in self.memory.to_dict().items()}, "tokens": list(self.memory_tokens)}

    def load_memory_state(self, state):
        self.reset_memory()
        if state is not None:
            device = next(self.parameters()).device
            self.memory = StreamMemory(**{k: v.to(device) for k, v in state["memory"].items()})
            self.memory_tokens = list(state["tokens"])

    def forward(self, batch, targets=None):
        for key in self.export_batch_keys + ("prev_token",):
            if key not in batch:
                raise Bev3dError(f"The StreamPETR batch needs {key!r} (bev3d.data.collate of the nuScenes pipeline "
                                 f"gives it): build the batch with bev3d.data.")
        B = batch["img"].shape[0]
        allowed = torch.as_tensor(batch.get("prev_exists", [True] * B), dtype=torch.bool).tolist()
        recorded = {t: r for r, t in enumerate(self.memory_tokens or [])}  # the newest row of a token wins
        # the memory row of each batch row: the one recorded at its previous sample (-1: none, a fresh memory)
        rows = [recorded.get(p, -1) if ok else -1 for p, ok in zip(batch["prev_token"], allowed)]
        memory = prev_exists = None
        if max(rows) >= 0:
            device = batch["img"].device
            index = torch.tensor([max(r, 0) for r in rows], device=device)
            memory = StreamMemory(**{k: v[index] for k, v in self.memory.to_dict().items()})
            prev_exists = torch.tensor([r >= 0 for r in rows], device=device)
        outputs, new = self.step(batch, targets, memory, prev_exists)
        self.remember_rows(new, list(batch["sample_token"]), {r for r in rows if r >= 0})
        return outputs

    def remember_rows(self, new, tokens, used):
        """This call's rows after the earlier rows not just continued; the rows of the latest memory_groups calls
        are kept (with interleaved streams the other groups' memories wait there for their next step)."""
        keep = [r for r in range(len(self.memory_tokens or [])) if r not in used]
        if keep and self.memory_groups > 1:
            keep = keep[-(self.memory_groups - 1) * len(tokens):]
            old, new = self.memory.to_dict(), new.to_dict()
            new = StreamMemory(**{k: torch.cat([old[k][keep], v], 0) for k, v in new.items()})
            tokens = [self.memory_tokens[r] for r in keep] + tokens
        self.memory, self.memory_tokens = new, tokens

    def export_memory(self, batch):
        """The memory before a scene's first frame, as named tensors (bev3d.models.export): feeding it again is the
        reset at a scene start."""
        return empty_memory(batch["img"].shape[0], self.head.memory_len, self.head.embed_dims,
                            batch["img"].device).to_dict()

    def export_step(self, batch, memory):
        """One frame with the memory as named tensors. A sample's memory continues where it has seen a frame (its
        time is not 0, the time of export_memory's empty memory)."""
        memory = StreamMemory(**memory)
        outputs, memory = self.step(batch, None, memory, memory.time != 0)
        return outputs, memory.to_dict()

    def step(self, batch, targets=None, memory=None, prev_exists=None):
        """-> (SetPredictions, StreamMemory): one frame from the memory of the previous one; prev_exists (B,) bool
        marks the samples whose sequence the memory continues (None: no memory)."""
        img = batch["img"]  # (B, N, 3, H_pad, W_pad)
        if prev_exists is None:
            prev_exists = torch.zeros(img.shape[0], dtype=torch.bool, device=img.device)
        feats = self.extract_feats(img)
        denoising = None
        if targets is not None and self.denoising is not None:
            denoising = self.denoising(targets, self.head.num_queries, img.device)
        img_shape = torch.as_tensor(batch["img_shape"], device=img.device).view(-1, 2)
        intrinsics = batch["intrinsics"].to(img) if self.head.focal_tokens else None  # (see export_batch_keys)
        outputs, memory = self.head(feats, batch["lidar2img"].to(img), intrinsics, img_shape,
                                    tuple(img.shape[-2:]), batch["timestamp"].to(img.device, torch.float64),
                                    batch["frame2global"].to(img.device, torch.float64), prev_exists, memory,
                                    denoising)
        return outputs, memory.detach()


def build_head(cfg):
    m, h = cfg.model, cfg.model.head
    check_in_level(cfg)
    return StreamPETRHead(m.neck.out_channels, h.num_classes, m.pc_range, num_queries=h.num_queries,
                          embed_dims=h.embed_dims, num_heads=h.num_heads, num_decoder_layers=h.num_decoder_layers,
                          ffn_dims=h.ffn_dims, dropout=h.dropout, in_level=h.in_level, depth_num=h.depth_num,
                          depth_start=h.depth_start, position_range=h.position_range, cell_point=h.cell_point,
                          query_content=h.query_content, memory_len=h.memory_len, topk_proposals=h.topk_proposals,
                          num_propagated=h.num_propagated, with_ego_pos=h.with_ego_pos,
                          velocity_extrapolation=h.velocity_extrapolation, ray_bias=h.ray_bias,
                          depth_supervision=h.depth_supervision, heatmap_supervision=h.heatmap_supervision,
                          image_tokens=h.image_tokens)


def build(cfg):
    """Config -> StreamingDetector with a StreamPETR head."""
    base = detector.build(cfg, build_head)
    return StreamingDetector(base.backbone, base.neck, base.head, base.denoising)
