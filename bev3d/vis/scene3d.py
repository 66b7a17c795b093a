"""3D scene pictures with Open3D: boxes, LiDAR points, the ego car and the camera frusta.

The scene is first described with plain arrays (`build_scene`), then rendered headless by
Open3D's OffscreenRenderer in a child process (bev3d.vis._o3d_worker), or shown in a window.
Render cameras are pinholes `(K, world2cam, width, height)` with the camera frame of
docs/conventions.md (x right, y down, z forward), so `K4x4 @ world2cam` projects like lidar2img.
"""

import math
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np

from bev3d.errors import Bev3dError
from bev3d.geometry import box_corners, transform_points
from bev3d.vis.style import (
    BOX_EDGES, EGO_COLOR, FRUSTUM_COLOR, FRONT_CROSS, class_color, ego_axes, ego_box, gt_colors,
    height_colors, select,
)

BACKGROUND = (0.06, 0.06, 0.08, 1.0)
GRID_COLOR = (0.25, 0.25, 0.28)
FRUSTUM_DEPTH = 4.0  # metres drawn of each camera's viewing pyramid
RENDER_TIMEOUT_S = 600


def look_at(eye, target, up):
    """(4, 4) world2cam of a camera at `eye` looking at `target` (x right, y down, z forward)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    out = np.eye(4)
    out[:3, :3] = np.stack([x, y, z])
    out[:3, 3] = -out[:3, :3] @ eye
    return out


def pinhole(width, height, vfov_deg):
    """(3, 3) intrinsics with the principal point at the image centre."""
    f = (height / 2) / math.tan(math.radians(vfov_deg) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def default_views(lidar2ego=None, width=960, height=720, extent=40.0):
    """The bird's-eye and chase cameras around the ego car: {name: (K, world2cam, width, height)}.

    Bird's-eye looks straight down from a height at which `extent` metres ahead and behind fit
    the image; the chase camera sits behind and above the car looking ahead.
    """
    origin, forward, up = ego_axes(lidar2ego)
    vfov = 60.0
    K = pinhole(width, height, vfov)
    bev_height = extent / math.tan(math.radians(vfov) / 2)
    birdseye = look_at(origin + bev_height * up, origin, forward)
    chase = look_at(origin - 14.0 * forward + 9.0 * up, origin + 18.0 * forward, up)
    return {"birdseye": (K, birdseye, width, height), "chase": (K, chase, width, height)}


def build_scene(
    gt_boxes=None,
    gt_labels=None,
    pred_boxes=None,
    pred_labels=None,
    pred_scores=None,
    points=None,
    lidar2img=None,
    image_size=(1600, 900),
    lidar2ego=None,
    score_thr=0.3,
    extent=40.0,
):
    """Plain-array description of the 3D scene (line groups, point cloud, meshes), LiDAR frame."""
    with_predictions = pred_boxes is not None
    gt_boxes, gt_labels, _ = select(gt_boxes, gt_labels, None, -np.inf)
    pred_boxes, pred_labels, _ = select(pred_boxes, pred_labels, pred_scores, score_thr)
    ego = ego_box(lidar2ego)
    origin, _, up = ego_axes(lidar2ego)

    lines = [
        _grid(origin, extent),
        _box_lines("ego", ego, [EGO_COLOR], width=2.0),
        _box_lines("gt", gt_boxes, gt_colors(gt_labels, with_predictions), width=3.0),
        _box_lines("pred", pred_boxes, [class_color(lb) for lb in pred_labels], width=2.0),
    ]
    if lidar2img is not None:
        lines.append(_frusta(np.asarray(lidar2img, dtype=np.float64), image_size))
    lines = [g for g in lines if len(g["lines"])]

    cloud = None
    if points is not None and len(points):
        xyz = np.asarray(points, dtype=np.float64)[:, :3]
        cloud = {"xyz": xyz, "colors": height_colors(xyz @ up - origin @ up, -0.5, 3.0), "size": 2.0}

    corners = box_corners(ego)[0]
    # 12 triangles of the ego box, from the box_corners order (front 0-3, back 4-7)
    tris = np.array([[0, 1, 2], [0, 2, 3], [4, 6, 5], [4, 7, 6], [0, 4, 5], [0, 5, 1],
                     [3, 2, 6], [3, 6, 7], [0, 3, 7], [0, 7, 4], [1, 5, 6], [1, 6, 2]])
    ego_mesh = {"name": "ego_body", "vertices": corners, "triangles": tris,
                "color": np.array([0.35, 0.35, 0.4])}
    return {"background": BACKGROUND, "lines": lines, "points": cloud, "meshes": [ego_mesh]}


def render_scene_3d(
    gt_boxes=None,
    gt_labels=None,
    pred_boxes=None,
    pred_labels=None,
    pred_scores=None,
    points=None,
    lidar2img=None,
    image_size=(1600, 900),
    lidar2ego=None,
    score_thr=0.3,
    views=None,
    width=960,
    height=720,
    extent=40.0,
):
    """Render the 3D scene headless with Open3D: {view name: (height, width, 3) uint8 RGB}.

    Boxes (N, 9), points (P, >=3), lidar2img (6, 4, 4) for images of `image_size` (W, H) and
    lidar2ego (4, 4) are in/from the LiDAR frame. Predictions with score >= score_thr are drawn in
    their class colour, ground truth (thicker lines) in its class colour or, when predictions are
    given, in GT_COLOR; a cross marks each box's front face.
    views: {name: (K, world2cam, width, height)}; default `default_views(lidar2ego, width, height)`.
    """
    scene = build_scene(gt_boxes, gt_labels, pred_boxes, pred_labels, pred_scores, points,
                        lidar2img, image_size, lidar2ego, score_thr, extent)
    if views is None:
        views = default_views(lidar2ego, width, height, extent)
    return render_frames([{"scene": scene, "views": views}])[0]


def render_frames(frames):
    """Render many scenes in one Open3D child process (starting one costs seconds).

    frames: list of {"scene": build_scene(...), "views": {...}} -> list of {view: image}.
    """
    with tempfile.TemporaryDirectory(prefix="bev3d_o3d_") as tmp:
        src, dst = os.path.join(tmp, "frames.pkl"), os.path.join(tmp, "images.pkl")
        with open(src, "wb") as f:
            pickle.dump(frames, f)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bev3d.vis._o3d_worker", src, dst],
                env=headless_env(), capture_output=True, text=True, timeout=RENDER_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise Bev3dError(f"Open3D's headless renderer did not finish within {RENDER_TIMEOUT_S} s.") from None
        if proc.returncode != 0:
            raise Bev3dError(_failure_message(proc))
        with open(dst, "rb") as f:
            return pickle.load(f)


def headless_env():
    """Environment of the render process: no display, so Open3D goes straight to its headless path
    (Filament on Vulkan, which is Mesa's llvmpipe CPU driver when there is no GPU); EGL, where it is
    used, takes the surfaceless platform."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.setdefault("EGL_PLATFORM", "surfaceless")
    return env


def show_scene_3d(scene, view=None, title="bev3d"):
    """Open an interactive Open3D window with a build_scene(...) scene, starting at `view`
    (K, world2cam, width, height) when given. Needs a display."""
    import open3d as o3d

    from bev3d.vis._o3d_worker import to_open3d

    geoms = [{"name": n, "geometry": g, "material": m} for n, g, m in to_open3d(scene)]
    camera = {}
    if view is not None:
        camera = dict(intrinsic_matrix=view[0], extrinsic_matrix=view[1], width=view[2], height=view[3])
    o3d.visualization.draw(geoms, title=title, bg_color=scene["background"], show_skybox=False, **camera)


def display_available():
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _failure_message(proc):
    from bev3d.sysdeps import open3d_missing

    tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
    missing, line = open3d_missing()
    fix = (f"Missing system libraries {' '.join(missing)}; install them with: {line}"
           if missing else "The system libraries it needs are installed; see the renderer output above.")
    return (f"Open3D's headless renderer failed (exit code {proc.returncode}). Its last output:\n"
            f"{tail}\n{fix}")


def _box_lines(name, boxes, colors, width):
    """Line group of boxes: 12 edges and the front-face cross per box."""
    edges = np.concatenate([BOX_EDGES, FRONT_CROSS])  # (14, 2)
    if len(boxes) == 0:
        return {"name": name, "points": np.zeros((0, 3)), "lines": np.zeros((0, 2), int),
                "colors": np.zeros((0, 3)), "width": width}
    corners = box_corners(np.asarray(boxes, dtype=np.float64))  # (N, 8, 3)
    lines = (edges[None] + 8 * np.arange(len(boxes))[:, None, None]).reshape(-1, 2)
    colors = np.repeat(np.asarray(colors, dtype=np.float64) / 255, len(edges), axis=0)
    return {"name": name, "points": corners.reshape(-1, 3), "lines": lines, "colors": colors, "width": width}


def _grid(origin, extent, step=10.0):
    """Ground grid lines every `step` metres around the ego origin (LiDAR frame, z = ground)."""
    ticks = np.arange(-extent, extent + 1e-6, step)
    pts, lines = [], []
    for t in ticks:
        for a, b in (((t, -extent), (t, extent)), ((-extent, t), (extent, t))):
            lines.append([len(pts), len(pts) + 1])
            pts += [[origin[0] + a[0], origin[1] + a[1], origin[2]], [origin[0] + b[0], origin[1] + b[1], origin[2]]]
    return {"name": "grid", "points": np.array(pts), "lines": np.array(lines),
            "colors": np.tile(GRID_COLOR, (len(lines), 1)), "width": 1.0}


def _frusta(lidar2img, image_size):
    """Each camera's viewing pyramid to FRUSTUM_DEPTH: apex and the 4 image corners."""
    w, h = image_size
    d = FRUSTUM_DEPTH
    img_pts = np.array([[0, 0, 0, 1], [0, 0, d, 1], [w * d, 0, d, 1], [w * d, h * d, d, 1], [0, h * d, d, 1]])
    pts = np.concatenate([transform_points(img_pts[:, :3], np.linalg.inv(m)) for m in lidar2img])
    one = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [2, 3], [3, 4], [4, 1]])
    lines = np.concatenate([one + 5 * i for i in range(len(lidar2img))])
    return {"name": "frusta", "points": pts, "lines": lines,
            "colors": np.tile(np.array(FRUSTUM_COLOR) / 255, (len(lines), 1)), "width": 1.5}
