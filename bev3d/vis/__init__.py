"""Pictures of samples: Open3D 3D scenes, camera mosaics and BEV plots (docs/visualization.md).

The array API (`render_scene_3d`, `render_cameras`, `render_bev`) takes boxes (N, 9) in the LiDAR
frame, labels, scores, images and matrices, and returns RGB uint8 arrays; `render_sample` draws a
sample of a nuScenes-format dataset into PNG files.
"""

from bev3d.vis.bev import render_bev
from bev3d.vis.cameras import render_cameras
from bev3d.vis.sample import render_sample, render_scene_video
from bev3d.vis.scene3d import render_scene_3d

__all__ = ["render_scene_3d", "render_cameras", "render_bev", "render_sample", "render_scene_video"]
