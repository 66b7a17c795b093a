"""Scene layout: the lanes of a straight road, the object tracks in them (a class, a size, a constant
speed along the road) and the ego's speed. Traffic drives, vehicles and bikes park, cyclists ride,
pedestrians walk or stand, cones and barriers line the road; one object of every class starts near
the ego, so even a short scene has all 10 classes."""

import math
from dataclasses import dataclass

import numpy as np

from bev3d.constants import CLASSES
from bev3d.data.synthetic.classes import SPECS
from bev3d.data.synthetic.style import Style

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


def _fill_lane(rng, lane, speed, x_lo, x_hi, anchors, style):
    """Place objects along one lane from x_lo to x_hi (t = 0), keeping the anchors and the gaps."""
    y, motion, weights, (gap_lo, gap_hi) = lane
    gap_lo, gap_hi = gap_lo / style.density, gap_hi / style.density
    names = list(weights)
    p = np.array([weights[n] * style.class_mix[CLASSES.index(n)] for n in names], dtype=np.float64)
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


def make_scene(rng, duration, style=Style()):
    """All tracks of one scene (road frame) and the ego speed; the style sets speed range, density and mix."""
    v_ego = rng.uniform(*style.ego_speed)
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
        lane_tracks = _fill_lane(rng, lane, speed, x_lo, x_hi, anchors[i], style)
        if lane[1] == "walk":
            # walkers share the lane's speed, anchors stand: drop walkers that would pass through an anchor
            lane_tracks = [t for t in lane_tracks if t in anchors[i] or not any(
                min(t.x0, t.x0 + t.speed * duration) - 1.0 < a.x0 < max(t.x0, t.x0 + t.speed * duration) + 1.0
                for a in anchors[i])]
        tracks += lane_tracks
    return v_ego, tracks
