"""StreamPETR's object-query memory: the explicit state carried from frame to frame, its ego-motion alignment,
and the motion-aware layer norm (MLN) that tells queries how old and how far moved a memory entry is.

The state is a plain dataclass of tensors (`StreamMemory`), read and returned by the head, so that an exported
graph can carry it as inputs and outputs. Frames are the (augmented) LiDAR frames of docs/conventions.md; a
sample's `frame2global` maps its frame to the global frame.
"""

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from bev3d.geometry import transform_points
from bev3d.models.heads.petr import invert


@dataclass
class StreamMemory:
    embedding: torch.Tensor  # (B, M, C) decoder outputs of the remembered queries, newest first
    reference: torch.Tensor  # (B, M, 3) their centres in metres, in the frame of the last step
    velocity: torch.Tensor  # (B, M, 2) their predicted velocity (m/s), in the frame they were recorded in
    age: torch.Tensor  # (B, M, 1) seconds since they were recorded
    pose: torch.Tensor  # (B, M, 4, 4) frame of record -> frame of the last step
    time: torch.Tensor  # (B,) float64 timestamp (s) of the last step
    frame2global: torch.Tensor  # (B, 4, 4) float64 frame of the last step -> global

    @property
    def batch_size(self):
        return self.embedding.shape[0]

    def detach(self):
        return replace(self, **{f.name: getattr(self, f.name).detach() for f in fields(self)})

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


def empty_memory(batch_size, memory_len, embed_dims, device):
    """All-zero entries (what a frame without a past sees, before the pseudo reference points are added)."""
    B, M = batch_size, memory_len
    return StreamMemory(torch.zeros(B, M, embed_dims, device=device), torch.zeros(B, M, 3, device=device),
                        torch.zeros(B, M, 2, device=device), torch.zeros(B, M, 1, device=device),
                        torch.zeros(B, M, 4, 4, device=device), torch.zeros(B, dtype=torch.float64, device=device),
                        torch.eye(4, dtype=torch.float64, device=device).repeat(B, 1, 1))


def align_memory(memory, time, frame2global, prev_exists, velocity_extrapolation=False):
    """Move `memory` (of the previous step) into the current frame: time (B,) float64 seconds, frame2global
    (B, 4, 4) float64, prev_exists (B,) bool. Entries of samples without a previous frame are zeroed.

    The relative motion inv(frame2global_t) @ frame2global_t-1 is formed in float64: global translations are
    kilometres, a float32 product would lose centimetres. With `velocity_extrapolation` a centre first moves by
    its velocity (rotated from its frame of record into the previous frame) times the elapsed time, which is exact
    for an object of constant velocity.
    """
    motion = (invert(frame2global.double()) @ memory.frame2global.double()).float()  # (B, 4, 4)
    dt = (time.double() - memory.time.double()).float()  # (B,)
    reference = memory.reference
    if velocity_extrapolation:
        velocity = (memory.pose[..., :2, :2] @ memory.velocity[..., None])[..., 0]  # (B, M, 2) previous frame
        reference = reference + torch.cat([velocity, torch.zeros_like(velocity[..., :1])], -1) * dt[:, None, None]
    keep = prev_exists.to(reference.dtype)
    k3 = keep.view(-1, 1, 1)
    return StreamMemory(memory.embedding * k3, transform_points(reference, motion) * k3, memory.velocity * k3,
                        (memory.age + dt.view(-1, 1, 1)) * k3, (motion[:, None] @ memory.pose) * k3[..., None],
                        time.double(), frame2global.double())


def push_memory(memory, embedding, reference, velocity, memory_len, time, frame2global):
    """Put this frame's top-k queries (B, K, ...) in front of the aligned memory and keep the newest memory_len."""
    B, K = embedding.shape[:2]
    age = embedding.new_zeros(B, K, 1)
    pose = torch.eye(4, device=embedding.device).expand(B, K, 4, 4)
    return StreamMemory(torch.cat([embedding, memory.embedding], 1)[:, :memory_len],
                        torch.cat([reference, memory.reference], 1)[:, :memory_len],
                        torch.cat([velocity, memory.velocity], 1)[:, :memory_len],
                        torch.cat([age, memory.age], 1)[:, :memory_len],
                        torch.cat([pose, memory.pose], 1)[:, :memory_len], time, frame2global)


def motion_code(velocity, age, pose, num_freqs=6):
    """velocity (..., 2), age (..., 1), pose (..., 4, 4) -> (..., 2 * num_freqs * 15): the sines and cosines of
    [vx, vy, age, pose rows 0-2] at frequencies 2^0 .. 2^(num_freqs-1), all sines of a frequency, then its cosines
    (StreamPETR's NeRF encoding of the ego motion)."""
    x = torch.cat([velocity, age, pose[..., :3, :].flatten(-2)], -1).float()
    parts = []
    for k in range(num_freqs):
        parts += [(x * 2.0**k).sin(), (x * 2.0**k).cos()]
    return torch.cat(parts, -1)


def sine_embed_1d(t, num_feats, temperature=10000):
    """(..., 1) scalars -> (..., num_feats) interleaved sine / cosine embedding of t * 2 pi."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=t.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = t.float() * (2 * math.pi) / dim_t  # (..., F)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(-2)


class MLN(nn.Module):
    """Motion-aware layer norm: LayerNorm without affine, then a scale and shift predicted from a condition code.
    Starts as the identity affine (scale 1, shift 0), so an untrained MLN is a plain LayerNorm."""

    def __init__(self, cond_dims, embed_dims):
        super().__init__()
        self.reduce = nn.Sequential(nn.Linear(cond_dims, embed_dims), nn.ReLU())
        self.gamma = nn.Linear(embed_dims, embed_dims)
        self.beta = nn.Linear(embed_dims, embed_dims)
        self.ln = nn.LayerNorm(embed_dims, elementwise_affine=False)
        for layer, bias in ((self.gamma, 1.0), (self.beta, 0.0)):
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, bias)

    def forward(self, x, cond):  # (..., C), (..., cond_dims)
        c = self.reduce(cond)
        return self.gamma(c) * self.ln(x) + self.beta(c)


class TokenGate(nn.Module):
    """x * sigmoid(MLP(gate)): Focal-PETR's gating of each image token's 3D position embedding by its feature."""

    def __init__(self, embed_dims):
        super().__init__()
        self.reduce = nn.Linear(embed_dims, embed_dims)
        self.expand = nn.Linear(embed_dims, embed_dims)

    def forward(self, x, gate):
        return x * self.expand(self.reduce(gate).relu()).sigmoid()
