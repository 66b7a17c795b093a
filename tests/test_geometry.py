import math

import numpy as np
import pytest
import torch
from pyquaternion import Quaternion

from bev3d import geometry

RNG = np.random.default_rng(0)


def random_quaternion():
    q = RNG.normal(size=4)
    return q / np.linalg.norm(q)


@pytest.mark.parametrize("trial", range(5))
def test_quaternion_matrix_round_trip_against_pyquaternion(trial):
    q = random_quaternion()
    ours = geometry.quaternion_to_matrix(q)
    np.testing.assert_allclose(ours, Quaternion(q).rotation_matrix, atol=1e-12)
    back = geometry.matrix_to_quaternion(ours)
    # q and -q are the same rotation
    assert min(np.abs(back - q).max(), np.abs(back + q).max()) < 1e-12


def test_matrix_to_quaternion_handles_all_pivots():
    for q in ([0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]):
        rot = Quaternion(q).rotation_matrix
        np.testing.assert_allclose(geometry.quaternion_to_matrix(geometry.matrix_to_quaternion(rot)), rot, atol=1e-12)


def test_yaw_matches_devkit_definition():
    from nuscenes.eval.common.utils import quaternion_yaw

    for _ in range(5):
        q = random_quaternion()
        assert geometry.quaternion_yaw(q) == pytest.approx(quaternion_yaw(Quaternion(q)), abs=1e-12)
    assert geometry.quaternion_yaw(geometry.yaw_to_quaternion(0.7)) == pytest.approx(0.7)
    np.testing.assert_allclose(geometry.rotation_z(0.7), Quaternion(axis=[0, 0, 1], angle=0.7).rotation_matrix)


def test_wrap_angle():
    np.testing.assert_allclose(geometry.wrap_angle(np.array([3 * math.pi / 2, -3 * math.pi / 2, 0.5])),
                               [-math.pi / 2, math.pi / 2, 0.5])


def test_transform_matrix_and_inverse():
    q, t = random_quaternion(), RNG.normal(size=3)
    fwd = geometry.transform_matrix(t, q)
    inv = geometry.transform_matrix(t, q, inverse=True)
    np.testing.assert_allclose(fwd @ inv, np.eye(4), atol=1e-12)
    p = RNG.normal(size=(7, 3))
    expected = p @ Quaternion(q).rotation_matrix.T + t
    np.testing.assert_allclose(geometry.transform_points(p, fwd), expected, atol=1e-12)


def test_box_corners_match_devkit_box():
    from nuscenes.utils.data_classes import Box

    boxes = np.array([[1.0, 2.0, 0.5, 1.9, 4.6, 1.7, 0.3, 0, 0], [-5, 3, 1, 0.7, 0.8, 1.8, -2.5, 1, 0]])
    ours = geometry.box_corners(boxes)
    for box, corners in zip(boxes, ours):
        ref = Box(box[:3], box[3:6], Quaternion(geometry.yaw_to_quaternion(box[6]))).corners().T
        np.testing.assert_allclose(corners, ref, atol=1e-12)
    torch_corners = geometry.box_corners(torch.tensor(boxes))
    np.testing.assert_allclose(torch_corners.numpy(), ours, atol=1e-12)


def test_project_points_hand_computed():
    # Camera at the origin looking along +x of the LiDAR frame: cam x = -lidar y, cam y = -lidar z.
    lidar2cam = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    k = geometry.intrinsics_4x4(np.array([[100.0, 0, 50], [0, 100, 40], [0, 0, 1]]))
    lidar2img = k @ lidar2cam
    points = np.array([[10.0, 0, 0], [10, -1, 0.5], [-5, 0, 0]])
    uv, depth = geometry.project_points(points, lidar2img)
    np.testing.assert_allclose(depth, [10, 10, -5])
    np.testing.assert_allclose(uv[:2], [[50, 40], [60, 35]])
    assert np.isfinite(uv).all()  # behind the camera: finite, masked by callers with depth > eps


def test_project_points_broadcasts_and_matches_numpy_in_torch():
    lidar2img = RNG.normal(size=(2, 6, 4, 4))
    lidar2img[..., 3, :] = [0, 0, 0, 1]
    points = RNG.normal(size=(2, 5, 3))
    uv, depth = geometry.project_points(points[:, None], lidar2img)  # (2, 6, 5, 2)
    uv_t, depth_t = geometry.project_points(torch.tensor(points)[:, None], torch.tensor(lidar2img))
    assert uv.shape == (2, 6, 5, 2) and depth.shape == (2, 6, 5)
    np.testing.assert_allclose(uv_t.numpy(), uv, atol=1e-10)
    np.testing.assert_allclose(depth_t.numpy(), depth, atol=1e-12)
    # one camera by hand
    h = lidar2img[1, 3] @ np.append(points[1, 2], 1.0)
    if h[2] > 1e-5:
        np.testing.assert_allclose(uv[1, 3, 2], h[:2] / h[2], rtol=1e-10)
