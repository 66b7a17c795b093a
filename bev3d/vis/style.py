"""Colours and box topology shared by the 3D, camera and BEV pictures.

Predictions take their class colour. Ground truth takes its class colour too when it is drawn
alone, and GT_COLOR when predictions are drawn with it, so that the two stand apart.
Colours are RGB uint8.
"""

import numpy as np

from bev3d.constants import CLASSES

GT_COLOR = (40, 230, 40)
EGO_COLOR = (200, 200, 200)
FRUSTUM_COLOR = (120, 170, 255)

CLASS_COLORS = {
    "car": (255, 158, 0),
    "truck": (0, 150, 255),
    "construction_vehicle": (255, 215, 0),
    "bus": (180, 60, 255),
    "trailer": (190, 130, 80),
    "barrier": (170, 170, 170),
    "motorcycle": (255, 60, 60),
    "bicycle": (0, 220, 220),
    "pedestrian": (90, 100, 255),
    "traffic_cone": (255, 100, 160),
}


def class_color(label):
    """Colour of class index `label` (in bev3d.constants.CLASSES order)."""
    return CLASS_COLORS[CLASSES[int(label)]]


def gt_colors(labels, with_predictions):
    """Colours of ground-truth boxes: GT_COLOR beside predictions, else the class colours."""
    return [GT_COLOR if with_predictions else class_color(lb) for lb in labels]


def class_name(label):
    return CLASSES[int(label)]


# The 12 edges of `bev3d.geometry.box_corners`: front face 0-3, back face 4-7, corner i -> i+4.
BOX_EDGES = np.array(
    [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]]
)
# Heading mark: the two diagonals of the front face.
FRONT_CROSS = np.array([[0, 2], [1, 3]])

# The nuScenes ego car (Renault Zoe) in the ego frame: length, width, height in metres, and the
# offset of its centre ahead of the rear axle (the ego origin).
EGO_SIZE = (4.08, 1.73, 1.56)
EGO_CENTER_AHEAD = 1.35

# LIDAR_TOP -> ego as mounted on the nuScenes car (LiDAR y forward): used when no lidar2ego is given.
NUSCENES_LIDAR2EGO = np.array(
    [[0.0, 1.0, 0.0, 0.94], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.84], [0.0, 0.0, 0.0, 1.0]]
)


def ego_box(lidar2ego=None):
    """(1, 9) box of the ego car in the LiDAR frame."""
    lidar2ego = NUSCENES_LIDAR2EGO if lidar2ego is None else np.asarray(lidar2ego, dtype=np.float64)
    ego2lidar = np.linalg.inv(lidar2ego)
    length, width, height = EGO_SIZE
    center = ego2lidar @ np.array([EGO_CENTER_AHEAD, 0.0, height / 2, 1.0])
    forward = ego2lidar[:3, :3] @ np.array([1.0, 0.0, 0.0])
    yaw = np.arctan2(forward[1], forward[0])
    return np.array([[*center[:3], width, length, height, yaw, 0.0, 0.0]])


def ego_axes(lidar2ego=None):
    """(origin, forward, up) of the ego frame expressed in the LiDAR frame."""
    lidar2ego = NUSCENES_LIDAR2EGO if lidar2ego is None else np.asarray(lidar2ego, dtype=np.float64)
    ego2lidar = np.linalg.inv(lidar2ego)
    return ego2lidar[:3, 3], ego2lidar[:3, 0], ego2lidar[:3, 2]


def height_colors(z, z_min=-2.5, z_max=3.0):
    """(P,) heights -> (P, 3) float RGB in [0, 1] (matplotlib's turbo colormap)."""
    from matplotlib import colormaps

    t = np.clip((np.asarray(z) - z_min) / (z_max - z_min), 0.0, 1.0)
    return colormaps["turbo"](t)[:, :3]


def select(boxes, labels, scores, score_thr):
    """Drop predictions under `score_thr`; returns numpy (K, 9), (K,), (K,) or empties."""
    if boxes is None:
        return np.zeros((0, 9)), np.zeros(0, dtype=np.int64), np.zeros(0)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = np.zeros((0, 9))
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    keep = scores >= score_thr
    return boxes[keep], labels[keep], scores[keep]
