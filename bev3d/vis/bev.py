"""Bird's-eye-view plot (matplotlib, Agg): ground truth, predictions and the ego car, ego frame."""

import numpy as np

from bev3d.geometry import box_corners, transform_points
from bev3d.vis.style import (
    EGO_COLOR, GT_COLOR, NUSCENES_LIDAR2EGO, class_color, class_name, ego_box, gt_colors, select,
)


def render_bev(
    gt_boxes=None,
    gt_labels=None,
    pred_boxes=None,
    pred_labels=None,
    pred_scores=None,
    points=None,
    lidar2ego=None,
    score_thr=0.3,
    extent=50.0,
    size_px=720,
):
    """Top view in the ego frame (forward up, right to the right) as a (size_px, size_px, 3) uint8 RGB array.

    Boxes (N, 9) and points (P, >=3) are in the LiDAR frame; lidar2ego (4, 4) maps them to the ego
    frame (default: the nuScenes LIDAR_TOP mounting). Ground truth is solid, in its class colour or,
    when predictions are given, in GT_COLOR; predictions with score >= score_thr are dashed in
    their class colour. A line from the centre to the front edge marks each box's heading.
    `extent` is the half width of the view in metres.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    lidar2ego = NUSCENES_LIDAR2EGO if lidar2ego is None else np.asarray(lidar2ego, dtype=np.float64)
    with_predictions = pred_boxes is not None
    gt_boxes, gt_labels, _ = select(gt_boxes, gt_labels, None, -np.inf)
    pred_boxes, pred_labels, pred_scores = select(pred_boxes, pred_labels, pred_scores, score_thr)

    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes([0.1, 0.07, 0.88, 0.9])
    if points is not None and len(points):
        xy = _to_plot(transform_points(np.asarray(points, dtype=np.float64)[:, :3], lidar2ego))
        ax.scatter(xy[:, 0], xy[:, 1], s=0.2, c="0.6", linewidths=0, rasterized=True)

    _draw(ax, ego_box(lidar2ego), lidar2ego, [EGO_COLOR], "-", fill=True)
    _draw(ax, gt_boxes, lidar2ego, gt_colors(gt_labels, with_predictions), "-")
    _draw(ax, pred_boxes, lidar2ego, [class_color(lb) for lb in pred_labels], "--")

    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xlabel("right (m)")
    ax.set_ylabel("forward (m)")
    ax.grid(True, color="0.9", linewidth=0.5)
    handles = [Line2D([], [], color="k", label="ground truth")]
    shown = set(pred_labels.tolist())
    if with_predictions:
        handles[0].set_color(np.array(GT_COLOR) / 255)
        handles.append(Line2D([], [], color="k", ls="--", label="prediction"))
    else:
        shown |= set(gt_labels.tolist())
    for label in sorted(shown):
        handles.append(Line2D([], [], color=np.array(class_color(label)) / 255, lw=4, label=class_name(label)))
    ax.legend(handles=handles, loc="upper right", fontsize=7)

    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _to_plot(xyz):
    """Ego (x forward, y left) -> plot (right, forward)."""
    return np.stack([-xyz[..., 1], xyz[..., 0]], -1)


def _draw(ax, boxes, lidar2ego, colors, style, fill=False):
    if len(boxes) == 0:
        return
    corners = transform_points(box_corners(boxes), lidar2ego)  # (N, 8, 3) ego frame
    bottom = _to_plot(corners[:, [2, 3, 7, 6]])  # (N, 4, 2): bottom face, front edge first
    centers = _to_plot(transform_points(np.asarray(boxes)[:, :3], lidar2ego))
    for face, center, color in zip(bottom, centers, colors):
        c = np.array(color) / 255
        ax.fill(face[:, 0], face[:, 1], facecolor=c if fill else "none", edgecolor=c, linestyle=style, linewidth=1.2)
        front = face[:2].mean(0)
        ax.plot([center[0], front[0]], [center[1], front[1]], color=c, linewidth=1.2)
