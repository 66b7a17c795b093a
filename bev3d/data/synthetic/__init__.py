"""Synthetic camera rig written in the nuScenes v1.0-mini on-disk format.

Each scene is a straight road (lanes, parking strips, sidewalks) driven by the ego
car at constant speed. Objects of the 10 detection classes sit in lanes: vehicles
drive or park, cyclists ride, pedestrians walk or stand, cones and barriers line
the road. Every key frame gets six rendered camera images (flat-shaded textured
cuboids over a textured ground plane and sky, painter's algorithm), a ray-cast
LIDAR_TOP sweep and the 13 devkit tables, so `nuscenes.NuScenes` loads it and
`DetectionEval` scores it like the real mini split.

Each scene has its own look (style.py): with the default random styles, object colours
and textures are independent of the class (the class is in the shape and size), and
ground, sky, light, traffic density and mix, ego speed, image size and the camera
response vary; `style="fixed"` is the original look, in which each class has its own hue
(shading and the texture pattern change brightness only) and stripe/check pattern.

Design choices that keep the set learnable by a tiny model in minutes:
- ~10-20 objects within 35 m per sample, class-typical sizes;
- objects are drawn at their key-frame (annotation) pose, each camera from its own
  ego pose at its own timestamp, so the devkit's projection of an annotation lands
  on the drawn object in every camera.

Modules, each importing only those above it:
  rig.py      camera / LiDAR calibration, camera timing offsets, scaled intrinsics
  classes.py  per-class size, colour and pattern; the nuScenes categories and attributes
  style.py    a scene's look: fixed or random ground, sky, light, object looks, traffic, camera response
  scene.py    road lanes, object tracks, scene generation
  render.py   the camera renderer
  lidar.py    the ray-cast LiDAR sweep, points per box
  writer.py   the nuScenes tables and files, the rig stamp, `bev3d synth` (main)
"""

from bev3d.data.synthetic.classes import SPECS
from bev3d.data.synthetic.rig import RIG, scaled_intrinsics
from bev3d.data.synthetic.style import STYLES, Style
from bev3d.data.synthetic.writer import (MINI_TRAIN, MINI_VAL, RIG_STAMP, RIG_VERSION, STYLE_FILE, main,
                                         stale_rig_version, write_synthetic_nuscenes)

__all__ = ["SPECS", "RIG", "scaled_intrinsics", "STYLES", "Style", "MINI_TRAIN", "MINI_VAL", "RIG_STAMP",
           "RIG_VERSION", "STYLE_FILE", "main", "stale_rig_version", "write_synthetic_nuscenes"]
