"""Frames, rotations, boxes and the one projection function of bev3d.

Conventions (docs/conventions.md): quaternions are (w, x, y, z); boxes are
`x y z w l h yaw [vx vy]` in the LiDAR frame with the centre at the box centre
and yaw the counter-clockwise angle of the box length axis from LiDAR +x.

Functions take numpy arrays (float64 on the data side) and, where marked,
torch tensors too, so the models and the data pipeline share one implementation.
"""

import math

import numpy as np


def _is_torch(x):
    return type(x).__module__.startswith("torch")


def _transpose(m):
    return m.transpose(-1, -2) if _is_torch(m) else np.swapaxes(m, -1, -2)


# ----------------------------------------------------------------------------- rotations


def quaternion_to_matrix(q):
    """(4,) quaternion w x y z -> (3, 3) rotation matrix (normalises q first)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(rot):
    """(3, 3) rotation matrix -> (4,) quaternion w x y z with w >= 0."""
    m = np.asarray(rot, dtype=np.float64)
    # Shepperd's method: pivot on the largest of the four squared components for stability.
    diag = np.array([m[0, 0] + m[1, 1] + m[2, 2], m[0, 0], m[1, 1], m[2, 2]])
    k = int(np.argmax(diag))
    if k == 0:
        s = 2.0 * math.sqrt(1.0 + diag[0])
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    return q if q[0] >= 0 else -q


def yaw_to_quaternion(yaw):
    """Rotation by `yaw` about +z -> quaternion w x y z."""
    return np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


def rotation_z(yaw):
    """(3, 3) rotation by `yaw` about +z."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def matrix_yaw(rot):
    """Yaw of the rotated x axis projected on the xy plane (the devkit's `quaternion_yaw`)."""
    rot = np.asarray(rot)
    return math.atan2(rot[1, 0], rot[0, 0])


def quaternion_yaw(q):
    return matrix_yaw(quaternion_to_matrix(q))


def wrap_angle(angle):
    """Wrap to [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


# ----------------------------------------------------------------------------- rigid transforms


def transform_matrix(translation=(0.0, 0.0, 0.0), rotation=(1.0, 0.0, 0.0, 0.0), inverse=False):
    """4x4 float64 matrix of the rigid transform `x -> R x + t` (or its inverse).

    `rotation` is a quaternion w x y z or a (3, 3) matrix. nuScenes records
    (calibrated_sensor, ego_pose) store sensor->ego and ego->global in this form.
    """
    rot = np.asarray(rotation, dtype=np.float64)
    if rot.shape == (4,):
        rot = quaternion_to_matrix(rot)
    t = np.asarray(translation, dtype=np.float64)
    out = np.eye(4)
    if inverse:
        out[:3, :3] = rot.T
        out[:3, 3] = -rot.T @ t
    else:
        out[:3, :3] = rot
        out[:3, 3] = t
    return out


def transform_points(points, matrix):
    """Apply a 4x4 transform to (..., P, 3) points (numpy or torch); matrix (..., 4, 4)."""
    return points @ _transpose(matrix[..., :3, :3]) + matrix[..., None, :3, 3]


def intrinsics_4x4(cam_intrinsic):
    """(3, 3) camera matrix -> (4, 4) so that `lidar2img = K4x4 @ lidar2cam`."""
    out = np.eye(4)
    out[:3, :3] = cam_intrinsic
    return out


# ----------------------------------------------------------------------------- projection


def project_points(points, lidar2img, eps=1e-5):
    """Project 3D points into images. The one projection function of bev3d.

    points:    (..., P, 3) in the frame lidar2img maps from (numpy or torch).
    lidar2img: (..., 4, 4) whose leading dims broadcast against points' leading dims,
               e.g. points (B, 1, Q, 3) with lidar2img (B, N_cam, 4, 4) -> uv (B, N_cam, Q, 2).
    Returns uv (..., P, 2) in pixels and depth (..., P). Points with depth <= eps
    get uv computed with depth clamped to eps: callers mask them with `depth > eps`.
    """
    cam = transform_points(points, lidar2img)  # (..., P, 3): (u*d, v*d, d)
    depth = cam[..., 2]
    if _is_torch(cam):
        uv = cam[..., :2] / depth.clamp(min=eps).unsqueeze(-1)
    else:
        uv = cam[..., :2] / np.maximum(depth, eps)[..., None]
    return uv, depth


# ----------------------------------------------------------------------------- boxes


def box_corners(boxes):
    """(N, >=7) boxes `x y z w l h yaw ...` -> (N, 8, 3) corners (numpy or torch).

    Corner order matches the devkit's `Box.corners()`: the first four corners are the
    front face (+length direction), the last four the back face; within a face the
    order is top-left, top-right, bottom-right, bottom-left seen from outside.
    """
    torch_in = _is_torch(boxes)
    if torch_in:
        import torch

        signs = torch.tensor(_CORNER_SIGNS, dtype=boxes.dtype, device=boxes.device)
        cos, sin = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
        zeros, ones = torch.zeros_like(cos), torch.ones_like(cos)
        stack = torch.stack
    else:
        boxes = np.asarray(boxes, dtype=np.float64)
        signs = np.array(_CORNER_SIGNS)
        cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
        zeros, ones = np.zeros_like(cos), np.ones_like(cos)
        stack = np.stack
    # half extents in the box frame: x along length, y along width, z up
    half = stack([boxes[:, 4], boxes[:, 3], boxes[:, 5]], -1)[:, None, :] / 2  # (N, 1, 3)
    local = signs[None] * half  # (N, 8, 3)
    rot = stack(
        [stack([cos, -sin, zeros], -1), stack([sin, cos, zeros], -1), stack([zeros, zeros, ones], -1)],
        -2,
    )  # (N, 3, 3)
    return local @ _transpose(rot) + boxes[:, None, :3]


# (8, 3) signs of (length, width, height) per corner, in the devkit's order.
_CORNER_SIGNS = [
    [1, 1, 1],
    [1, -1, 1],
    [1, -1, -1],
    [1, 1, -1],
    [-1, 1, 1],
    [-1, -1, 1],
    [-1, -1, -1],
    [-1, 1, -1],
]


# ----------------------------------------------------------------------------- monocular yaw


def _xp(x):
    """The array module of `x`: numpy, or torch for tensors."""
    if _is_torch(x):
        import torch

        return torch
    return np


def camera_yaw(yaw, lidar2cam):
    """LiDAR yaw (...) -> camera yaw (...): the angle of the box's length axis about camera +y (KITTI's
    rotation_y; 0 along camera +x, pi / 2 along camera -z). lidar2cam (..., 4, 4); numpy or torch."""
    xp = _xp(yaw)
    axis = xp.stack([xp.cos(yaw), xp.sin(yaw), xp.zeros_like(yaw)], -1)[..., None]  # (..., 3, 1) LiDAR
    axis = (lidar2cam[..., :3, :3] @ axis)[..., 0]  # (..., 3) camera
    return xp.arctan2(-axis[..., 2], axis[..., 0])


def lidar_yaw(cam_yaw, cam2lidar):
    """Camera yaw (...) -> LiDAR yaw (...), the inverse of `camera_yaw` for cameras whose y axis is vertical
    (a tilted camera loses the tilt of the length axis). cam2lidar (..., 4, 4); numpy or torch."""
    xp = _xp(cam_yaw)
    axis = xp.stack([xp.cos(cam_yaw), xp.zeros_like(cam_yaw), -xp.sin(cam_yaw)], -1)[..., None]  # camera
    axis = (cam2lidar[..., :3, :3] @ axis)[..., 0]
    return xp.arctan2(axis[..., 1], axis[..., 0])


def ray_angle(u, intrinsics):
    """Pixel column u (...) -> the angle (...) of its viewing ray from the optical axis about camera +y
    (atan2(u - c_x, f_x), positive to the right), with intrinsics (..., 3, 3): the camera yaw of a box is its
    local yaw (the observation angle alpha, what its appearance shows) plus this angle of its centre's ray."""
    return _xp(u).arctan2(u - intrinsics[..., 0, 2], intrinsics[..., 0, 0])


def lid_depths(index, num_bins, start, end):
    """Linear-increasing depth discretisation (LID): depth start + (end - start) i (i + 1) / (K (K + 1)) at (float)
    index i (...) of K = num_bins bins; numpy or torch."""
    return start + (end - start) * index * (index + 1) / (num_bins * (num_bins + 1))


def lid_index(depth, num_bins, start, end):
    """Depths (...) -> their continuous LID index (...), the inverse of `lid_depths`; torch."""
    bin_size = 2 * (end - start) / (num_bins * (num_bins + 1))
    return -0.5 + 0.5 * ((1 + 8 * (depth - start) / bin_size).clamp(min=0)).sqrt()
