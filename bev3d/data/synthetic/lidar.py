"""The LIDAR_TOP sweep: 32 beams x 1024 azimuths ray-cast against the boxes and the ground, and the
per-box point counts that become `num_lidar_pts`."""

import math

import numpy as np

from bev3d.geometry import box_corners

LIDAR_BEAMS = np.deg2rad(np.linspace(-30.67, 10.67, 32))
LIDAR_AZIMUTHS = 1024
LIDAR_RANGE = 100.0


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
