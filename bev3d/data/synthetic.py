"""Synthetic camera rig written in the nuScenes v1.0-mini on-disk format.

Each scene is a straight road (lanes, parking strips, sidewalks) driven by the ego
car at constant speed. Objects of the 10 detection classes sit in lanes: vehicles
drive or park, cyclists ride, pedestrians walk or stand, cones and barriers line
the road. Every key frame gets six rendered camera images (flat-shaded textured
cuboids over a textured ground plane and sky, painter's algorithm), a ray-cast
LIDAR_TOP sweep and the 13 devkit tables, so `nuscenes.NuScenes` loads it and
`DetectionEval` scores it like the real mini split.

Design choices that keep the set learnable by a tiny model in minutes:
- each class has its own hue (shading and the texture pattern change brightness
  only) and its own stripe/check pattern;
- ~10-20 objects within 35 m per sample, class-typical sizes;
- objects are drawn at their key-frame (annotation) pose, each camera from its own
  ego pose at its own timestamp, so the devkit's projection of an annotation lands
  on the drawn object in every camera.
"""

import hashlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bev3d.constants import CAMERAS, CLASSES
from bev3d.errors import Bev3dError
from bev3d.geometry import box_corners, transform_matrix, transform_points, yaw_to_quaternion

VERSION = "v1.0-mini"
# The devkit hard-codes the split scene names (nuscenes/utils/splits.py).
MINI_TRAIN = ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077", "scene-1094",
              "scene-1100")
MINI_VAL = ("scene-0103", "scene-0916")

# Real nuScenes calibration (log n015, v1.0-mini calibrated_sensor rows): sensor -> ego, rotation w x y z,
# intrinsics at 1600x900.
RIG = {
    "CAM_FRONT": ([1.70079118954, 0.0159456324149, 1.51095763913],
                  [0.4998015430569128, -0.5030316162024876, 0.4997798114386805, -0.49737083824542755],
                  [1266.417203046554, 816.2670197447984, 491.50706579294757]),
    "CAM_FRONT_RIGHT": ([1.5508477543, -0.493404796419, 1.49574800619],
                        [0.2060347966337182, -0.2026940577919598, 0.6824507824531167, -0.6713610884174485],
                        [1260.8474446004698, 807.968244525554, 495.3344268742088]),
    "CAM_FRONT_LEFT": ([1.52387798135, 0.494631336551, 1.50932822144],
                       [0.6757265034669446, -0.6736266522251881, 0.21214015046209478, -0.21122827103904068],
                       [1272.5979470598488, 826.6154927353808, 479.75165386361925]),
    "CAM_BACK": ([0.0283260309358, 0.00345136761476, 1.57910346144],
                 [0.5037872666382278, -0.49740249788611096, -0.4941850223835201, 0.5045496097725578],
                 [809.2209905677063, 829.2196003259838, 481.77842384512485]),
    "CAM_BACK_LEFT": ([1.03569100218, 0.484795032713, 1.59097014818],
                      [0.6924185592174665, -0.7031619420114925, -0.11648342771943819, 0.11203317912370753],
                      [1256.7414812095406, 792.1125740759628, 492.7757465151356]),
    "CAM_BACK_RIGHT": ([1.0148780988, -0.480568219723, 1.56239545128],
                       [0.12280980120078765, -0.132400842670559, -0.7004305821388234, 0.690496031265798],
                       [1259.5137405846733, 807.2529053838625, 501.19579884916527]),
}
LIDAR_RIG = ([0.943713, 0.0, 1.84023],
             [0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817])
# Cameras fire as the spinning LiDAR sweeps past them: offsets from the key frame (microseconds).
CAM_OFFSETS_US = {"CAM_FRONT": 12000, "CAM_FRONT_RIGHT": 20000, "CAM_BACK_RIGHT": 28000, "CAM_BACK": 37000,
                  "CAM_BACK_LEFT": -4000, "CAM_FRONT_LEFT": 4000}
NATIVE_SIZE = (1600, 900)
# Bump when what the rig writes changes: `bev3d demo` then rewrites a set an older rig wrote.
RIG_VERSION = 3  # 3: 80 samples per scene by default (was 40)
RIG_STAMP = "synthetic_rig.json"  # in the dataset root, next to the tables' folder
SAMPLE_PERIOD_US = 500_000  # key frames at 2 Hz
# Twice a real nuScenes scene (40 s instead of 20 s): more distinct views for the demo's tiny PETR in the same
# number of steps (mAP 0.245 vs 0.193 on 160 validation samples, docs/datasets.md).
SAMPLES_PER_SCENE = 80


@dataclass(frozen=True)
class ClassSpec:
    category: str  # nuScenes category that the devkit maps to this detection class
    size: tuple  # mean (w, l, h) in metres
    hue: int  # OpenCV hue 0..179: the class's colour identity
    pattern: tuple  # (cells across, cells down, "h" stripes | "v" stripes | "c" checks | "s" solid)


SPECS = {
    "car": ClassSpec("vehicle.car", (1.95, 4.6, 1.7), 0, (1, 4, "h")),
    "truck": ClassSpec("vehicle.truck", (2.5, 6.9, 2.9), 18, (6, 1, "v")),
    "construction_vehicle": ClassSpec("vehicle.construction", (2.8, 6.4, 3.2), 36, (4, 4, "c")),
    "bus": ClassSpec("vehicle.bus.rigid", (2.95, 11.0, 3.5), 54, (8, 2, "c")),
    "trailer": ClassSpec("vehicle.trailer", (2.9, 12.0, 3.8), 72, (1, 2, "h")),
    "barrier": ClassSpec("movable_object.barrier", (2.5, 0.5, 1.0), 90, (6, 1, "v")),
    "motorcycle": ClassSpec("vehicle.motorcycle", (0.8, 2.1, 1.5), 108, (2, 2, "c")),
    "bicycle": ClassSpec("vehicle.bicycle", (0.6, 1.7, 1.3), 126, (3, 1, "v")),
    "pedestrian": ClassSpec("human.pedestrian.adult", (0.67, 0.73, 1.77), 144, (1, 3, "h")),
    "traffic_cone": ClassSpec("movable_object.trafficcone", (0.45, 0.45, 1.05), 162, (1, 5, "h")),
}

# All nuScenes categories and attributes, so the tables look like the real ones.
CATEGORIES = (
    "animal", "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility", "human.pedestrian.police_officer", "human.pedestrian.stroller",
    "human.pedestrian.wheelchair", "movable_object.barrier", "movable_object.debris",
    "movable_object.pushable_pullable", "movable_object.trafficcone", "static_object.bicycle_rack",
    "vehicle.bicycle", "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction",
    "vehicle.emergency.ambulance", "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer",
    "vehicle.truck",
)
ATTRIBUTES = ("vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
              "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving")
VISIBILITY = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))

# Road layout, in the road frame (x along the ego's direction of travel, y to its left).
# Each lane: lateral position, motion ("ego" lane speed, "same"/"oncoming" traffic, "ride" cyclists,
# "walk" pedestrians, "static"), class weights and the gap range (m) between consecutive objects.
# Gaps are tuned for ~10-20 objects within 35 m of the ego and moderate occlusion of the sidewalks; the
# weights make the classes about equally frequent (nuScenes' mAP averages over classes, and rare
# classes are the slowest to learn), not nuScenes' 10:1 imbalance between cars and the rarest class.
LANES = (
    (0.0, "ego", {"car": 2, "truck": 2, "bus": 1, "motorcycle": 1, "construction_vehicle": 1}, (25.0, 55.0)),
    (-3.5, "same", {"car": 2, "truck": 1, "bus": 1, "trailer": 1, "construction_vehicle": 2, "motorcycle": 1},
     (18.0, 45.0)),
    (3.5, "oncoming", {"car": 2, "truck": 1, "bus": 1, "trailer": 1, "construction_vehicle": 1, "motorcycle": 1},
     (18.0, 45.0)),
    (-6.9, "static", {"car": 2, "truck": 2, "trailer": 2, "construction_vehicle": 3, "bus": 1}, (12.0, 40.0)),
    (6.7, "ride", {"bicycle": 3, "motorcycle": 2}, (35.0, 80.0)),
    (-9.0, "static", {"bicycle": 2, "motorcycle": 2, "traffic_cone": 3, "barrier": 3}, (15.0, 45.0)),
    (8.9, "static", {"traffic_cone": 3, "barrier": 4, "bicycle": 1}, (15.0, 45.0)),
    (-10.8, "walk", {"pedestrian": 1}, (20.0, 60.0)),
    (-12.0, "static", {"pedestrian": 1}, (20.0, 60.0)),
    (10.6, "walk", {"pedestrian": 1}, (20.0, 60.0)),
)
ROAD_HALF_WIDTH = 5.25
SIDEWALK_END = 13.5
ANNOTATION_RADIUS = 65.0  # objects annotated up to here (the devkit evaluates up to 50 m)
RENDER_RADIUS = 85.0
FILL_RADIUS = 95.0
ANCHOR_RADIUS = 20.0  # one object of every class starts within this distance of the ego
MOVING_SPEED = 0.2  # m/s: above this an object is "moving" (the rule boxes_to_nuscenes uses)
LIDAR_BEAMS = np.deg2rad(np.linspace(-30.67, 10.67, 32))
LIDAR_AZIMUTHS = 1024
LIDAR_RANGE = 100.0
NEAR = 0.1  # near clipping plane of the renderer (m)
SUN = np.array([0.35, 0.55, 0.76]) / np.linalg.norm([0.35, 0.55, 0.76])


def class_bgr(label, value=220):
    """The base BGR colour of class `label` (saturation 200); shading scales the value only."""
    hsv = np.array([[[SPECS[CLASSES[label]].hue, 200, value]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)


def scaled_intrinsics(channel, image_size):
    """(3, 3) intrinsics of `channel` for an image of `image_size` (W, H); pixel corners at integers."""
    f, cx, cy = RIG[channel][2]
    sx, sy = image_size[0] / NATIVE_SIZE[0], image_size[1] / NATIVE_SIZE[1]
    return np.array([[f * sx, 0.0, cx * sx], [0.0, f * sy, cy * sy], [0.0, 0.0, 1.0]])


def _token(*parts):
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


# ----------------------------------------------------------------------------- scene layout


@dataclass(eq=False)
class Track:
    """One object instance: a class in a lane, moving at constant speed along the road."""

    label: int
    size: np.ndarray  # (w, l, h)
    x0: float  # road-frame x at t = 0
    y: float
    speed: float  # signed, along road x
    yaw: float  # road-frame yaw
    attribute: str  # "" for barriers and cones

    def position(self, t):
        return np.array([self.x0 + self.speed * t, self.y, self.size[2] / 2])


def _attribute(name, moving):
    if name in ("barrier", "traffic_cone"):
        return ""
    if name == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    if name in ("bicycle", "motorcycle"):
        return "cycle.with_rider" if moving else "cycle.without_rider"
    return "vehicle.moving" if moving else "vehicle.parked"


def _new_track(rng, name, lane, speed, x0):
    spec = SPECS[name]
    size = np.array(spec.size) * rng.uniform(0.92, 1.08, 3)
    if speed != 0.0:
        yaw = 0.0 if speed > 0 else math.pi
    elif name in ("bicycle", "motorcycle"):
        yaw = rng.choice([-1, 1]) * math.pi / 2 + rng.normal(0, 0.15)  # parked across the curb
    elif name == "barrier":
        yaw = math.pi / 2 + rng.normal(0, 0.1)  # the long side (w) along the road
    elif name in ("pedestrian", "traffic_cone"):
        yaw = rng.uniform(-math.pi, math.pi)
    else:
        # parked vehicles: slightly skewed, less for long ones so they stay out of the traffic lane
        yaw = rng.choice([0.0, math.pi]) + rng.normal(0, 0.25 / spec.size[1])
    y = lane[0] + (rng.normal(0, 0.15) if speed == 0.0 else 0.0)
    return Track(CLASSES.index(name), size, x0, y, speed, float(yaw), _attribute(name, abs(speed) > MOVING_SPEED))


def _footprint(track):
    """Extent (m) of the track along the road, for spacing objects in a lane."""
    w, l = track.size[:2]
    return abs(l * math.cos(track.yaw)) + abs(w * math.sin(track.yaw))


def _lane_speeds(rng, v_ego):
    return {
        "ego": v_ego,
        "same": v_ego + rng.uniform(-2.0, 3.0),
        "oncoming": -rng.uniform(5.0, 9.0),
        "ride": -rng.uniform(2.5, 4.5),
        "static": 0.0,
        "walk": 0.0,  # each walk lane draws its own speed in _fill_lane
    }


def _fill_lane(rng, lane, speed, x_lo, x_hi, anchors):
    """Place objects along one lane from x_lo to x_hi (t = 0), keeping the anchors and the gaps."""
    y, motion, weights, (gap_lo, gap_hi) = lane
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    p /= p.sum()
    if motion == "walk":
        speed = rng.choice([-1, 1]) * rng.uniform(0.9, 1.6)
    tracks = list(anchors)
    occupied = [(a.x0 - _footprint(a) / 2, a.x0 + _footprint(a) / 2) for a in anchors]
    x = x_lo + rng.uniform(0, gap_hi)
    while x < x_hi:
        track = _new_track(rng, names[rng.choice(len(names), p=p)], lane, speed, 0.0)
        half = _footprint(track) / 2
        track.x0 = x + half
        lo, hi = x - gap_lo, x + 2 * half + gap_lo
        clash = [b for a, b in occupied if a < hi and b > lo]
        # the ego drives in lane 0 at the lane's speed: keep its own footprint free
        ego_clash = motion == "ego" and abs(track.x0) < 10.0 + half
        if clash or ego_clash:
            x = (max(clash) if clash else 10.0) + gap_lo + 1e-3
            continue
        tracks.append(track)
        x = track.x0 + half + rng.uniform(gap_lo, gap_hi)
    return tracks


def _make_scene(rng, duration):
    """All tracks of one scene (road frame) and the ego speed."""
    v_ego = rng.uniform(3.0, 7.0)
    speeds = _lane_speeds(rng, v_ego)
    # one anchor object of every class near the ego at t = 0, so even a short scene has all 10 classes
    anchors = {i: [] for i in range(len(LANES))}
    for name in CLASSES:
        lanes = [i for i, lane in enumerate(LANES) if name in lane[2]]
        for _ in range(100):
            i = lanes[rng.integers(len(lanes))]
            track = _new_track(rng, name, LANES[i], speeds[LANES[i][1]], rng.uniform(-ANCHOR_RADIUS, ANCHOR_RADIUS))
            half = _footprint(track) / 2
            if LANES[i][1] == "walk":
                track.speed = 0.0  # walk-lane anchors stand, so they never collide with the lane's walkers
                track.attribute = _attribute(name, False)
            free = all(abs(track.x0 - a.x0) > half + _footprint(a) / 2 + 1.0 for a in anchors[i])
            if free and not (LANES[i][1] == "ego" and abs(track.x0) < 10.0 + half):
                anchors[i].append(track)
                break
    tracks = []
    for i, lane in enumerate(LANES):
        speed = speeds[lane[1]]
        # cover every x the lane's objects take while inside FILL_RADIUS of the ego during the scene
        drift = (v_ego - speed) * duration
        x_lo, x_hi = min(0.0, drift) - FILL_RADIUS, max(0.0, drift) + FILL_RADIUS
        lane_tracks = _fill_lane(rng, lane, speed, x_lo, x_hi, anchors[i])
        if lane[1] == "walk":
            # walkers share the lane's speed, anchors stand: drop walkers that would pass through an anchor
            lane_tracks = [t for t in lane_tracks if t in anchors[i] or not any(
                min(t.x0, t.x0 + t.speed * duration) - 1.0 < a.x0 < max(t.x0, t.x0 + t.speed * duration) + 1.0
                for a in anchors[i])]
        tracks += lane_tracks
    return v_ego, tracks


# ----------------------------------------------------------------------------- rendering


# The ground texture is periodic along the road (period 72 m: 8 m tile pairs, 9 m dashes, 1.5 m paving),
# so a pixel's colour is a table lookup: (lateral kind, haze level, x mod 72 m in 1 cm steps). The
# table holds two periods, so shifting by the ego's position needs no wrap-around.
_PERIOD, _STEPS, _HAZE_LEVELS = 72.0, 7200, 16
_FOG = np.array([225.0, 222.0, 218.0])
_VERGE = np.array([88.0, 112.0, 104.0])  # muted green-grey: low saturation, never confused with a class hue


def _ground_lut():
    """(9 * _HAZE_LEVELS * 2 * _STEPS,) packed ground colours; see _lateral_kind for the 9 kinds."""
    x = np.arange(2 * _STEPS) * (_PERIOD / _STEPS)
    tile_x = np.floor(x / 4.0) % 2
    dash = (x % 9.0) < 3.0
    grout = np.abs(x / 1.5 - np.round(x / 1.5)) < 0.04
    grey = lambda g: np.repeat(np.asarray(g, np.float64)[..., None], 3, -1) * np.ones((len(x), 1))  # noqa: E731
    kinds = [
        grey(78.0 + 10.0 * tile_x),  # 0, 1: asphalt in 4 m checker tiles (lateral parity 0 / 1)
        grey(78.0 + 10.0 * (1 - tile_x)),
        grey(np.where(dash, 215.0, 78.0 + 10.0 * tile_x)),  # 2, 3: dashed lane line over asphalt
        grey(np.where(dash, 215.0, 78.0 + 10.0 * (1 - tile_x))),
        grey(np.full(len(x), 215.0)),  # 4: solid edge line
        grey(np.where(grout, 118.0, 150.0)),  # 5: paving, grout lines across
        grey(np.full(len(x), 118.0)),  # 6: paving, grout line along
        _VERGE + 8.0 * tile_x[:, None],  # 7, 8: verge
        _VERGE + 8.0 * (1 - tile_x[:, None]),
    ]
    haze = np.linspace(0.0, 1.0, _HAZE_LEVELS)[:, None, None]
    lut = np.stack([k[None] * haze + _FOG * (1 - haze) for k in kinds])  # (9, levels, steps, 3)
    return _pack_bgr(lut.reshape(-1, 3))


def _pack_bgr(bgr):
    """(..., 3) colours -> (...,) uint32 BGRA words, so a pixel is gathered in one memory access."""
    out = np.zeros(bgr.shape[:-1] + (4,), np.uint8)
    out[..., :3] = bgr
    return out.view(np.uint32)[..., 0]


def _lateral_kind(y):
    """Road-frame y -> the ground LUT's kind index (0..8)."""
    ay = np.abs(y)
    parity = (np.floor(y / 4.0) % 2).astype(np.int64)
    kind = np.where(ay < ROAD_HALF_WIDTH, parity, 0)
    kind = np.where((np.abs(ay - 1.75) < 0.08), 2 + parity, kind)
    kind = np.where(np.abs(ay - ROAD_HALF_WIDTH + 0.15) < 0.1, 4, kind)
    sidewalk = (ay >= ROAD_HALF_WIDTH) & (ay < SIDEWALK_END)
    on_grout = np.abs(y / 1.5 - np.round(y / 1.5)) < 0.04
    kind = np.where(sidewalk, np.where(on_grout, 6, 5), kind)
    return np.where(ay >= SIDEWALK_END, 7 + parity, kind)


def _camera_statics(channel, image_size):
    """Per camera: the packed sky image, flat indices of ground pixels and their LUT index at s_ego = 0."""
    K = scaled_intrinsics(channel, image_size)
    cam2ego = transform_matrix(RIG[channel][0], RIG[channel][1])
    w, h = image_size
    # ray (ego frame, unnormalised) through pixel centre (u, v): u * a + v * b + c
    a, b, c = (cam2ego[:3, :3] @ np.linalg.inv(K)).T.astype(np.float32)
    u = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    v = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    rays = [(u * a[k] + v * b[k] + c[k]).reshape(-1) for k in range(3)]
    origin = cam2ego[:3, 3]
    ground = np.flatnonzero(rays[2] < -1e-3 * np.sqrt(rays[0] ** 2 + rays[1] ** 2))
    t = -origin[2] / rays[2][ground]
    hit_x = origin[0] + rays[0][ground] * t
    hit_y = origin[1] + rays[1][ground] * t
    far = np.hypot(hit_x - origin[0], hit_y - origin[1]) > 400.0
    ground, hit_x, hit_y = ground[~far], hit_x[~far], hit_y[~far]
    haze = np.exp(-np.hypot(hit_x - origin[0], hit_y - origin[1]) / 90.0)
    level = np.round(haze * (_HAZE_LEVELS - 1)).astype(np.int64)
    step = np.minimum(np.floor(np.mod(hit_x, _PERIOD) * (_STEPS / _PERIOD)), _STEPS - 1)
    index = (_lateral_kind(hit_y) * _HAZE_LEVELS + level) * (2 * _STEPS) + step.astype(np.int64)
    # sky: pale blue-grey (low saturation), lighter towards the horizon
    elev = np.clip(rays[2] / np.sqrt(rays[0] ** 2 + rays[1] ** 2 + rays[2] ** 2), 0.0, 1.0)[:, None]
    sky = np.array([235.0, 225.0, 215.0], np.float32) * (1 - elev) + np.array([220.0, 190.0, 165.0], np.float32) * elev
    return _pack_bgr(sky), ground.astype(np.int32), index.astype(np.int32)


_STATIC_CACHE = {}


def _statics(channel, image_size):
    key = (channel, tuple(image_size))
    if key not in _STATIC_CACHE:
        _STATIC_CACHE[key] = _camera_statics(channel, image_size)
    if "lut" not in _STATIC_CACHE:
        _STATIC_CACHE["lut"] = _ground_lut()
    return _STATIC_CACHE[key], _STATIC_CACHE["lut"]


def _ground_image(channel, image_size, s_ego):
    """Sky + textured ground seen by a camera whose ego is at road x = s_ego (y = 0), (H, W, 3) uint8."""
    (sky, ground, index), lut = _statics(channel, image_size)
    img = sky.copy()
    img[ground] = lut[index + int(s_ego % _PERIOD * (_STEPS / _PERIOD))]
    return cv2.cvtColor(img.view(np.uint8).reshape(image_size[1], image_size[0], 4), cv2.COLOR_BGRA2BGR)


# Faces of a box as quads of box_corners indices: front, back, left, right, top. The first edge runs
# across the face, the second from top to bottom (for the top face: from back to front).
_FACES = np.array([[0, 1, 2, 3], [5, 4, 7, 6], [4, 0, 3, 7], [1, 5, 6, 2], [4, 5, 1, 0]])


def _cell_weights(pattern):
    """Bilinear weights splitting a quad into pattern cells: (C, 4, 4) and (C,) dark flags, so that the
    cells of a (4, 3) quad are `weights @ quad`."""
    nu, nv, kind = pattern
    a = np.linspace(0.0, 1.0, nu + 1)[None, :]  # across
    b = np.linspace(0.0, 1.0, nv + 1)[:, None]  # down
    grid = np.stack([(1 - a) * (1 - b), a * (1 - b), a * b, (1 - a) * b], -1)  # (nv + 1, nu + 1, 4)
    cells = np.stack([grid[:-1, :-1], grid[:-1, 1:], grid[1:, 1:], grid[1:, :-1]], axis=2)  # (nv, nu, 4, 4)
    j, i = np.meshgrid(np.arange(nu), np.arange(nv))
    dark = {"h": i % 2 == 1, "v": j % 2 == 1, "c": (i + j) % 2 == 1, "s": np.zeros_like(i, bool)}[kind]
    return cells.reshape(-1, 4, 4), dark.reshape(-1)


_SIDE_CELLS = {name: _cell_weights(spec.pattern) for name, spec in SPECS.items()}
_TOP_CELLS = _cell_weights((1, 1, "s"))


def _clip_near(poly):
    """Clip a convex polygon (P, 3) in camera coordinates to depth >= NEAR (Sutherland-Hodgman)."""
    out = []
    for k in range(len(poly)):
        p, q = poly[k], poly[(k + 1) % len(poly)]
        if p[2] >= NEAR:
            out.append(p)
        if (p[2] >= NEAR) != (q[2] >= NEAR):
            out.append(p + (q - p) * (NEAR - p[2]) / (q[2] - p[2]))
    return np.array(out)


def _fill_polys(img, polys, K, colours):
    """Fill convex polygons (M, P, 3) given in camera coordinates, clipped at the near plane."""
    uv = polys @ K.T
    uv = uv[..., :2] / np.maximum(uv[..., 2:], NEAR)
    # pixel centres are at integer + 0.5 (docs/conventions.md); OpenCV puts them at integers
    pts = np.round((np.clip(uv, -1e5, 1e5) - 0.5) * 16).astype(np.int32)
    clipped = polys[..., 2].min(1) < NEAR * (1 - 1e-6)  # clipped vertices sit on NEAR up to rounding
    for m in range(len(polys)):
        if not clipped[m]:
            cv2.fillConvexPoly(img, pts[m], colours[m], lineType=cv2.LINE_8, shift=4)
            continue
        poly = _clip_near(polys[m])
        if len(poly) >= 3:
            _fill_polys(img, poly[None], K, colours[m:m + 1])


def render_camera(img, boxes, labels, global2cam, K):
    """Draw boxes (N, 7) global `x y z w l h yaw` with their class colours onto img, far to near."""
    if len(boxes) == 0:
        return img
    corners = transform_points(box_corners(boxes), global2cam)  # (N, 8, 3) camera frame
    centres = transform_points(boxes[:, :3], global2cam)
    uv = corners @ K.T
    uv = uv[..., :2] / np.maximum(uv[..., 2:], NEAR)
    h, w = img.shape[:2]
    outside = (uv[..., 0] < 0).all(1) | (uv[..., 0] > w).all(1) | (uv[..., 1] < 0).all(1) | (uv[..., 1] > h).all(1)
    keep = np.flatnonzero((corners[..., 2].max(1) > NEAR) & ~(outside & (corners[..., 2].min(1) > NEAR)))
    if len(keep) == 0:
        return img
    corners, centres, labels = corners[keep], centres[keep], np.asarray(labels)[keep]
    # contact shadows first: every object covers them
    bottom = corners[:, [3, 2, 6, 7]]
    mid = bottom.mean(1, keepdims=True)
    _fill_polys(img, mid + (bottom - mid) * 1.2, K, [(45, 45, 45)] * len(keep))
    quads = corners[:, _FACES]  # (N, 5, 4, 3)
    face_mid = quads.mean(2)
    normals = face_mid - centres[:, None]
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    visible = (normals * -face_mid).sum(-1) > 0  # front faces: the camera (origin) is outside their plane
    shade = 0.5 + 0.5 * np.clip(normals @ (global2cam[:3, :3] @ SUN), 0.0, None)  # (N, 5)
    for n in np.argsort(-np.linalg.norm(centres, axis=1)):
        base = class_bgr(labels[n])
        polys, colours = [], []
        for f in np.flatnonzero(visible[n]):
            weights, dark = _SIDE_CELLS[CLASSES[labels[n]]] if f < 4 else _TOP_CELLS
            polys.append(weights @ quads[n, f])
            colours.append(base[None] * shade[n, f] * np.where(dark, 0.6, 1.0)[:, None])
        if polys:
            _fill_polys(img, np.concatenate(polys), K, np.concatenate(colours).tolist())
    return img


# ----------------------------------------------------------------------------- LiDAR


def _lidar_rays():
    """(B, A, 3) unit ray directions in the LiDAR frame: beam b, azimuth column a (from -pi)."""
    el, az = np.meshgrid(LIDAR_BEAMS, -math.pi + 2 * math.pi * np.arange(LIDAR_AZIMUTHS) / LIDAR_AZIMUTHS,
                         indexing="ij")
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)


def cast_lidar(boxes, labels, lidar2global):
    """Ray-cast a 32-beam sweep against boxes (N, 7, global) and the ground z = 0 -> (P, 5) float32
    points `x y z intensity ring` in the LiDAR frame."""
    dirs = _lidar_rays()  # (B, A, 3) LiDAR frame
    rot, origin = lidar2global[:3, :3], lidar2global[:3, 3]
    d = dirs @ rot.T  # (B, A, 3) global
    with np.errstate(divide="ignore"):
        t_best = np.where(d[..., 2] < -1e-6, -origin[2] / d[..., 2], np.inf)
    intensity = np.full(t_best.shape, 8.0)
    corners = box_corners(boxes)  # (N, 8, 3) global
    step = 2 * math.pi / LIDAR_AZIMUTHS
    for n in range(len(boxes)):
        # only the azimuth columns the box spans from the sensor can hit it
        local = (corners[n] - origin) @ rot  # LiDAR frame
        az = np.arctan2(local[:, 1], local[:, 0])
        mid = az[0]  # the box never holds the sensor, so its corners span less than pi around any one
        span = (az - mid + math.pi) % (2 * math.pi) - math.pi
        lo = math.floor((mid + span.min() + math.pi) / step)
        hi = math.ceil((mid + span.max() + math.pi) / step)
        cols = np.arange(lo, hi + 1) % LIDAR_AZIMUTHS
        sub = d[:, cols]  # (B, C, 3)
        c, s = math.cos(boxes[n, 6]), math.sin(boxes[n, 6])
        rel = origin - boxes[n, :3]
        o_loc = np.array([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])
        d_loc = np.stack([c * sub[..., 0] + s * sub[..., 1], -s * sub[..., 0] + c * sub[..., 1], sub[..., 2]], -1)
        half = np.array([boxes[n, 4], boxes[n, 3], boxes[n, 5]]) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-half - o_loc) / d_loc
            t2 = (half - o_loc) / d_loc
        t_near = np.nanmax(np.minimum(t1, t2), -1)
        t_far = np.nanmin(np.maximum(t1, t2), -1)
        t_hit = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
        closer = t_hit < t_best[:, cols]
        t_best[:, cols] = np.where(closer, t_hit, t_best[:, cols])
        intensity[:, cols] = np.where(closer, 30.0 + 6.0 * labels[n], intensity[:, cols])
    ring = np.broadcast_to(np.arange(len(LIDAR_BEAMS))[:, None], t_best.shape)
    keep = t_best < LIDAR_RANGE
    pts = dirs[keep] * t_best[keep, None]
    return np.concatenate([pts, intensity[keep, None], ring[keep, None]], 1).astype(np.float32)


def points_in_boxes(points, boxes, margin=0.02):
    """(P, 3) points, (N, 7) boxes in the same frame -> (N,) number of points inside each box (+margin)."""
    order = np.argsort(points[:, 0])
    xs = points[order, 0]
    counts = np.zeros(len(boxes), dtype=np.int64)
    for n, box in enumerate(boxes):
        reach = np.hypot(box[3], box[4]) / 2 + margin
        cand = order[np.searchsorted(xs, box[0] - reach):np.searchsorted(xs, box[0] + reach)]
        rel = points[cand, :3] - box[:3]
        c, s = math.cos(box[6]), math.sin(box[6])
        x = c * rel[:, 0] + s * rel[:, 1]
        y = -s * rel[:, 0] + c * rel[:, 1]
        counts[n] = np.count_nonzero((np.abs(x) <= box[4] / 2 + margin) & (np.abs(y) <= box[3] / 2 + margin)
                                     & (np.abs(rel[:, 2]) <= box[5] / 2 + margin))
    return counts


# ----------------------------------------------------------------------------- per-sample work


def _render_sample(job):
    """Write the six images and the LiDAR sweep of one key frame; returns lidar point counts per annotation."""
    cv2.setNumThreads(1)
    root = Path(job["root"])
    boxes, labels = job["boxes"], job["labels"]
    for cam in job["cams"]:
        img = _ground_image(cam["channel"], job["image_size"], cam["s_ego"])
        render_camera(img, boxes, labels, cam["global2cam"], cam["K"])
        cv2.imwrite(str(root / cam["filename"]), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    lidar2global = job["lidar2global"]
    cloud = cast_lidar(boxes, labels, lidar2global)
    cloud.tofile(root / job["lidar_filename"])
    pts_global = transform_points(cloud[:, :3].astype(np.float64), lidar2global)
    ann = job["annotated"]
    return points_in_boxes(pts_global, boxes[ann]).tolist()


# ----------------------------------------------------------------------------- writer


def _pose_record(token, timestamp, ego_xy, heading):
    return {"token": token, "timestamp": int(timestamp), "rotation": yaw_to_quaternion(heading).tolist(),
            "translation": [float(ego_xy[0]), float(ego_xy[1]), 0.0]}


def _link(records):
    for prev, nxt in zip(records[:-1], records[1:]):
        prev["next"], nxt["prev"] = nxt["token"], prev["token"]


def write_synthetic_nuscenes(out_dir, seed=0, train_scenes=8, val_scenes=2, samples_per_scene=SAMPLES_PER_SCENE,
                             image_size=(1600, 900), workers=None, verbose=False):
    """Write the synthetic rig as a nuScenes v1.0-mini dataset under out_dir; returns the root Path.

    The default 8 + 2 scenes of 80 samples (40 s at 2 Hz) give 640 training and 160 validation samples
    with ~10-20 evaluated objects each.
    """
    if not 0 <= train_scenes <= len(MINI_TRAIN) or not 0 <= val_scenes <= len(MINI_VAL):
        raise Bev3dError(f"--train-scenes must be 0..{len(MINI_TRAIN)} and val scenes "
                         f"0..{len(MINI_VAL)} (the devkit's mini_train/mini_val scene names); got "
                         f"{train_scenes} and {val_scenes}.")
    if train_scenes + val_scenes == 0:
        raise Bev3dError("Asked for zero scenes; use --train-scenes 1 or more.")
    if samples_per_scene < 2:
        raise Bev3dError(f"--samples-per-scene must be >= 2 (velocities need two key frames); "
                         f"got {samples_per_scene}.")
    width, height = (int(v) for v in image_size)
    if width < 32 or height < 32:
        raise Bev3dError(f"--image-size {width}x{height} is too small; use e.g. 1600x900.")
    root = Path(out_dir)
    for sub in (VERSION, "samples", "maps", ".bev3d_cache"):
        shutil.rmtree(root / sub, ignore_errors=True)
    for channel in CAMERAS + ("LIDAR_TOP",):
        (root / "samples" / channel).mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    (root / VERSION).mkdir(parents=True, exist_ok=True)

    tables = {name: [] for name in ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log",
                                    "map", "sample", "sample_annotation", "sample_data", "scene", "sensor",
                                    "visibility")}
    tables["attribute"] = [{"token": _token("attribute", a), "name": a, "description": a} for a in ATTRIBUTES]
    tables["category"] = [{"token": _token("category", c), "name": c, "description": c, "index": i}
                          for i, c in enumerate(CATEGORIES)]
    tables["visibility"] = [{"token": t, "level": level, "description": f"visibility of whole object is {level}"}
                            for t, level in VISIBILITY]
    attr_token = {a["name"]: a["token"] for a in tables["attribute"]}
    cat_token = {c["name"]: c["token"] for c in tables["category"]}
    calib = {}
    for channel in CAMERAS + ("LIDAR_TOP",):
        modality = "lidar" if channel == "LIDAR_TOP" else "camera"
        sensor = {"token": _token("sensor", channel), "channel": channel, "modality": modality}
        translation, rotation = (LIDAR_RIG if modality == "lidar" else RIG[channel][:2])
        K = scaled_intrinsics(channel, (width, height)).tolist() if modality == "camera" else []
        calib[channel] = {"token": _token("calib", channel, width, height), "sensor_token": sensor["token"],
                          "translation": list(translation), "rotation": list(rotation), "camera_intrinsic": K}
        tables["sensor"].append(sensor)
        tables["calibrated_sensor"].append(calib[channel])
    map_token = _token("map", seed)
    mask_name = f"maps/{map_token}.png"
    cv2.imwrite(str(root / mask_name), np.full((64, 64), 255, np.uint8))
    tables["map"].append({"token": map_token, "log_tokens": [], "category": "semantic_prior",
                          "filename": mask_name})

    names = MINI_TRAIN[:train_scenes] + MINI_VAL[:val_scenes]
    jobs, ann_rows = [], []
    lidar2ego = transform_matrix(*LIDAR_RIG)
    for scene_idx, name in enumerate(names):
        rng = np.random.default_rng([seed, scene_idx])
        duration = (samples_per_scene - 1) * SAMPLE_PERIOD_US * 1e-6
        v_ego, tracks = _make_scene(rng, duration + 0.1)
        heading = float(rng.uniform(-math.pi, math.pi))
        origin = rng.uniform(300.0, 1700.0, 2)
        road2global = transform_matrix([origin[0], origin[1], 0.0], yaw_to_quaternion(heading))
        road_dir = road2global[:2, 0]
        log = {"token": _token("log", seed, name), "logfile": f"synth-{seed}-{name}", "vehicle": "n015",
               "date_captured": "2018-07-24", "location": "singapore-onenorth"}
        tables["log"].append(log)
        tables["map"][0]["log_tokens"].append(log["token"])
        t0 = 1_532_402_900_000_000 + scene_idx * 100_000_000

        # which tracks are annotated when: within ANNOTATION_RADIUS, and at least twice (velocities)
        times = np.arange(samples_per_scene) * SAMPLE_PERIOD_US * 1e-6
        pos = np.array([[tr.position(t) for t in times] for tr in tracks])  # (T, S, 3) road frame
        dist = np.hypot(pos[..., 0] - v_ego * times[None], pos[..., 1])
        annotated = dist <= ANNOTATION_RADIUS
        annotated &= annotated.sum(1, keepdims=True) >= 2
        rendered = dist <= RENDER_RADIUS

        instances = []
        for k, tr in enumerate(tracks):
            if annotated[k].any():
                spec = SPECS[CLASSES[tr.label]]
                instances.append({"token": _token("instance", seed, name, k),
                                  "category_token": cat_token[spec.category],
                                  "nbr_annotations": int(annotated[k].sum()), "_track": k})
        inst_by_track = {inst["_track"]: inst for inst in instances}
        samples, scene_anns = [], {k: [] for k in inst_by_track}
        sd_by_channel = {ch: [] for ch in calib}
        for i, t in enumerate(times):
            ts = t0 + i * SAMPLE_PERIOD_US
            sample = {"token": _token("sample", seed, name, i), "timestamp": ts, "prev": "", "next": "",
                      "scene_token": _token("scene", seed, name)}
            samples.append(sample)
            # global boxes of every rendered track at the key-frame time
            idx = np.flatnonzero(rendered[:, i])
            boxes = np.zeros((len(idx), 7))
            for r, k in enumerate(idx):
                tr = tracks[k]
                centre = road2global[:3, :3] @ pos[k, i] + road2global[:3, 3]
                boxes[r] = [*centre, *tr.size, heading + tr.yaw]
            labels = np.array([tracks[k].label for k in idx], dtype=np.int64)
            ann_local = [r for r, k in enumerate(idx) if annotated[k, i]]
            for r in ann_local:
                k = idx[r]
                tr = tracks[k]
                vel = road_dir * tr.speed
                row = {"token": _token("ann", seed, name, k, i), "sample_token": sample["token"],
                       "instance_token": inst_by_track[k]["token"], "visibility_token": "4",
                       "attribute_tokens": [attr_token[tr.attribute]] if tr.attribute else [],
                       "translation": boxes[r, :3].tolist(), "size": tr.size.tolist(),
                       "rotation": yaw_to_quaternion(boxes[r, 6]).tolist(), "prev": "", "next": "",
                       "num_lidar_pts": 0, "num_radar_pts": 0, "_velocity": vel}
                scene_anns[k].append(row)
                ann_rows.append(row)
            job = {"root": str(root), "image_size": (width, height), "boxes": boxes, "labels": labels,
                   "annotated": np.array(ann_local, dtype=np.int64), "cams": [],
                   "ann_rows": [len(ann_rows) - len(ann_local) + j for j in range(len(ann_local))]}
            for channel in ("LIDAR_TOP",) + CAMERAS:
                sd_ts = ts + CAM_OFFSETS_US.get(channel, 0)
                s_ego = v_ego * (sd_ts - t0) * 1e-6
                ego_xy = origin + road_dir * s_ego
                pose = _pose_record(_token("pose", seed, name, i, channel), sd_ts, ego_xy, heading)
                tables["ego_pose"].append(pose)
                ext = "pcd.bin" if channel == "LIDAR_TOP" else "jpg"
                filename = f"samples/{channel}/{log['logfile']}__{channel}__{sd_ts}.{ext}"
                sd = {"token": _token("sd", seed, name, i, channel), "sample_token": sample["token"],
                      "ego_pose_token": pose["token"], "calibrated_sensor_token": calib[channel]["token"],
                      "timestamp": sd_ts, "fileformat": "pcd" if channel == "LIDAR_TOP" else "jpg",
                      "is_key_frame": True, "height": 0 if channel == "LIDAR_TOP" else height,
                      "width": 0 if channel == "LIDAR_TOP" else width, "filename": filename, "prev": "",
                      "next": ""}
                sd_by_channel[channel].append(sd)
                ego2global = transform_matrix(pose["translation"], pose["rotation"])
                if channel == "LIDAR_TOP":
                    job["lidar2global"] = ego2global @ lidar2ego
                    job["lidar_filename"] = filename
                else:
                    cam2ego = transform_matrix(calib[channel]["translation"], calib[channel]["rotation"])
                    job["cams"].append({"channel": channel, "filename": filename, "s_ego": s_ego,
                                        "global2cam": np.linalg.inv(ego2global @ cam2ego),
                                        "K": np.array(calib[channel]["camera_intrinsic"])})
            jobs.append(job)
        _link(samples)
        for records in sd_by_channel.values():
            _link(records)
            tables["sample_data"] += records
        for k, rows in scene_anns.items():
            _link(rows)
            inst = inst_by_track[k]
            inst["first_annotation_token"], inst["last_annotation_token"] = rows[0]["token"], rows[-1]["token"]
        tables["instance"] += [{key: v for key, v in inst.items() if key != "_track"} for inst in instances]
        tables["sample"] += samples
        tables["scene"].append({"token": samples[0]["scene_token"], "log_token": log["token"],
                                "nbr_samples": len(samples), "first_sample_token": samples[0]["token"],
                                "last_sample_token": samples[-1]["token"], "name": name,
                                "description": f"synthetic road, ego {v_ego:.1f} m/s, seed {seed}"})

    n_workers = workers or min(2, os.cpu_count() or 1)
    start = time.time()
    for channel in CAMERAS:  # computed once here, inherited by the forked workers
        _statics(channel, (width, height))
    if n_workers > 1:
        pool = multiprocessing.get_context("fork").Pool(n_workers)
        try:
            counts = pool.map(_render_sample, jobs, chunksize=1)
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    else:
        counts = [_render_sample(job) for job in jobs]
    for job, job_counts in zip(jobs, counts):
        for row_index, n in zip(job["ann_rows"], job_counts):
            ann_rows[row_index]["num_lidar_pts"] = int(n)
            # visibility from the LiDAR: an object no ray reaches counts as hidden
            ann_rows[row_index]["visibility_token"] = "4" if n > 0 else "1"
    tables["sample_annotation"] = [{k: v for k, v in row.items() if not k.startswith("_")} for row in ann_rows]
    for name, rows in tables.items():
        (root / VERSION / f"{name}.json").write_text(json.dumps(rows))
    (root / RIG_STAMP).write_text(json.dumps({"rig_version": RIG_VERSION, "seed": seed, "image_size": [width, height]}))
    if verbose:
        cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        print(f"rendered {len(jobs)} samples x 6 cameras at {width}x{height} in {time.time() - start:.1f} s "
              f"({n_workers} workers, {cpu:.0f} CPU-s in all); {len(ann_rows)} annotations")
    return root


def stale_rig_version(root):
    """The rig version that wrote the synthetic set at `root` when it is older than RIG_VERSION, else None
    (also for a dataset that bev3d's rig did not write)."""
    try:
        version = json.loads((Path(root) / RIG_STAMP).read_text())["rig_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if version != RIG_VERSION else None


def main(args):
    if getattr(args, "kind", "nuscenes") == "shapes2d":
        from bev3d.data import shapes2d

        return shapes2d.main(args)
    start = time.time()
    root = write_synthetic_nuscenes(
        args.out,
        seed=args.seed,
        train_scenes=8 if args.train_scenes is None else args.train_scenes,
        samples_per_scene=SAMPLES_PER_SCENE if args.samples_per_scene is None else args.samples_per_scene,
        image_size=args.image_size or (1600, 900),
        verbose=True,
    )
    print(f"wrote synthetic nuScenes {VERSION} to {root} in {time.time() - start:.1f} s")
    return 0
