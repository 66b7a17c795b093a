"""The look of a scene: ground and sky, light, object colours and textures, traffic, camera response.

`Style()` is the rig's original look (every class in its own hue and pattern, one ground, sky and sun);
`random_style(rng)` draws a scene's look so that a model has to find the class in an object's shape and
size and its position in the geometry, not in its colour or in one renderer's ground texture. The camera
response (exposure, white balance, gamma, noise, JPEG quality) is drawn per image from the style's ranges.
"""

from dataclasses import dataclass, replace

import cv2
import numpy as np

from bev3d.constants import CLASSES
from bev3d.data.synthetic.classes import SPECS, class_bgr, hsv_bgr

STYLES = ("random", "fixed")
# 16:9 sizes a random style writes its images at (the nuScenes native size and below); the intrinsics scale along
IMAGE_SIZES = ((1600, 900), (1280, 720), (1024, 576), (800, 450))
PATTERN_KINDS = ("h", "v", "c", "s")  # stripes across, stripes down, checks, solid (render._cell_weights)


@dataclass(frozen=True)
class Style:
    # ground (grey levels 0..255, BGR colours) and atmosphere
    asphalt: float = 78.0
    tile_contrast: float = 10.0  # brightness step between neighbouring 4 m asphalt / verge tiles
    line: float = 215.0  # lane and edge lines
    paving: float = 150.0
    grout: float = 118.0
    verge: tuple = (88.0, 112.0, 104.0)
    verge_contrast: float = 8.0
    fog: tuple = (225.0, 222.0, 218.0)
    haze_distance: float = 90.0  # m: the ground fades to `fog` as exp(-distance / haze_distance)
    sky_horizon: tuple = (235.0, 225.0, 215.0)
    sky_zenith: tuple = (220.0, 190.0, 165.0)
    # light: faces get ambient + (1 - ambient) * max(0, normal . sun)
    sun: tuple = tuple(np.array([0.35, 0.55, 0.76]) / np.linalg.norm([0.35, 0.55, 0.76]))
    ambient: float = 0.5
    shadow: float = 45.0  # grey level of the contact shadow under every object
    pattern_dark: float = 0.6  # brightness of a texture's dark cells
    # objects: True draws each class in its own hue and pattern (classes.SPECS); False draws every object in
    # its own colour and pattern, keeping its class's hue with probability `class_colour_prob`
    class_looks: bool = True
    class_colour_prob: float = 0.0
    # traffic: ego speed range (m/s), object density (gaps between objects divided by it), class weights
    ego_speed: tuple = (3.0, 7.0)
    density: float = 1.0
    class_mix: tuple = (1.0,) * len(CLASSES)
    # camera response, drawn per image: exposure gain, per-channel white-balance gain 1 +- white_balance,
    # gamma, uniform luminance noise of this half-width (grey levels), JPEG quality
    image_size: tuple = None  # (W, H); None: the size the writer is asked for
    exposure: tuple = (1.0, 1.0)
    white_balance: float = 0.0
    gamma: tuple = (1.0, 1.0)
    noise: float = 0.0
    jpeg_quality: tuple = (90, 90)

    def to_json(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _grey_colour(rng, lo, hi, tint):
    """A BGR colour of grey level in [lo, hi] with a random tint of at most `tint` per channel."""
    return tuple(float(v) for v in np.clip(rng.uniform(lo, hi) + rng.uniform(-tint, tint, 3), 0, 255))


def random_style(rng):
    """A scene's look drawn from `rng` (the writer seeds it from --style-seed and the scene)."""
    elevation, azimuth = rng.uniform(0.25, 1.35), rng.uniform(-np.pi, np.pi)
    sun = (np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation))
    horizon = _grey_colour(rng, 150, 245, 25)
    mix = np.exp(rng.normal(0.0, 0.5, len(CLASSES)))
    return Style(
        asphalt=float(rng.uniform(40, 130)), tile_contrast=float(rng.uniform(0, 20)), line=float(rng.uniform(150, 250)),
        paving=float(rng.uniform(90, 200)), grout=float(rng.uniform(60, 160)), verge=_grey_colour(rng, 50, 150, 35),
        verge_contrast=float(rng.uniform(0, 16)), fog=_grey_colour(rng, 150, 240, 15),
        haze_distance=float(rng.uniform(40, 250)), sky_horizon=horizon,
        sky_zenith=tuple(float(v) for v in np.clip(np.array(horizon) + rng.uniform(-70, 10, 3), 0, 255)),
        sun=tuple(float(v) for v in sun), ambient=float(rng.uniform(0.25, 0.75)), shadow=float(rng.uniform(15, 80)),
        pattern_dark=float(rng.uniform(0.4, 0.9)), class_looks=False, class_colour_prob=float(rng.uniform(0.0, 0.4)),
        ego_speed=(1.0, 12.0), density=float(rng.uniform(0.7, 1.4)), class_mix=tuple(float(v) for v in mix),
        image_size=IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))], exposure=(0.7, 1.3), white_balance=0.08,
        gamma=(0.8, 1.25), noise=float(rng.uniform(0, 12)), jpeg_quality=(55, 95),
    )


def scene_style(style, style_seed, scene_idx, image_size=None):
    """The style of scene `scene_idx`: "fixed" (Style()) or "random" (random_style, seeded by the style seed and
    the scene, independent of the scene-layout seed); an explicit `image_size` overrides the style's."""
    s = Style() if style == "fixed" else random_style(np.random.default_rng([0x5717E, style_seed, scene_idx]))
    return replace(s, image_size=tuple(image_size) if image_size is not None else s.image_size or (1600, 900))


def object_look(style, rng, label):
    """(BGR base colour (3,) float64, texture pattern) of one object of class `label`."""
    spec = SPECS[CLASSES[label]]
    if style.class_looks:
        return class_bgr(label), spec.pattern
    hue = spec.hue if rng.uniform() < style.class_colour_prob else int(rng.integers(180))
    # a third of the objects is white, grey or black (as real cars are), the rest coloured
    saturation = int(rng.uniform(0, 50)) if rng.uniform() < 0.33 else int(rng.uniform(80, 255))
    pattern = (int(rng.integers(1, 9)), int(rng.integers(1, 6)), PATTERN_KINDS[rng.integers(len(PATTERN_KINDS))])
    return hsv_bgr(hue, saturation, int(rng.uniform(50, 240))), pattern


def camera_response(style, rng):
    """Per-image response: {"lut": (256, 1, 3) uint8 or None, "noise": half-width, "noise_offset", "quality"}."""
    gain = rng.uniform(*style.exposure) * (1.0 + rng.uniform(-style.white_balance, style.white_balance, 3))
    gamma = rng.uniform(*style.gamma)
    lo, hi = style.jpeg_quality
    quality = int(rng.integers(lo, hi + 1))
    lut = None
    if not (np.all(gain == 1.0) and gamma == 1.0):
        x = np.arange(256, dtype=np.float64)[:, None] / 255.0
        lut = np.clip(np.round(255.0 * x ** gamma * gain[None]), 0, 255).astype(np.uint8)[:, None, :]
    offset = tuple(int(v) for v in rng.integers(_NOISE_MARGIN, size=2))
    return {"lut": lut, "noise": int(round(style.noise)), "noise_offset": offset, "quality": quality}


# Noise is cropped at a per-image offset from one field per (amplitude, size): drawing a fresh field per image
# would double the writer's time.
_NOISE_MARGIN = 64
_NOISE_CACHE = {}


def _noise_field(amplitude, height, width):
    """(positive part, negative part) of uniform luminance noise in [-amplitude, amplitude], (H+m, W+m, 3) uint8."""
    key = (amplitude, height, width)
    if key not in _NOISE_CACHE:
        _NOISE_CACHE.clear()
        shape = (height + _NOISE_MARGIN, width + _NOISE_MARGIN, 1)
        noise = np.random.default_rng(list(key)).integers(-amplitude, amplitude + 1, shape, np.int16)
        _NOISE_CACHE[key] = tuple(np.repeat(np.clip(sign * noise, 0, None).astype(np.uint8), 3, axis=2)
                                  for sign in (1, -1))
    return _NOISE_CACHE[key]


def apply_response(img, response):
    """The camera response on a rendered (H, W, 3) uint8 image (before JPEG encoding)."""
    if response["lut"] is not None:
        img = cv2.LUT(img, response["lut"])
    if response["noise"] > 0:
        h, w = img.shape[:2]
        dy, dx = response["noise_offset"]
        positive, negative = (f[dy:dy + h, dx:dx + w] for f in _noise_field(response["noise"], h, w))
        img = cv2.subtract(cv2.add(img, positive), negative)  # saturating uint8 arithmetic
    return img
