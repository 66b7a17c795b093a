"""DETR3D's projection + sampling and PETR's frustum position embedding, checked through the
geometry module's projection (an independent path from the heads' code)."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from bev3d.geometry import intrinsics_4x4, project_points, transform_matrix, transform_points
from bev3d.models.core.box_coder_3d import denormalize_points
from bev3d.models.heads.detr3d_sampling import SAMPLERS, project_to_cameras, sample_multiview
from bev3d.models.heads.petr import PETRHead, camera_rays, depth_bins, padding_mask

PAD = (64, 96)  # (H_pad, W_pad)
STRIDES = (8, 16)


def _camera(yaw_deg, f=60.0):
    """lidar2img of a camera at (0.5, 0, 1.6) looking along LiDAR yaw `yaw_deg` (x forward, z up)."""
    t = np.radians(yaw_deg)
    fwd, right = np.array([np.cos(t), np.sin(t), 0.0]), np.array([np.sin(t), -np.cos(t), 0.0])
    cam2lidar_rot = np.stack([right, [0.0, 0.0, -1.0], fwd], 1)  # columns: camera x (right), y (down), z (depth)
    lidar2cam = transform_matrix([0.5, 0.0, 1.6], cam2lidar_rot, inverse=True)
    K = np.array([[f, 0, PAD[1] / 2 - 3.0], [0, f, PAD[0] / 2 + 2.0], [0, 0, 1]])
    return intrinsics_4x4(K) @ lidar2cam


def _rig():
    return torch.tensor(np.stack([_camera(0), _camera(180)]), dtype=torch.float32)[None]  # (1, 2, 4, 4)


def _unproject(lidar2img, u, v, depth):
    """The LiDAR point that a camera sees at pixel (u, v) and `depth` (float64)."""
    return transform_points(np.array([[u * depth, v * depth, depth]]), np.linalg.inv(lidar2img))[0]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_hot_feature_is_sampled_at_projected_point(sampler):
    torch.manual_seed(0)
    lidar2img = _rig()
    C, level, cam, row, col = 5, 1, 1, 2, 3
    feats = [torch.zeros(1, 2, C, PAD[0] // s, PAD[1] // s) for s in STRIDES]
    vec = torch.randn(C)
    feats[level][0, cam, :, row, col] = vec  # one-hot cell of camera 1 (looking backwards), stride 16
    u, v = (col + 0.5) * STRIDES[level], (row + 0.5) * STRIDES[level]  # that cell's centre, in pixels
    target = _unproject(lidar2img[0, cam].double().numpy(), u, v, depth=12.0)
    elsewhere = _unproject(lidar2img[0, cam].double().numpy(), u + 30, v, depth=12.0)
    behind = 2 * np.array([0.5, 0.0, 1.6]) - target  # mirrored through the camera: behind camera 1, in front of 0
    points = torch.tensor(np.stack([target, elsewhere, behind]), dtype=torch.float32)[None]  # (1, 3, 3)

    locations, visible = project_to_cameras(points, lidar2img, torch.tensor([PAD]), PAD)
    assert visible[0, cam].tolist() == [True, True, False]
    weights = torch.ones(1, 3, 2, len(STRIDES)) * visible.transpose(1, 2)[..., None]
    out = sample_multiview(feats, locations, weights, sampler)  # (1, 3, C)
    torch.testing.assert_close(out[0, 0], vec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 1:], torch.zeros(2, C), atol=1e-6, rtol=0)
    # The same cell is masked once the valid image width ends left of it.
    _, visible = project_to_cameras(points, lidar2img, torch.tensor([[PAD[0], int(u) - 4]]), PAD)
    assert not visible[0, cam, 0]


def test_samplers_agree_on_random_features():
    torch.manual_seed(1)
    feats = [torch.randn(2, 2, 8, PAD[0] // s, PAD[1] // s, dtype=torch.float64) for s in STRIDES]
    locations = torch.rand(2, 2, 7, 2, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(2, 7, 2, len(STRIDES), dtype=torch.float64)
    ref = sample_multiview(feats, locations, weights, "grid_sample")
    torch.testing.assert_close(sample_multiview(feats, locations, weights, "ms_deform_attn"), ref)


def test_depth_bins_and_padding_mask():
    d = depth_bins(64, 1.0, 61.2)
    assert d[0].item() == pytest.approx(1.0)
    for i in (1, 10, 63):
        assert d[i].item() == pytest.approx(1 + 60.2 * i * (i + 1) / (64 * 65))
    assert (d.diff().diff() > 0).all()  # linear-increasing bin sizes
    mask = padding_mask(torch.tensor([[40, 70], [64, 96]]), PAD, (4, 6))  # cell centres 8, 24, 40, ...
    assert mask[0].nonzero().tolist() == [[r, c] for r in range(4) for c in range(6) if r >= 2 or c >= 4]
    assert not mask[1].any()


def test_petr_frustum_points_project_back_to_their_pixels():
    head = PETRHead(8, 10, [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0], num_queries=4, embed_dims=32, num_heads=2,
                    num_decoder_layers=1, ffn_dims=32, depth_num=16)
    lidar2img = _rig()
    H, W = PAD[0] // 16, PAD[1] // 16
    emb = head.position_embedding(lidar2img, PAD, (H, W))  # (2, D*3, H, W)
    D = head.depths.numel()
    frac = torch.sigmoid(emb.double()).view(2, D, 3, H, W).permute(0, 3, 4, 1, 2)  # (N, H, W, D, 3)
    points = denormalize_points(frac, head.position_range)
    inside = ((frac > 1e-3) & (frac < 1 - 1e-3)).all(-1)  # not clamped by the position range
    assert inside.float().mean() > 0.5
    uv, depth = project_points(points.reshape(2, -1, 3), lidar2img[0].double())
    uv, depth = uv.view(2, H, W, D, 2), depth.view(2, H, W, D)
    centres = torch.stack(torch.meshgrid((torch.arange(W) + 0.5) * 16.0, (torch.arange(H) + 0.5) * 16.0,
                                         indexing="xy"), -1).double()  # (H, W, 2) as (u, v)
    torch.testing.assert_close(uv[inside], centres[None, :, :, None].expand_as(uv)[inside], atol=2e-2, rtol=0)
    torch.testing.assert_close(depth[inside], head.depths.double().expand_as(depth)[inside], atol=1e-3, rtol=1e-4)


def test_petr_ray_bias_peaks_at_the_cell_that_sees_the_anchor():
    pc_range = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
    head = PETRHead(8, 10, pc_range, num_queries=4, embed_dims=32, num_heads=2, num_decoder_layers=1,
                    ffn_dims=32, ray_bias=True)
    lidar2img = _rig()
    H, W = PAD[0] // 16, PAD[1] // 16
    cam, row, col = 1, 2, 3
    u, v = (col + 0.5) * 16, (row + 0.5) * 16
    l2i = lidar2img[0, cam].double().numpy()
    point = _unproject(l2i, u, v, depth=12.0)
    lo, hi = np.array(pc_range[:3]), np.array(pc_range[3:])
    reference = torch.tensor((point - lo) / (hi - lo), dtype=torch.float32).view(1, 1, 3)
    bias = head.ray_attention_bias(reference, *camera_rays(lidar2img, PAD, (H, W))).dense()
    assert bias.shape == (1, 2, 1, 2 * H * W)
    key = (cam * H + row) * W + col
    scale = head.ray_bias_scale.detach().double().exp()
    assert (bias.argmax(-1) == key).all()
    torch.testing.assert_close(bias[0, :, 0, key].double(), scale, rtol=1e-5, atol=0)  # cos = 1
    # the next cell along the row: cos of the angle between its ray and the direction to the anchor
    centre = _unproject(l2i, u, v, depth=0.0)
    ray = _unproject(l2i, u + 16, v, depth=1.0) - centre
    to_anchor = point - centre
    cos = ray @ to_anchor / np.linalg.norm(ray) / np.linalg.norm(to_anchor)
    torch.testing.assert_close(bias[0, :, 0, key + 1].double(), scale * cos, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("refine", [False, True])
def test_petr_refinement_anchors_each_layer_on_the_previous_centres(refine):
    torch.manual_seed(2)
    pc_range = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
    head = PETRHead(8, 10, pc_range, num_queries=5, embed_dims=32, num_heads=2, num_decoder_layers=2,
                    ffn_dims=32, depth_num=16, ray_bias=True, with_box_refine=refine)
    if refine:  # a zero box branch predicts no offset: its centres are its anchors
        for p in head.branches.reg_branches[1][-1].parameters():
            nn.init.zeros_(p)
    feats = [torch.randn(1, 2, 8, PAD[0] // 16, PAD[1] // 16)]
    box_code = head(feats, _rig(), torch.tensor([PAD]), PAD).boxes  # (L, 1, Q, 10)
    centres = box_code[..., [0, 1, 4]]
    anchors = denormalize_points(head.reference_points.weight, pc_range)
    assert not torch.allclose(centres[0, 0], anchors, atol=1e-2)
    if refine:
        torch.testing.assert_close(centres[1], centres[0], atol=1e-4, rtol=1e-5)
    else:  # one shared branch pair, every layer offsets the same learned anchors
        assert len(head.branches.reg_branches) == 1
        assert not torch.allclose(centres[1], centres[0], atol=1e-2)
