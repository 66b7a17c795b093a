import numpy as np
import pytest

from bev3d.geometry import box_corners, project_points
from bev3d.sysdeps import open3d_missing
from bev3d.vis import render_scene_3d
from bev3d.vis.scene3d import default_views
from bev3d.vis.style import GT_COLOR

MISSING, APT_LINE = open3d_missing()
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"Open3D headless rendering needs system libraries; run: {APT_LINE}"
)

W, H = 320, 240


def top_down_view(center, height):
    """A pinhole looking straight down at `center` from `height` m, image up = LiDAR +y."""
    K = np.array([[200.0, 0, W / 2], [0, 200.0, H / 2], [0, 0, 1]])
    rot = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])  # camera x = +x, y = -y, z = -z
    eye = np.asarray(center, dtype=np.float64) + [0, 0, height]
    world2cam = np.eye(4)
    world2cam[:3, :3] = rot
    world2cam[:3, 3] = -rot @ eye
    return K, world2cam


def is_color(img, color):
    return np.all(img == np.array(color, np.uint8), axis=-1)


def test_headless_render_puts_the_box_where_its_corners_project():
    box = np.array([[22.0, 18.0, -1.0, 2.0, 4.5, 1.6, 0.5, 0, 0]])
    K, world2cam = top_down_view([21.0, 17.0, -1.8], 14.0)
    # with predictions given (none above the threshold), ground truth is drawn in GT_COLOR
    views = {"test": (K, world2cam, W, H), **default_views(None, W, H)}
    points = np.random.default_rng(0).uniform(-20, 20, (2000, 5)).astype(np.float32)
    images = render_scene_3d(gt_boxes=box, gt_labels=[0], pred_boxes=box, pred_labels=[0], pred_scores=[0.1],
                             score_thr=0.3, points=points, views=views)
    assert set(images) == {"test", "birdseye", "chase"}
    img = images["test"]
    assert img.shape == (H, W, 3) and img.dtype == np.uint8

    P = np.eye(4)
    P[:3, :3] = K
    uv, depth = project_points(box_corners(box)[0], P @ world2cam)
    assert (depth > 0).all() and (uv > 5).all() and (uv[:, 0] < W - 5).all() and (uv[:, 1] < H - 5).all()
    mask = is_color(img, GT_COLOR)
    for u, v in uv:
        patch = mask[int(v) - 2:int(v) + 3, int(u) - 2:int(u) + 3]
        assert patch.any(), f"no box colour near projected corner ({u:.1f}, {v:.1f})"
    # every box-coloured pixel lies within the projected box (plus the line width)
    vs, us = np.nonzero(mask)
    assert us.min() >= uv[:, 0].min() - 4 and us.max() <= uv[:, 0].max() + 4
    assert vs.min() >= uv[:, 1].min() - 4 and vs.max() <= uv[:, 1].max() + 4
    # an empty corner of the picture holds no box colour
    assert not mask[:20, :20].any()
    # the default views see the box too (it is 22 m right and 18 m ahead of the nuScenes ego)
    for name in ("birdseye", "chase"):
        assert images[name].shape == (H, W, 3)
        assert is_color(images[name], GT_COLOR).any(), name


