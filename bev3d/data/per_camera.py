"""The per-camera view of a camera-rig data set: one item per (sample, camera), for monocular detectors.

An item is the rig pipeline's sample with one camera (img (1, 3, H, W), lidar2img (1, 4, 4), intrinsics
(1, 3, 3)) and the boxes that camera sees as mono boxes (`camera_targets`). Only training reads this view:
inference runs all cameras of a sample in one batch and merges their detections (bev3d.models.core.box_coder_mono).
`CameraBoxes` keeps whole rigs and adds what each camera sees, for a rig head's per-camera depth map.
"""

import numpy as np
import torch

from bev3d.geometry import box_corners, camera_yaw, intrinsics_4x4, project_points, ray_angle, wrap_angle

# per-camera entries of the info dict (docs/datasets.md), first axis the camera
CAMERA_KEYS = ("image_paths", "cam_intrinsics", "lidar2cam", "lidar2img", "image_hw")


def one_camera(info, cam):
    """The get_info dict of a rig sample -> the same sample seen by camera `cam` alone."""
    return {**info, **{k: info[k][cam:cam + 1] for k in CAMERA_KEYS}}


def camera_targets(boxes, lidar2img, intrinsics, img_hw):
    """LiDAR boxes (T, 9) seen by one camera -> mono boxes (T', 11) of the boxes whose centre projects into the
    image (H, W) in front of the camera, and the (T',) indices of those boxes.

    A mono box is `u v l t r b depth w l h alpha`: the projected 3D centre (u, v) and the distances from it to the
    left, top, right and bottom edges of the projected box's bounding rectangle (clipped to the image), all as
    fractions of the image width / height; the centre's depth (metres); the size; the local yaw
    (alpha = camera yaw - ray angle of the centre, geometry.ray_angle).
    """
    H, W = img_hw
    uv, depth = project_points(boxes[:, :3], lidar2img)  # (T, 2), (T,)
    keep = np.flatnonzero((depth > 1e-5) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H))
    boxes, uv, depth = boxes[keep], uv[keep], depth[keep]
    corners, _ = project_points(box_corners(boxes), lidar2img)  # (T', 8, 2); corners behind the camera go far
    lo = np.clip(corners.min(1), 0, [W, H])
    hi = np.clip(corners.max(1), 0, [W, H])
    scale = np.array([W, H], dtype=np.float64)
    lt, rb = (uv - lo) / scale, (hi - uv) / scale
    lidar2cam = np.linalg.inv(intrinsics_4x4(intrinsics)) @ lidar2img
    alpha = wrap_angle(camera_yaw(boxes[:, 6], lidar2cam) - ray_angle(uv[:, 0], intrinsics))
    rows = np.concatenate([uv / scale, lt, rb, depth[:, None], boxes[:, 3:6], alpha[:, None]], 1)
    return rows, keep


def item_camera_targets(item, cam):
    """A pipeline item and a camera index -> camera_targets of the item's (augmented) boxes for that camera."""
    return camera_targets(item["targets"]["boxes"].double().numpy(), item["lidar2img"][cam].double().numpy(),
                          item["intrinsics"][cam].double().numpy(), item["img_shape"])


class CameraBoxes(torch.utils.data.Dataset):
    """A rig dataset whose items' targets also carry `camera_boxes`: per camera the (T_n, 11) float32 mono boxes
    it sees (camera_targets), and `camera_labels`, their (T_n,) labels, for the per-camera maps of a rig head
    (model.head.depth_supervision, heatmap_supervision)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def get_info(self, i):  # the streaming sampler orders samples by their scene and time
        return self.dataset.get_info(i)

    def __getitem__(self, i):
        item = self.dataset[i]
        seen = [item_camera_targets(item, cam) for cam in range(len(item["lidar2img"]))]
        item["targets"]["camera_boxes"] = [torch.from_numpy(rows.astype(np.float32)) for rows, _ in seen]
        item["targets"]["camera_labels"] = [item["targets"]["labels"][torch.from_numpy(keep)] for _, keep in seen]
        return item


class PerCameraDataset(torch.utils.data.Dataset):
    """Item i = camera i % N_cam of sample i // N_cam of a NuScenesDataset (with its pipeline): targets are
    {"labels" (T,), "boxes" (T, 11) mono boxes}, the boxes the camera sees after the pipeline's augmentation."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.num_cams = len(dataset.get_info(0)["image_paths"])

    def __len__(self):
        return len(self.dataset) * self.num_cams

    def get_info(self, i):
        sample, cam = divmod(i, self.num_cams)
        return one_camera(self.dataset.get_info(sample), cam)

    def __getitem__(self, i):
        item = self.dataset.pipeline(self.get_info(i))
        rows, keep = item_camera_targets(item, 0)
        item["targets"] = {"labels": item["targets"]["labels"][torch.from_numpy(keep)],
                           "boxes": torch.from_numpy(rows.astype(np.float32))}
        return item
