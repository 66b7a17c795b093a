"""Camera mosaic: the 6 images in the nuScenes layout with the 3D boxes projected into them."""

import cv2
import numpy as np

from bev3d.constants import CAMERAS
from bev3d.geometry import box_corners, project_points
from bev3d.vis.style import BOX_EDGES, FRONT_CROSS, class_color, class_name, gt_colors, select

# Mosaic layout: front row FL F FR, back row BL B BR.
LAYOUT = (
    ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
    ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"),
)
NEAR = 0.1  # metres: edges are clipped at this depth before projecting
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def clip_and_project(p0, p1, lidar2img, near=NEAR):
    """Project 3D segments (E, 3) -> (E, 3) into an image, clipped at depth `near`.

    Depth is affine along a segment (the third row of lidar2img), so the part in front of the
    near plane is found exactly before the perspective division. Returns uv0, uv1 (E', 2) of the
    segments that keep a visible part; a segment wholly behind the camera is dropped.
    """
    _, d0 = project_points(p0, lidar2img)
    _, d1 = project_points(p1, lidar2img)
    keep = (d0 > near) | (d1 > near)
    p0, p1, d0, d1 = p0[keep], p1[keep], d0[keep], d1[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip((near - d0) / (d1 - d0), 0.0, 1.0)[:, None]
    a = np.where((d0 < near)[:, None], p0 + t * (p1 - p0), p0)
    b = np.where((d1 < near)[:, None], p0 + t * (p1 - p0), p1)
    return project_points(a, lidar2img)[0], project_points(b, lidar2img)[0]


def draw_boxes(image, boxes, lidar2img, colors, texts, thickness=2, text_below=False):
    """Draw (N, >=7) boxes into `image` (H, W, 3) uint8 RGB in place.

    colors: N RGB tuples; texts: N strings (a tag next to the box) or None.
    """
    h, w = image.shape[:2]
    if len(boxes) == 0:
        return image
    corners = box_corners(np.asarray(boxes, dtype=np.float64))  # (N, 8, 3)
    edges = np.concatenate([BOX_EDGES, FRONT_CROSS])
    for box_corner, color, text in zip(corners, colors, texts):
        uv0, uv1 = clip_and_project(box_corner[edges[:, 0]], box_corner[edges[:, 1]], lidar2img)
        for a, b in zip(uv0, uv1):
            # 4 fractional bits: cv2 draws from sub-pixel coordinates
            cv2.line(image, _fixed(a), _fixed(b), color, thickness, cv2.LINE_AA, shift=4)
        if text and len(uv0):
            pts = np.concatenate([uv0, uv1])
            inside = pts[(pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)]
            if len(inside):
                anchor = inside[np.argmax(inside[:, 1])] if text_below else inside[np.argmin(inside[:, 1])]
                _tag(image, text, anchor, color, below=text_below)
    return image


def render_cameras(
    images,
    lidar2img,
    gt_boxes=None,
    gt_labels=None,
    pred_boxes=None,
    pred_labels=None,
    pred_scores=None,
    score_thr=0.3,
    tile_width=640,
):
    """The 6 camera images with 3D boxes drawn, as one (2 * tile_h, 3 * tile_width, 3) uint8 RGB mosaic.

    images:    6 arrays (H, W, 3) uint8 RGB in bev3d.constants.CAMERAS order.
    lidar2img: (6, 4, 4) for those images' pixels. Boxes are (N, 9) in the LiDAR frame. Predictions
    with score >= score_thr are drawn in their class colour with "class score" above them; ground
    truth with its class name below it, in its class colour, or in GT_COLOR when predictions are
    given (bev3d.vis.style). The front face of each box carries a cross.
    """
    if len(images) != len(CAMERAS):
        raise ValueError(f"render_cameras needs {len(CAMERAS)} images in CAMERAS order, got {len(images)}")
    lidar2img = np.asarray(lidar2img, dtype=np.float64)
    h0, w0 = images[0].shape[:2]
    tile_height = int(round(h0 * tile_width / w0))
    with_predictions = pred_boxes is not None
    gt_boxes, gt_labels, _ = select(gt_boxes, gt_labels, None, -np.inf)
    pred_boxes, pred_labels, pred_scores = select(pred_boxes, pred_labels, pred_scores, score_thr)
    gt_color = gt_colors(gt_labels, with_predictions)

    rows = []
    for row in LAYOUT:
        tiles = []
        for name in row:
            cam = CAMERAS.index(name)
            image = np.ascontiguousarray(images[cam][..., :3], dtype=np.uint8)
            h, w = image.shape[:2]
            scale = np.diag([tile_width / w, tile_height / h, 1.0, 1.0])
            tile = cv2.resize(image, (tile_width, tile_height), interpolation=cv2.INTER_AREA)
            cam_l2i = scale @ lidar2img[cam]
            draw_boxes(tile, gt_boxes, cam_l2i, gt_color,
                       [class_name(lb) for lb in gt_labels], thickness=2, text_below=True)
            draw_boxes(tile, pred_boxes, cam_l2i, [class_color(lb) for lb in pred_labels],
                       [f"{class_name(lb)} {s:.2f}" for lb, s in zip(pred_labels, pred_scores)], thickness=2)
            _tag(tile, name, (4, 4), (30, 30, 30), below=True, text_color=(255, 255, 255))
            tiles.append(tile)
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def _fixed(uv):
    return int(round(float(uv[0]) * 16)), int(round(float(uv[1]) * 16))


def _tag(image, text, anchor, color, below=False, text_color=(0, 0, 0)):
    """A filled label of `color` whose top-left (below=True) or bottom-left corner is `anchor`."""
    scale, thick = 0.45, 1
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    x, y = int(anchor[0]), int(anchor[1])
    top = y if below else y - th - base - 2
    x = min(max(x, 0), image.shape[1] - tw - 2)
    top = min(max(top, 0), image.shape[0] - th - base - 2)
    cv2.rectangle(image, (x, top), (x + tw + 2, top + th + base + 2), color, -1)
    cv2.putText(image, text, (x + 1, top + th + 1), _FONT, scale, text_color, thick, cv2.LINE_AA)
