"""The augmentation pipeline keeps images and geometry consistent (checked on the rendered pixels)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import RANDOM_SYNTH_PARAMS, build_cached_synth

from bev3d.data import NuScenesDataset
from bev3d.data import synthetic
from bev3d.data.transforms import (Compose, GlobalRotScaleTrans, GridMask, LoadMultiViewImages, Normalize,
                                   PadToDivisor, ResizeCropFlip, ToSample, collate)
from bev3d.geometry import box_corners, project_points


@pytest.fixture(scope="module")
def val_set(synth_root):
    return NuScenesDataset(synth_root, "v1.0-mini", "mini_val")


@pytest.fixture(scope="module", params=["fixed", 7, 8])
def styled_val_set(request, synth_root):
    """(mini_val, how many objects a check must see) of the fixed-style set and of sets with one random style (and
    image size) per scene (style seeds 7 and 8: four random styles), where grey and dark objects are not checked."""
    if request.param == "fixed":
        return NuScenesDataset(synth_root, "v1.0-mini", "mini_val"), 10
    root = build_cached_synth({**RANDOM_SYNTH_PARAMS, "style_seed": request.param})
    return NuScenesDataset(root, "v1.0-mini", "mini_val"), 5


def drawn_hues(root):
    """annotation token -> the hue its object is drawn in (the writer's style file), or None where the colour is
    too grey or dark for a hue check."""
    root = Path(root)
    looks = json.loads((root / synthetic.STYLE_FILE).read_text())["instances"]
    hues = {}
    for ann in json.loads((root / "v1.0-mini" / "sample_annotation.json").read_text()):
        bgr = np.clip(np.round(looks[ann["instance_token"]]["bgr"]), 0, 255).astype(np.uint8)[None, None]
        h, s, v = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[0, 0].astype(int)
        hues[ann["token"]] = h if s >= 100 and v >= 100 else None
    return hues


def _unoccluded_centres(boxes, lidar2img, img_hw, min_px=12):
    """Indices of boxes whose projected centre is inside the image, whose silhouette is >= min_px wide,
    and which no nearer box can cover there."""
    corners = box_corners(boxes)  # (N, 8, 3)
    uv_c, depth_c = project_points(boxes[:, :3], lidar2img)
    uv, depth = project_points(corners, lidar2img[None])  # (N, 8, 2), (N, 8)
    h, w = img_hw
    keep = []
    for n in range(len(boxes)):
        u, v = uv_c[n]
        if depth[n].min() < 1.0 or not (2 <= u < w - 2 and 2 <= v < h - 2) or np.ptp(uv[n, :, 0]) < min_px:
            continue
        covered = False
        for o in range(len(boxes)):
            if o == n or depth[o].max() <= 0 or depth[o].min() >= depth_c[n]:
                continue
            if depth[o].min() < 0.5 or (uv[o, :, 0].min() - 3 <= u <= uv[o, :, 0].max() + 3
                                        and uv[o, :, 1].min() - 3 <= v <= uv[o, :, 1].max() + 3):
                covered = True
                break
        if not covered:
            keep.append(n)
    return keep, uv_c


def _hue_ok(img, uv, expected, tol=10):
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    h, s, _ = hsv[int(uv[1]), int(uv[0])].astype(int)
    return s > 60 and min(abs(h - expected), 180 - abs(h - expected)) <= tol


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augmentation_keeps_geometry(styled_val_set, seed):
    """After random ResizeCropFlip + GlobalRotScaleTrans, each unoccluded object's projected centre
    (augmented box, augmented lidar2img) still lands on a pixel of the colour its object is drawn in, in the
    fixed style and in random styles (object colours, exposure, white balance, noise, JPEG quality)."""
    val_set, min_checked = styled_val_set
    hues = drawn_hues(val_set.root)
    rng = np.random.default_rng(seed)
    pipeline = Compose([LoadMultiViewImages(),
                        ResizeCropFlip((200, 400), resize_range=(0.8, 1.3), flip=True, train=True, rng=rng),
                        GlobalRotScaleTrans(rot_range=(-0.6, 0.6), scale_range=(0.9, 1.1), rng=rng)])
    checked, flips = 0, 0
    for i in range(len(val_set)):
        out = pipeline(val_set.get_info(i))
        flips += out["flip"]
        assert not np.allclose(out["gt_boxes"], out["info"]["gt_boxes"])  # the boxes really moved
        for c, img in enumerate(out["img"]):
            assert img.shape == (200, 400, 3)
            idx, uv = _unoccluded_centres(out["gt_boxes"], out["lidar2img"][c], img.shape[:2])
            for n in idx:
                src = np.linalg.solve(out["img_aug"][c], [*uv[n], 1.0])  # where the pixel came from
                h0, w0 = out["info"]["image_hw"][c]
                hue = hues[out["info"]["ann_tokens"][n]]
                if hue is None or not (2 <= src[0] < w0 - 2 and 2 <= src[1] < h0 - 2):
                    continue  # a grey object, or zero padding (a scale below the fitting scale leaves borders)
                assert _hue_ok(img, uv[n], hue), (i, c, n)
                checked += 1
    assert checked >= min_checked


def test_wrong_geometry_is_detected(styled_val_set):
    """The check above can fail: augmenting the image but not lidar2img breaks it."""
    val_set, min_checked = styled_val_set
    rng = np.random.default_rng(0)
    hues = drawn_hues(val_set.root)
    bad, total = 0, 0
    for i in range(len(val_set)):
        info = val_set.get_info(i)
        size = tuple(int(v) for v in info["image_hw"][0])  # zoomed 1.5x into an image of the stored size
        out = Compose([LoadMultiViewImages(), ResizeCropFlip(size, resize_range=(1.5, 1.5), train=True,
                                                             rng=rng)])(info)
        for c, img in enumerate(out["img"]):
            stale = info["lidar2img"][c]  # geometry of the un-augmented image
            idx, uv = _unoccluded_centres(info["gt_boxes"], stale, img.shape[:2])
            idx = [n for n in idx if hues[info["ann_tokens"][n]] is not None]
            total += len(idx)
            bad += sum(not _hue_ok(img, uv[n], hues[info["ann_tokens"][n]]) for n in idx)
        if total >= min_checked:
            break
    assert total >= min_checked and bad > total / 3


def test_reduced_decode_matches_full_decode(val_set):
    """Half-size JPEG decoding + halved intrinsics gives the same output as full decoding."""
    info = val_set.get_info(1)
    outs = []
    for reduce in (False, True):
        out = Compose([LoadMultiViewImages(reduce=reduce), ResizeCropFlip((96, 224), train=False)])(info)
        outs.append(out)
    np.testing.assert_allclose(outs[0]["lidar2img"], outs[1]["lidar2img"], atol=1e-9)
    diff = np.abs(np.stack(outs[0]["img"]).astype(int) - np.stack(outs[1]["img"]).astype(int))
    assert diff.mean() < 6


def test_test_time_crop_is_petr_recipe(val_set):
    info = val_set.get_info(0)
    out = Compose([LoadMultiViewImages(), ResizeCropFlip((100, 300), train=False)])(info)
    a = out["img_aug"][0]
    h0, w0 = info["image_hw"][0]
    scale = max(100 / h0, 300 / w0)
    new_w, new_h = w0 * scale, h0 * scale
    expected = np.array([[scale, 0, -int((new_w - 300) / 2)], [0, scale, -(int(new_h) - 100)], [0, 0, 1]])
    np.testing.assert_allclose(a, expected)
    np.testing.assert_allclose(out["cam_intrinsics"], a[None] @ info["cam_intrinsics"])


def test_normalize_pad_and_sample(val_set):
    info = val_set.get_info(0)
    loaded = Compose([LoadMultiViewImages(), ResizeCropFlip((100, 300), train=False)])(info)
    raw = np.stack(loaded["img"]).astype(np.float32)  # (6, H, W, 3) BGR
    for mode, expect in [("caffe", raw - [103.53, 116.28, 123.675]),
                         ("torchvision", (raw[..., ::-1] - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375])]:
        out = Compose([LoadMultiViewImages(), ResizeCropFlip((100, 300), train=False), Normalize(mode),
                       PadToDivisor(32), ToSample()])(info)
        assert out["img"].shape == (6, 3, 128, 320) and out["img_shape"] == (100, 300)
        assert out["pad_shape"] == (128, 320)
        np.testing.assert_allclose(out["img"][:, :, :100, :300].numpy(), expect.transpose(0, 3, 1, 2), atol=1e-4)
        assert float(out["img"][:, :, 100:].abs().max()) == 0.0
    batch = collate([out, out])
    assert batch["img"].shape == (2, 6, 3, 128, 320) and batch["lidar2img"].dtype == torch.float32


def test_grid_mask_zeroes_stripes(val_set):
    out = Compose([LoadMultiViewImages(), ResizeCropFlip((100, 300), train=False),
                   GridMask(prob=1.0, rng=np.random.default_rng(0))])(val_set.get_info(0))
    zero = np.stack(out["img"]).max(-1) == 0  # (6, H, W)
    assert 0.2 < zero.mean() < 0.9
    np.testing.assert_array_equal(zero[0], zero[3])  # one mask per sample


def test_workers_draw_different_augmentations(synth_root):
    """Each DataLoader worker seeds its own generator from torch: the same sample, loaded by two
    workers, gets two different random draws."""
    from bev3d.config import Config
    from bev3d.data import build_dataset

    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.rot_range = str(synth_root), [64, 160], [-0.5, 0.5]
    ds = build_dataset(cfg, "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=[0, 0], num_workers=2, collate_fn=collate)
    a, b = [batch["lidar2img"][0] for batch in loader]
    assert not torch.allclose(a, b)
