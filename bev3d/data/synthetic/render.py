"""The camera renderer: sky and textured ground from per-camera lookup tables, then flat-shaded textured
cuboids (contact shadows, sun-lit faces, back faces culled, near-plane clipping) drawn far to near
(painter's algorithm) in their colours; the scene's Style sets the ground, sky, light and textures."""

from functools import lru_cache

import cv2
import numpy as np

from bev3d.data.synthetic.rig import RIG, scaled_intrinsics
from bev3d.data.synthetic.scene import ROAD_HALF_WIDTH, SIDEWALK_END
from bev3d.geometry import box_corners, transform_matrix, transform_points

NEAR = 0.1  # near clipping plane of the renderer (m)


# The ground texture is periodic along the road (period 72 m: 8 m tile pairs, 9 m dashes, 1.5 m paving),
# so a pixel's colour is a table lookup: (lateral kind, haze level, x mod 72 m in 1 cm steps). The
# table holds two periods, so shifting by the ego's position needs no wrap-around.
_PERIOD, _STEPS, _HAZE_LEVELS = 72.0, 7200, 16
_HAZE_DISTANCE = 90.0  # m: the haze levels of the per-camera tables; a style's own distance re-maps the levels


def _ground_lut(style):
    """(9 * _HAZE_LEVELS * 2 * _STEPS,) packed ground colours; see _lateral_kind for the 9 kinds."""
    x = np.arange(2 * _STEPS) * (_PERIOD / _STEPS)
    tile_x = np.floor(x / 4.0) % 2
    dash = (x % 9.0) < 3.0
    grout = np.abs(x / 1.5 - np.round(x / 1.5)) < 0.04
    grey = lambda g: np.repeat(np.asarray(g, np.float64)[..., None], 3, -1) * np.ones((len(x), 1))  # noqa: E731
    road, step, line = style.asphalt, style.tile_contrast, style.line
    verge, fog = np.array(style.verge), np.array(style.fog)
    kinds = [
        grey(road + step * tile_x),  # 0, 1: asphalt in 4 m checker tiles (lateral parity 0 / 1)
        grey(road + step * (1 - tile_x)),
        grey(np.where(dash, line, road + step * tile_x)),  # 2, 3: dashed lane line over asphalt
        grey(np.where(dash, line, road + step * (1 - tile_x))),
        grey(np.full(len(x), line)),  # 4: solid edge line
        grey(np.where(grout, style.grout, style.paving)),  # 5: paving, grout lines across
        grey(np.full(len(x), style.grout)),  # 6: paving, grout line along
        verge + style.verge_contrast * tile_x[:, None],  # 7, 8: verge
        verge + style.verge_contrast * (1 - tile_x[:, None]),
    ]
    # level k holds haze exp(-d / _HAZE_DISTANCE) = k / (levels - 1); the style's haze at that distance is its power
    haze = np.linspace(0.0, 1.0, _HAZE_LEVELS)[:, None, None] ** (_HAZE_DISTANCE / style.haze_distance)
    lut = np.stack([k[None] * haze + fog * (1 - haze) for k in kinds])  # (9, levels, steps, 3)
    return _pack_bgr(lut.reshape(-1, 3))


def _pack_bgr(bgr):
    """(..., 3) colours -> (...,) uint32 BGRA words, so a pixel is gathered in one memory access."""
    out = np.zeros(bgr.shape[:-1] + (4,), np.uint8)
    out[..., :3] = bgr
    return out.view(np.uint32)[..., 0]


def _lateral_kind(y):
    """Road-frame y -> the ground LUT's kind index (0..8)."""
    ay = np.abs(y)
    parity = (np.floor(y / 4.0) % 2).astype(np.int64)
    kind = np.where(ay < ROAD_HALF_WIDTH, parity, 0)
    kind = np.where((np.abs(ay - 1.75) < 0.08), 2 + parity, kind)
    kind = np.where(np.abs(ay - ROAD_HALF_WIDTH + 0.15) < 0.1, 4, kind)
    sidewalk = (ay >= ROAD_HALF_WIDTH) & (ay < SIDEWALK_END)
    on_grout = np.abs(y / 1.5 - np.round(y / 1.5)) < 0.04
    kind = np.where(sidewalk, np.where(on_grout, 6, 5), kind)
    return np.where(ay >= SIDEWALK_END, 7 + parity, kind)


def _camera_statics(channel, image_size):
    """Per camera: the sky elevation of every pixel, flat indices of ground pixels and their LUT index at
    s_ego = 0."""
    K = scaled_intrinsics(channel, image_size)
    cam2ego = transform_matrix(RIG[channel][0], RIG[channel][1])
    w, h = image_size
    # ray (ego frame, unnormalised) through pixel centre (u, v): u * a + v * b + c
    a, b, c = (cam2ego[:3, :3] @ np.linalg.inv(K)).T.astype(np.float32)
    u = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    v = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    rays = [(u * a[k] + v * b[k] + c[k]).reshape(-1) for k in range(3)]
    origin = cam2ego[:3, 3]
    ground = np.flatnonzero(rays[2] < -1e-3 * np.sqrt(rays[0] ** 2 + rays[1] ** 2))
    t = -origin[2] / rays[2][ground]
    hit_x = origin[0] + rays[0][ground] * t
    hit_y = origin[1] + rays[1][ground] * t
    far = np.hypot(hit_x - origin[0], hit_y - origin[1]) > 400.0
    ground, hit_x, hit_y = ground[~far], hit_x[~far], hit_y[~far]
    haze = np.exp(-np.hypot(hit_x - origin[0], hit_y - origin[1]) / _HAZE_DISTANCE)
    level = np.round(haze * (_HAZE_LEVELS - 1)).astype(np.int64)
    step = np.minimum(np.floor(np.mod(hit_x, _PERIOD) * (_STEPS / _PERIOD)), _STEPS - 1)
    index = (_lateral_kind(hit_y) * _HAZE_LEVELS + level) * (2 * _STEPS) + step.astype(np.int64)
    elev = np.clip(rays[2] / np.sqrt(rays[0] ** 2 + rays[1] ** 2 + rays[2] ** 2), 0.0, 1.0)[:, None]
    return elev, ground.astype(np.int32), index.astype(np.int32)


_STATIC_CACHE = {}
_STYLE_CACHE = {}  # the tables of the style drawn last: a worker renders one scene's samples in a row


def statics(channel, image_size):
    """The cached `_camera_statics` of a camera (computed once per process, before the workers fork)."""
    key = (channel, tuple(image_size))
    if key not in _STATIC_CACHE:
        _STATIC_CACHE[key] = _camera_statics(channel, image_size)
    return _STATIC_CACHE[key]


def _style_tables(channel, image_size, style):
    """The packed sky image of a camera and the ground LUT in `style`."""
    if _STYLE_CACHE.get("style") != style:
        _STYLE_CACHE.clear()
        _STYLE_CACHE.update(style=style, lut=_ground_lut(style))
    key = (channel, tuple(image_size))
    if key not in _STYLE_CACHE:
        elev = statics(channel, image_size)[0]
        # lighter towards the horizon
        _STYLE_CACHE[key] = _pack_bgr(np.array(style.sky_horizon, np.float32) * (1 - elev)
                                      + np.array(style.sky_zenith, np.float32) * elev)
    return _STYLE_CACHE[key], _STYLE_CACHE["lut"]


def ground_image(channel, image_size, s_ego, style):
    """Sky + textured ground seen by a camera whose ego is at road x = s_ego (y = 0), (H, W, 3) uint8."""
    _, ground, index = statics(channel, image_size)
    sky, lut = _style_tables(channel, image_size, style)
    img = sky.copy()
    img[ground] = lut[index + int(s_ego % _PERIOD * (_STEPS / _PERIOD))]
    return cv2.cvtColor(img.view(np.uint8).reshape(image_size[1], image_size[0], 4), cv2.COLOR_BGRA2BGR)


# Faces of a box as quads of box_corners indices: front, back, left, right, top. The first edge runs
# across the face, the second from top to bottom (for the top face: from back to front).
_FACES = np.array([[0, 1, 2, 3], [5, 4, 7, 6], [4, 0, 3, 7], [1, 5, 6, 2], [4, 5, 1, 0]])


@lru_cache(maxsize=None)
def _cell_weights(pattern):
    """Bilinear weights splitting a quad into pattern cells: (C, 4, 4) and (C,) dark flags, so that the
    cells of a (4, 3) quad are `weights @ quad`."""
    nu, nv, kind = pattern
    a = np.linspace(0.0, 1.0, nu + 1)[None, :]  # across
    b = np.linspace(0.0, 1.0, nv + 1)[:, None]  # down
    grid = np.stack([(1 - a) * (1 - b), a * (1 - b), a * b, (1 - a) * b], -1)  # (nv + 1, nu + 1, 4)
    cells = np.stack([grid[:-1, :-1], grid[:-1, 1:], grid[1:, 1:], grid[1:, :-1]], axis=2)  # (nv, nu, 4, 4)
    j, i = np.meshgrid(np.arange(nu), np.arange(nv))
    dark = {"h": i % 2 == 1, "v": j % 2 == 1, "c": (i + j) % 2 == 1, "s": np.zeros_like(i, bool)}[kind]
    return cells.reshape(-1, 4, 4), dark.reshape(-1)



def _clip_near(poly):
    """Clip a convex polygon (P, 3) in camera coordinates to depth >= NEAR (Sutherland-Hodgman)."""
    out = []
    for k in range(len(poly)):
        p, q = poly[k], poly[(k + 1) % len(poly)]
        if p[2] >= NEAR:
            out.append(p)
        if (p[2] >= NEAR) != (q[2] >= NEAR):
            out.append(p + (q - p) * (NEAR - p[2]) / (q[2] - p[2]))
    return np.array(out)


def _fill_polys(img, polys, K, colours):
    """Fill convex polygons (M, P, 3) given in camera coordinates, clipped at the near plane."""
    uv = polys @ K.T
    uv = uv[..., :2] / np.maximum(uv[..., 2:], NEAR)
    # pixel centres are at integer + 0.5 (docs/conventions.md); OpenCV puts them at integers
    pts = np.round((np.clip(uv, -1e5, 1e5) - 0.5) * 16).astype(np.int32)
    clipped = polys[..., 2].min(1) < NEAR * (1 - 1e-6)  # clipped vertices sit on NEAR up to rounding
    for m in range(len(polys)):
        if not clipped[m]:
            cv2.fillConvexPoly(img, pts[m], colours[m], lineType=cv2.LINE_8, shift=4)
            continue
        poly = _clip_near(polys[m])
        if len(poly) >= 3:
            _fill_polys(img, poly[None], K, colours[m:m + 1])


def render_camera(img, boxes, looks, global2cam, K, style):
    """Draw boxes (N, 7) global `x y z w l h yaw` in their looks (N (BGR colour, pattern) pairs) onto img, far
    to near."""
    if len(boxes) == 0:
        return img
    corners = transform_points(box_corners(boxes), global2cam)  # (N, 8, 3) camera frame
    centres = transform_points(boxes[:, :3], global2cam)
    uv = corners @ K.T
    uv = uv[..., :2] / np.maximum(uv[..., 2:], NEAR)
    h, w = img.shape[:2]
    outside = (uv[..., 0] < 0).all(1) | (uv[..., 0] > w).all(1) | (uv[..., 1] < 0).all(1) | (uv[..., 1] > h).all(1)
    keep = np.flatnonzero((corners[..., 2].max(1) > NEAR) & ~(outside & (corners[..., 2].min(1) > NEAR)))
    if len(keep) == 0:
        return img
    corners, centres, looks = corners[keep], centres[keep], [looks[k] for k in keep]
    # contact shadows first: every object covers them
    bottom = corners[:, [3, 2, 6, 7]]
    mid = bottom.mean(1, keepdims=True)
    _fill_polys(img, mid + (bottom - mid) * 1.2, K, [(style.shadow,) * 3] * len(keep))
    quads = corners[:, _FACES]  # (N, 5, 4, 3)
    face_mid = quads.mean(2)
    normals = face_mid - centres[:, None]
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    visible = (normals * -face_mid).sum(-1) > 0  # front faces: the camera (origin) is outside their plane
    sun = global2cam[:3, :3] @ np.array(style.sun)
    shade = style.ambient + (1 - style.ambient) * np.clip(normals @ sun, 0.0, None)  # (N, 5)
    for n in np.argsort(-np.linalg.norm(centres, axis=1)):
        base, pattern = looks[n]
        polys, colours = [], []
        for f in np.flatnonzero(visible[n]):
            weights, dark = _cell_weights(tuple(pattern) if f < 4 else (1, 1, "s"))
            polys.append(weights @ quads[n, f])
            colours.append(base[None] * shade[n, f] * np.where(dark, style.pattern_dark, 1.0)[:, None])
        if polys:
            _fill_polys(img, np.concatenate(polys), K, np.concatenate(colours).tolist())
    return img
