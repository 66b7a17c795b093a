"""The 10 detection classes as drawn: nuScenes category, size, colour and texture pattern; the nuScenes
taxonomy (all categories, attributes, visibility levels) that the tables list."""

from dataclasses import dataclass

import cv2
import numpy as np

from bev3d.constants import CLASSES


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


def hsv_bgr(hue, saturation, value):
    """An OpenCV HSV colour (hue 0..179) as a float64 BGR triple."""
    hsv = np.array([[[hue, saturation, value]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)


def class_bgr(label, value=220):
    """The base BGR colour of class `label` (saturation 200); shading scales the value only."""
    return hsv_bgr(SPECS[CLASSES[label]].hue, 200, value)
