import math

import numpy as np
import pytest

from bev3d.constants import CAMERAS
from bev3d.geometry import box_corners, project_points
from bev3d.vis import render_cameras
from bev3d.vis.cameras import LAYOUT, NEAR, clip_and_project
from bev3d.vis.style import GT_COLOR, class_color

W, H = 320, 180
# camera heading (counter-clockwise from the LiDAR +y forward axis), nuScenes-like rig
HEADINGS = {"CAM_FRONT": 0, "CAM_FRONT_RIGHT": -55, "CAM_FRONT_LEFT": 55,
            "CAM_BACK": 180, "CAM_BACK_LEFT": 110, "CAM_BACK_RIGHT": -110}


def rig():
    """(6, 4, 4) lidar2img of six cameras at the LiDAR origin, 1.5 m up, 90 degree field of view."""
    K = np.eye(4)
    K[:3, :3] = [[160.0, 0, W / 2], [0, 160.0, H / 2], [0, 0, 1]]
    out = []
    for name in CAMERAS:
        a = math.radians(HEADINGS[name])
        forward = np.array([-math.sin(a), math.cos(a), 0.0])
        right = np.array([math.cos(a), math.sin(a), 0.0])
        rot = np.stack([right, [0.0, 0.0, -1.0], forward])  # rows: camera x, y, z in LiDAR
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = rot
        lidar2cam[:3, 3] = -rot @ np.array([0.0, 0.0, 1.5])
        out.append(K @ lidar2cam)
    return np.stack(out)


def blank_images():
    return [np.full((H, W, 3), 90, np.uint8) for _ in CAMERAS]


def tile_offset(name):
    for r, row in enumerate(LAYOUT):
        if name in row:
            return np.array([row.index(name) * W, r * H])


def tile(mosaic, name):
    x, y = tile_offset(name)
    return mosaic[y:y + H, x:x + W]


def has_color(img, uv, color, radius=1):
    u, v = int(math.floor(uv[0])), int(math.floor(uv[1]))
    patch = img[max(v - radius, 0):v + radius + 1, max(u - radius, 0):u + radius + 1]
    return bool(np.all(patch == np.array(color, np.uint8), axis=-1).any())


@pytest.mark.parametrize("with_predictions", [False, True])
def test_mosaic_draws_every_projected_corner_of_a_gt_box(with_predictions):
    l2i = rig()
    box = np.array([[0.8, 11.0, 0.4, 2.0, 4.5, 1.6, 0.4, 0, 0]])
    label = 1
    # GT takes its class colour alone, GT_COLOR beside (here: no) predictions
    preds = dict(pred_boxes=np.zeros((0, 9)), pred_labels=[], pred_scores=[]) if with_predictions else {}
    color = GT_COLOR if with_predictions else class_color(label)
    mosaic = render_cameras(blank_images(), l2i, gt_boxes=box, gt_labels=[label], tile_width=W, **preds)
    assert mosaic.shape == (2 * H, 3 * W, 3)
    cam = CAMERAS.index("CAM_FRONT")
    uv, depth = project_points(box_corners(box)[0], l2i[cam])
    assert (depth > 1).all() and (uv >= 0).all() and (uv[:, 0] < W).all() and (uv[:, 1] < H).all()
    front = tile(mosaic, "CAM_FRONT")
    for corner in uv:
        assert has_color(front, corner, color), f"no GT line at projected corner {corner}"
    # away from the box the image is untouched
    far = front[:, : int(uv[:, 0].min()) - 5]
    assert not np.all(far == np.array(color, np.uint8), axis=-1).any()


def test_prediction_uses_class_colour_and_respects_score_threshold():
    l2i = rig()
    box = np.array([[0.8, 11.0, 0.4, 2.0, 4.5, 1.6, 0.4, 0, 0]])
    label = 8
    shown = render_cameras(blank_images(), l2i, pred_boxes=box, pred_labels=[label], pred_scores=[0.9],
                           tile_width=W)
    hidden = render_cameras(blank_images(), l2i, pred_boxes=box, pred_labels=[label], pred_scores=[0.2],
                            score_thr=0.3, tile_width=W)
    uv, _ = project_points(box_corners(box)[0], l2i[CAMERAS.index("CAM_FRONT")])
    assert all(has_color(tile(shown, "CAM_FRONT"), c, class_color(label)) for c in uv)
    assert not any(has_color(tile(hidden, "CAM_FRONT"), c, class_color(label)) for c in uv)


def test_box_behind_a_camera_draws_nothing_in_it():
    l2i = rig()
    behind = np.array([[0.0, -10.0, 0.4, 2.0, 4.5, 1.6, 0.0, 0, 0]])  # in CAM_BACK's view
    empty = render_cameras(blank_images(), l2i, tile_width=W)
    drawn = render_cameras(blank_images(), l2i, gt_boxes=behind, gt_labels=[0], tile_width=W)
    np.testing.assert_array_equal(tile(drawn, "CAM_FRONT"), tile(empty, "CAM_FRONT"))
    assert (tile(drawn, "CAM_BACK") != tile(empty, "CAM_BACK")).any()


def test_segments_are_clipped_at_the_near_plane():
    l2i = rig()[CAMERAS.index("CAM_FRONT")]
    # from 5 m behind the camera to 5 m in front of it, 1 m to the right
    p0, p1 = np.array([[1.0, -5.0, 1.5]]), np.array([[1.0, 5.0, 1.5]])
    uv0, uv1 = clip_and_project(p0, p1, l2i)
    # the clipped end lies on the near plane at the same lateral offset: u = cx + f * 1 / NEAR
    np.testing.assert_allclose(uv0[0], [W / 2 + 160.0 * 1.0 / NEAR, H / 2], rtol=1e-9)
    np.testing.assert_allclose(uv1[0], [W / 2 + 160.0 * 1.0 / 5.0, H / 2], rtol=1e-9)
    # a segment wholly behind the camera is dropped
    uv0, _ = clip_and_project(np.array([[0.0, -5.0, 1.0]]), np.array([[1.0, -1.0, 1.0]]), l2i)
    assert len(uv0) == 0


def test_wrong_number_of_images_is_an_error():
    with pytest.raises(ValueError, match="6 images"):
        render_cameras(blank_images()[:5], rig())
