"""Multi-camera pipeline: plain callables on a `results` dict, composed by `Compose`.

`Compose` turns a `get_info` dict into `results` (copies of the geometry the transforms update:
`lidar2img`, `lidar2cam`, `cam_intrinsics`, `gt_boxes`, `gt_labels`) and keeps the untouched info
under `results["info"]`. Image transforms left-multiply `lidar2img` by their 4x4 image transform,
BEV transforms right-multiply it by the inverse of theirs (docs/conventions.md). Images are lists of
(H, W, 3) uint8 BGR arrays until `Normalize`, which stacks them to (N_cam, 3, H, W) float32.
"""

import math
import os

import cv2
import numpy as np
import torch

from bev3d.geometry import wrap_angle

# (mean, std, channel order) of the normalisation presets (docs/conventions.md)
NORMALIZE = {
    "caffe": (np.array([103.53, 116.28, 123.675], np.float32), np.array([1.0, 1.0, 1.0], np.float32), "bgr"),
    "torchvision": (np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32),
                    "rgb"),
    # the VoVNet-99 (DD3D / FCOS3D) backbones of PETR and DETR3D: torchvision's statistics in BGR order
    "bgr_std": (np.array([103.53, 116.28, 123.675], np.float32), np.array([57.375, 57.12, 58.395], np.float32),
                "bgr"),
}


class _Random:
    """Random source of a transform: the given Generator, else one per process seeded from torch, so
    DataLoader workers (seeded by torch per worker and epoch) draw different augmentations."""

    def __init__(self, rng=None):
        self._given = rng
        self._pid = None

    @property
    def rng(self):
        if self._given is not None:
            return self._given
        if self._pid != os.getpid():
            self._pid, self._gen = os.getpid(), np.random.default_rng(torch.initial_seed())
        return self._gen


def _image_transform_4x4(a):
    """(3, 3) affine map of pixel coordinates -> (4, 4) acting on (u*d, v*d, d, 1)."""
    out = np.eye(4)
    out[:2, :2] = a[:2, :2]
    out[:2, 2] = a[:2, 2]
    return out


def _apply_image_transform(results, a):
    results["lidar2img"] = _image_transform_4x4(a)[None] @ results["lidar2img"]
    results["cam_intrinsics"] = a[None] @ results["cam_intrinsics"]
    results["img_aug"] = a[None] @ results["img_aug"]


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, info):
        results = {
            "info": info,
            "sample_token": info["sample_token"],
            "lidar2img": info["lidar2img"].copy(),
            "lidar2cam": info["lidar2cam"].copy(),
            "cam_intrinsics": info["cam_intrinsics"].copy(),
            "img_aug": np.repeat(np.eye(3)[None], len(info["image_paths"]), 0),  # (N_cam, 3, 3) pixel map so far
            "bev_aug": np.eye(4),  # LiDAR -> augmented LiDAR frame
            "gt_boxes": info["gt_boxes"].copy(),
            "gt_labels": info["gt_labels"].copy(),
        }
        for t in self.transforms:
            results = t(results)
        return results


class LoadMultiViewImages:
    """Read the camera images with OpenCV (BGR). `reduce=True` decodes JPEGs at half size (libjpeg's
    DCT scaling, several times faster); intrinsics and lidar2img are halved to match."""

    def __init__(self, reduce=False):
        self.reduce = reduce

    def __call__(self, results):
        from bev3d.data.nuscenes_dataset import BadSampleError

        flag = cv2.IMREAD_REDUCED_COLOR_2 if self.reduce else cv2.IMREAD_COLOR
        images = []
        for path in results["info"]["image_paths"]:
            img = cv2.imread(path, flag)
            if img is None:
                raise BadSampleError(f"Image {path} is missing or is not a readable image.")
            images.append(img)
        results["img"] = images
        if self.reduce:
            _apply_image_transform(results, np.diag([0.5, 0.5, 1.0]))
        return results


class ResizeCropFlip(_Random):
    """Resize, crop to `final_size` (H, W) and maybe flip; one draw per sample shared by all cameras.

    The scale is `fit * r` with `fit = max(H / H_img, W / W_img)` (the smallest scale that covers the
    output) and `r` uniform in `resize_range` when training, 1 at test time. The crop keeps the bottom
    rows (the road) and is random in width when training, centred at test time (the PETR recipe).
    """

    def __init__(self, final_size, resize_range=(1.0, 1.0), flip=False, train=True, rng=None):
        self.final_size = tuple(final_size)
        self.resize_range = tuple(resize_range)
        self.flip = flip
        self.train = train
        super().__init__(rng)

    def sample(self, img_h, img_w):
        """One draw -> (3, 3) pixel map (corner convention) and whether it flips."""
        fh, fw = self.final_size
        scale = max(fh / img_h, fw / img_w)
        if self.train:
            scale *= self.rng.uniform(*self.resize_range)
        new_h, new_w = img_h * scale, img_w * scale
        crop_h = int(new_h) - fh
        if self.train:
            crop_w = int(self.rng.uniform(0, max(0.0, new_w - fw)))
        else:
            crop_w = int(max(0.0, new_w - fw) / 2)
        a = np.array([[scale, 0.0, -crop_w], [0.0, scale, -crop_h], [0.0, 0.0, 1.0]])
        flip = bool(self.train and self.flip and self.rng.uniform() < 0.5)
        if flip:
            a = np.array([[-1.0, 0.0, fw], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ a
        return a, flip

    def __call__(self, results):
        h, w = results["img"][0].shape[:2]
        a, flip = self.sample(h, w)
        # cv2 puts pixel centres at integers, bev3d at integer + 0.5 (docs/conventions.md)
        m = a[:2].copy()
        m[:, 2] += a[:2, :2] @ [0.5, 0.5] - 0.5
        fh, fw = self.final_size
        results["img"] = [cv2.warpAffine(img, m, (fw, fh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
                          for img in results["img"]]
        results["flip"] = flip
        _apply_image_transform(results, a)
        return results


class GlobalRotScaleTrans(_Random):
    """Rotate (about LiDAR z) and scale the scene in BEV: boxes move, lidar2img absorbs the inverse."""

    def __init__(self, rot_range=(0.0, 0.0), scale_range=(1.0, 1.0), translation_std=(0.0, 0.0, 0.0), rng=None):
        self.rot_range = tuple(rot_range)
        self.scale_range = tuple(scale_range)
        self.translation_std = np.asarray(translation_std, dtype=np.float64)
        super().__init__(rng)

    def __call__(self, results):
        angle = self.rng.uniform(*self.rot_range)
        scale = self.rng.uniform(*self.scale_range)
        c, s = math.cos(angle), math.sin(angle)
        bev = np.eye(4)
        bev[:3, :3] = scale * np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        bev[:3, 3] = self.rng.normal(0.0, 1.0, 3) * self.translation_std
        boxes = results["gt_boxes"].copy()
        boxes[:, :3] = boxes[:, :3] @ bev[:3, :3].T + bev[:3, 3]
        boxes[:, 3:6] *= scale
        boxes[:, 6] = wrap_angle(boxes[:, 6] + angle)
        boxes[:, 7:9] = boxes[:, 7:9] @ bev[:2, :2].T
        results["gt_boxes"] = boxes
        inv = np.linalg.inv(bev)
        results["lidar2img"] = results["lidar2img"] @ inv
        results["lidar2cam"] = results["lidar2cam"] @ inv
        results["bev_aug"] = bev @ results["bev_aug"]
        return results


class ObjectRangeFilter:
    """Drop boxes whose BEV centre lies outside `pc_range` (x_min y_min z_min x_max y_max z_max)."""

    def __init__(self, pc_range):
        self.pc_range = np.asarray(pc_range, dtype=np.float64)

    def __call__(self, results):
        x, y = results["gt_boxes"][:, 0], results["gt_boxes"][:, 1]
        r = self.pc_range
        keep = (x > r[0]) & (y > r[1]) & (x < r[3]) & (y < r[4])
        results["gt_boxes"] = results["gt_boxes"][keep]
        results["gt_labels"] = results["gt_labels"][keep]
        return results


class PhotoMetricDistortion(_Random):
    """Random brightness, contrast, saturation and hue per camera (mmdet's PhotoMetricDistortion)."""

    def __init__(self, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta=18,
                 rng=None):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta
        super().__init__(rng)

    def _one(self, img):
        rng = self.rng
        img = img.astype(np.float32)
        if rng.integers(2):
            img += rng.uniform(-self.brightness_delta, self.brightness_delta)
        contrast_first = rng.integers(2)
        if contrast_first and rng.integers(2):
            img *= rng.uniform(*self.contrast_range)
        hsv = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
        if rng.integers(2):
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*self.saturation_range), 0, 255)
        if rng.integers(2):
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-self.hue_delta, self.hue_delta) / 2) % 180  # OpenCV hue: 0..179
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
        if not contrast_first and rng.integers(2):
            img *= rng.uniform(*self.contrast_range)
        return np.clip(img, 0, 255).astype(np.uint8)

    def __call__(self, results):
        results["img"] = [self._one(img) for img in results["img"]]
        return results


class GridMask(_Random):
    """Zero a grid of stripes (period d, width ratio * d) in all cameras of a sample with probability
    `prob` (the GridMask of PETR/DETR3D: rows and columns, no rotation, mode 1)."""

    def __init__(self, prob=0.7, ratio=0.5, use_h=True, use_w=True, rng=None):
        self.prob, self.ratio, self.use_h, self.use_w = prob, ratio, use_h, use_w
        super().__init__(rng)

    def __call__(self, results):
        if self.rng.uniform() >= self.prob:
            return results
        h, w = results["img"][0].shape[:2]
        d = int(self.rng.integers(2, h))
        width = min(max(int(d * self.ratio + 0.5), 1), d - 1)
        keep = np.ones((h, w), np.uint8)
        if self.use_h:
            start = int(self.rng.integers(d))
            for s in range(start - d, h, d):
                keep[max(s, 0):max(s + width, 0)] = 0
        if self.use_w:
            start = int(self.rng.integers(d))
            for s in range(start - d, w, d):
                keep[:, max(s, 0):max(s + width, 0)] = 0
        results["img"] = [img * keep[..., None] for img in results["img"]]
        return results


class Normalize:
    """uint8 BGR list -> (N_cam, 3, H, W) float32 with the `caffe` or `torchvision` preset."""

    def __init__(self, mode="caffe"):
        from bev3d.errors import Bev3dError

        if mode not in NORMALIZE:
            raise Bev3dError(f"data.normalize must be one of {sorted(NORMALIZE)}, got {mode!r}.")
        self.mean, self.std, self.order = NORMALIZE[mode]

    def __call__(self, results):
        h, w = results["img"][0].shape[:2]
        out = np.empty((len(results["img"]), 3, h, w), np.float32)
        for i, img in enumerate(results["img"]):
            bgr = cv2.split(img)
            for c in range(3):
                src = bgr[2 - c] if self.order == "rgb" else bgr[c]
                # (x - mean) / std in one OpenCV pass, written straight into the CHW tensor
                cv2.addWeighted(src, 1.0 / float(self.std[c]), src, 0.0, -float(self.mean[c] / self.std[c]),
                                dst=out[i, c], dtype=cv2.CV_32F)
        results["img"] = out
        results["img_shape"] = (h, w)
        return results


class PadToDivisor:
    """Zero-pad (N_cam, 3, H, W) images at the bottom/right to multiples of `divisor`."""

    def __init__(self, divisor=32):
        self.divisor = max(int(divisor), 1)

    def __call__(self, results):
        img = results["img"]
        h, w = img.shape[-2:]
        ph, pw = -(-h // self.divisor) * self.divisor, -(-w // self.divisor) * self.divisor
        if (ph, pw) != (h, w):
            img = np.pad(img, ((0, 0), (0, 0), (0, ph - h), (0, pw - w)))
        results["img"] = img
        results["img_shape"] = (h, w)
        results["pad_shape"] = (ph, pw)
        return results


class ToSample:
    """results -> the per-sample dict `collate` batches (tensors float32 / int64)."""

    def __call__(self, results):
        img = results["img"]
        return {
            "img": torch.from_numpy(np.ascontiguousarray(img)),
            "lidar2img": torch.from_numpy(results["lidar2img"].astype(np.float32)),
            "img_shape": tuple(int(v) for v in results.get("img_shape", img.shape[-2:])),
            "pad_shape": tuple(int(v) for v in results.get("pad_shape", img.shape[-2:])),
            "targets": {"labels": torch.from_numpy(results["gt_labels"].astype(np.int64)),
                        "boxes": torch.from_numpy(results["gt_boxes"].astype(np.float32))},  # LiDAR frame
            "sample_token": results["sample_token"],
            "info": results["info"],
            # temporal models (StreamPETR): camera matrices, time and the augmented LiDAR frame -> global
            "intrinsics": torch.from_numpy(results["cam_intrinsics"].astype(np.float32)),
            "timestamp": results["info"]["timestamp"] / 1e6,  # seconds
            "frame2global": torch.from_numpy(frame_to_global(results)),
            "scene_token": results["info"].get("scene_token", ""),
            "prev_token": results["info"].get("prev_token", ""),
        }


def frame_to_global(results):
    """(4, 4) float64 map from the sample's augmented LiDAR frame to the global frame: ego2global @ lidar2ego @
    inv(bev_aug), so that the ego motion between two augmented frames stays the true one."""
    info = results["info"]
    return info["ego2global"] @ info["lidar2ego"] @ np.linalg.inv(results["bev_aug"])


def collate(samples):
    """Per-sample dicts -> the 3D batch (docs/models.md): img (B, N_cam, 3, H, W) zero-padded to the largest
    pad_shape, lidar2img (B, N_cam, 4, 4), per-sample lists for the rest (`targets`: {"labels" (T,),
    "boxes" (T, 9)} each)."""
    pad_h = max(s["img"].shape[-2] for s in samples)
    pad_w = max(s["img"].shape[-1] for s in samples)
    n_cam, c = samples[0]["img"].shape[:2]
    img = samples[0]["img"].new_zeros(len(samples), n_cam, c, pad_h, pad_w)
    for b, s in enumerate(samples):
        img[b, :, :, : s["img"].shape[-2], : s["img"].shape[-1]] = s["img"]
    return {
        "img": img,
        "lidar2img": torch.stack([s["lidar2img"] for s in samples]),
        "img_shape": [s["img_shape"] for s in samples],
        "pad_shape": (pad_h, pad_w),
        "targets": [s["targets"] for s in samples],
        "sample_token": [s["sample_token"] for s in samples],
        "infos": [s["info"] for s in samples],
        **_temporal(samples),
    }


def _temporal(samples):
    """The temporal entries of the batch: intrinsics (B, N_cam, 3, 3), timestamp (B,) float64 seconds, frame2global
    (B, 4, 4) float64, scene and previous sample tokens; prev_exists (B,) where a streaming loader set it."""
    if "frame2global" not in samples[0]:
        return {}
    out = {"intrinsics": torch.stack([s["intrinsics"] for s in samples]),
           "timestamp": torch.tensor([s["timestamp"] for s in samples], dtype=torch.float64),
           "frame2global": torch.stack([s["frame2global"] for s in samples]),
           "scene_token": [s["scene_token"] for s in samples], "prev_token": [s["prev_token"] for s in samples]}
    if "prev_exists" in samples[0]:
        out["prev_exists"] = torch.tensor([s["prev_exists"] for s in samples], dtype=torch.bool)
    return out


def build_pipeline(data_cfg, train, pc_range=None, native_size=(900, 1600), rng=None):
    """The train or test pipeline from a DataConfig. native_size (H, W) of the stored images decides
    whether JPEGs are decoded at half size (when every draw scales by <= 1/2)."""
    final = tuple(data_cfg.image_size)
    fit = max(final[0] / native_size[0], final[1] / native_size[1])
    max_scale = fit * (max(data_cfg.resize_range) if train else 1.0)
    reduce = max_scale <= 0.5
    steps = [LoadMultiViewImages(reduce=reduce)]
    if train:
        steps.append(ResizeCropFlip(final, data_cfg.resize_range, data_cfg.flip, train=True, rng=rng))
        if data_cfg.photometric:
            steps.append(PhotoMetricDistortion(rng=rng))
        steps.append(GlobalRotScaleTrans(data_cfg.rot_range, data_cfg.scale_range, rng=rng))
        if pc_range is not None:
            steps.append(ObjectRangeFilter(pc_range))
        if data_cfg.grid_mask_prob > 0:
            steps.append(GridMask(prob=data_cfg.grid_mask_prob, rng=rng))
    else:
        steps.append(ResizeCropFlip(final, train=False))
    steps += [Normalize(data_cfg.normalize), PadToDivisor(data_cfg.pad_divisor), ToSample()]
    return Compose(steps)
