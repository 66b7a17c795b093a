"""NuScenesDataset and boxes_to_nuscenes against the real devkit (no mocks)."""

import json
import shutil

import numpy as np
import pytest
import torch
from nuscenes import NuScenes
from nuscenes.utils.geometry_utils import BoxVisibility, view_points
from pyquaternion import Quaternion

from bev3d.constants import CAMERAS, CLASSES
from bev3d.data import NuScenesDataset, boxes_to_nuscenes, build_dataset, collate
from bev3d.errors import Bev3dError
from bev3d.geometry import box_corners, project_points


@pytest.fixture(scope="module")
def nusc(synth_root):
    return NuScenes(version="v1.0-mini", dataroot=str(synth_root), verbose=False)


@pytest.fixture(scope="module")
def val_set(synth_root):
    return NuScenesDataset(synth_root, "v1.0-mini", "mini_val")


def test_info_contract(val_set, nusc):
    info = val_set.get_info(0)
    assert len(val_set) == 8
    assert [p.split("/")[-2] for p in info["image_paths"]] == list(CAMERAS)
    for key, shape in [("cam_intrinsics", (6, 3, 3)), ("lidar2cam", (6, 4, 4)), ("lidar2img", (6, 4, 4)),
                       ("lidar2ego", (4, 4)), ("ego2global", (4, 4))]:
        assert info[key].shape == shape and info[key].dtype == np.float64, key
    n = len(info["gt_boxes"])
    assert info["gt_boxes"].shape == (n, 9) and info["gt_labels"].shape == (n,) and n > 5
    assert np.isfinite(info["gt_boxes"]).all()
    sample = nusc.get("sample", info["sample_token"])
    assert info["timestamp"] == sample["timestamp"]
    # filtered like the devkit's evaluation: exactly the annotations with points
    with_points = {a for a in sample["anns"] if nusc.get("sample_annotation", a)["num_lidar_pts"] > 0}
    assert set(info["ann_tokens"]) == with_points
    from nuscenes.eval.detection.utils import category_to_detection_name

    names = [category_to_detection_name(nusc.get("sample_annotation", a)["category_name"]) for a in info["ann_tokens"]]
    assert [CLASSES[i] for i in info["gt_labels"]] == names


def test_projection_matches_devkit(val_set, nusc):
    """For every camera and visible GT box: our lidar2img projection of the box's 8 corners (the devkit's
    LiDAR-frame box) == the devkit's view_points of the same box from get_sample_data(cam), 1e-3 px."""
    compared = 0
    for i in range(len(val_set)):
        info = val_set.get_info(i)
        sample = nusc.get("sample", info["sample_token"])
        _, lidar_boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        lidar_boxes = {b.token: b for b in lidar_boxes}
        ours = dict(zip(info["ann_tokens"], box_corners(info["gt_boxes"])))
        for c, cam in enumerate(CAMERAS):
            _, boxes, K = nusc.get_sample_data(sample["data"][cam], box_vis_level=BoxVisibility.ANY)
            for box in boxes:
                if box.token not in ours:
                    continue
                front = box.corners()[2] > 0.1
                ref = view_points(box.corners(), K, normalize=True)[:2].T  # (8, 2)
                uv, depth = project_points(lidar_boxes[box.token].corners().T, info["lidar2img"][c])
                np.testing.assert_allclose(uv[front], ref[front], atol=1e-3)
                np.testing.assert_allclose(depth, box.corners()[2], atol=1e-6)
                # our yaw-only box differs from the full rotation only by the ~1 deg LiDAR tilt
                assert np.abs(ours[box.token] - lidar_boxes[box.token].corners().T).max() < 0.03 * box.wlh.max()
                compared += 1
    assert compared > 50


def test_projection_exact_for_yaw_only_boxes(val_set, nusc):
    """Exact check (1e-3 px): rebuild the devkit Box from OUR LiDAR-frame box, move it with the devkit's own
    records camera-by-camera and compare view_points with project_points."""
    from nuscenes.utils.data_classes import Box

    info = val_set.get_info(3)
    sample = nusc.get("sample", info["sample_token"])
    lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    lidar_cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    lidar_pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
    corners = box_corners(info["gt_boxes"])
    checked = 0
    for c, cam in enumerate(CAMERAS):
        sd = nusc.get("sample_data", sample["data"][cam])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        K = np.array(cs["camera_intrinsic"])
        for n, b in enumerate(info["gt_boxes"]):
            box = Box(b[:3], b[3:6], Quaternion(axis=[0, 0, 1], angle=b[6]))
            # LiDAR -> ego(t_lidar) -> global -> ego(t_cam) -> camera, with pyquaternion as the devkit does
            box.rotate(Quaternion(lidar_cs["rotation"]))
            box.translate(np.array(lidar_cs["translation"]))
            box.rotate(Quaternion(lidar_pose["rotation"]))
            box.translate(np.array(lidar_pose["translation"]))
            box.translate(-np.array(pose["translation"]))
            box.rotate(Quaternion(pose["rotation"]).inverse)
            box.translate(-np.array(cs["translation"]))
            box.rotate(Quaternion(cs["rotation"]).inverse)
            if box.corners()[2].min() < 1.0:
                continue
            ref = view_points(box.corners(), K, normalize=True)[:2].T
            uv, _ = project_points(corners[n], info["lidar2img"][c])
            np.testing.assert_allclose(uv, ref, atol=1e-3)
            checked += 1
    assert checked > 5


def test_round_trip_to_table_annotations(val_set, nusc):
    for i in (0, 5):
        info = val_set.get_info(i)
        results = boxes_to_nuscenes(info["gt_boxes"], np.ones(len(info["gt_boxes"])), info["gt_labels"], info)
        for res, token in zip(results, info["ann_tokens"]):
            ann = nusc.get("sample_annotation", token)
            np.testing.assert_allclose(res["translation"], ann["translation"], atol=1e-6)
            assert res["size"] == pytest.approx(ann["size"], abs=1e-12)
            q_err = Quaternion(res["rotation"]).inverse * Quaternion(ann["rotation"])
            assert abs(q_err.yaw_pitch_roll[0]) < 1e-3
            v = nusc.box_velocity(token)[:2]
            # velocity through the tilted LiDAR frame loses its vertical part: ~v * tilt^2
            np.testing.assert_allclose(res["velocity"], v, atol=1e-2 * max(1.0, np.linalg.norm(v)))
            assert res["detection_name"] == CLASSES[info["gt_labels"][results.index(res)]]


def test_attribute_rule():
    info = {"sample_token": "x", "lidar2ego": np.eye(4), "ego2global": np.eye(4)}
    boxes = np.zeros((4, 9))
    boxes[:, 3:6] = 1.0
    boxes[1, 7] = boxes[3, 7] = 3.0
    res = boxes_to_nuscenes(boxes, np.ones(4), np.array([0, 0, 7, 8]), info)
    assert [r["attribute_name"] for r in res] == ["vehicle.parked", "vehicle.moving", "cycle.without_rider",
                                                  "pedestrian.moving"]
    assert boxes_to_nuscenes(boxes[:1], [1.0], [9], info)[0]["attribute_name"] == ""


@pytest.mark.parametrize("split", ["mini_train", "mini_val"])
def test_gt_as_predictions_scores_perfect(synth_root, nusc, split, tmp_path):
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    ds = NuScenesDataset(synth_root, "v1.0-mini", split)
    results = {}
    for i in range(len(ds)):
        info = ds.get_info(i)
        results[info["sample_token"]] = boxes_to_nuscenes(info["gt_boxes"], np.ones(len(info["gt_boxes"])),
                                                          info["gt_labels"], info)
    path = tmp_path / "results.json"
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
    path.write_text(json.dumps({"meta": meta, "results": results}))
    metrics, _ = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), split, str(tmp_path),
                               verbose=False).evaluate()
    summary = metrics.serialize()
    assert summary["mean_ap"] == pytest.approx(1.0, abs=1e-9)
    # the ~1 degree LiDAR tilt leaves orientation/velocity errors of ~1e-4 and ~1e-3: NDS 1 - 1e-3
    assert summary["nd_score"] == pytest.approx(1.0, abs=1e-3)
    assert summary["tp_errors"]["trans_err"] < 1e-6 and summary["tp_errors"]["scale_err"] < 1e-9
    assert summary["tp_errors"]["attr_err"] == 0.0


def test_index_cache_is_used(synth_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth_root / "v1.0-mini", root / "v1.0-mini")
    shutil.copytree(synth_root / "maps", root / "maps")
    first = NuScenesDataset(root, "v1.0-mini", "mini_val")
    assert not first.from_cache  # built through the devkit
    assert list((root / ".bev3d_cache").glob("*.npz"))
    second = NuScenesDataset(root, "v1.0-mini", "mini_val")
    assert second.from_cache and getattr(second, "_nusc", None) is None
    a, b = first.get_info(2), second.get_info(2)
    for key in ("lidar2img", "gt_boxes", "gt_labels", "ego2global"):
        np.testing.assert_array_equal(a[key], b[key])
    # a changed table invalidates the cache
    table = root / "v1.0-mini" / "sample_annotation.json"
    table.write_text(table.read_text() + " ")
    third = NuScenesDataset(root, "v1.0-mini", "mini_val")
    assert not third.from_cache


def test_missing_root_and_table(tmp_path, synth_root):
    with pytest.raises(Bev3dError, match="bev3d synth"):
        NuScenesDataset(tmp_path / "nope", "v1.0-mini", "mini_train")
    shutil.copytree(synth_root / "v1.0-mini", tmp_path / "v1.0-mini")
    (tmp_path / "v1.0-mini" / "ego_pose.json").unlink()
    with pytest.raises(Bev3dError, match="ego_pose.json"):
        NuScenesDataset(tmp_path, "v1.0-mini", "mini_train")


def test_split_version_mismatch(synth_root):
    with pytest.raises(Bev3dError, match="mini_train, mini_val"):
        NuScenesDataset(synth_root, "v1.0-mini", "val")


def _copy_set(synth_root, dst):
    shutil.copytree(synth_root, dst, ignore=shutil.ignore_patterns(".bev3d_cache"))
    return dst


def test_bad_image_errors_or_skips(synth_root, tmp_path):
    from bev3d.config import Config

    root = _copy_set(synth_root, tmp_path / "set")
    cfg = Config()
    cfg.data.root, cfg.data.image_size = str(root), [128, 352]
    ds = build_dataset(cfg, "val")
    bad = ds.get_info(1)["image_paths"][2]
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(Bev3dError, match=bad.split("/")[-1]):
        ds[1]
    cfg.data.skip_bad_samples = True
    ds = build_dataset(cfg, "val")
    sample = ds[1]
    assert sample["sample_token"] == ds.get_info(2)["sample_token"] and ds.skipped == {1}


def test_build_dataset_and_collate(synth_root):
    from bev3d.config import Config

    cfg = Config()
    cfg.data.root, cfg.data.image_size = str(synth_root), [128, 352]
    cfg.data.flip, cfg.data.rot_range, cfg.data.resize_range = True, [-0.3, 0.3], [0.9, 1.1]
    train = build_dataset(cfg, "train")
    batch = collate([train[0], train[1]])
    assert batch["img"].shape == (2, 6, 3, 128, 352) and batch["img"].dtype == torch.float32
    assert batch["lidar2img"].shape == (2, 6, 4, 4)
    assert batch["img_shape"] == [(128, 352), (128, 352)] and batch["pad_shape"] == (128, 352)
    targets = batch["targets"]
    assert all(t["boxes"].shape[1] == 9 and t["boxes"].dtype == torch.float32 for t in targets)
    assert all(t["labels"].dtype == torch.int64 and len(t["labels"]) == len(t["boxes"]) for t in targets)
    assert batch["infos"][0]["sample_token"] == batch["sample_token"][0] == train.get_info(0)["sample_token"]
    val = build_dataset(cfg, "mini_val")
    s = val[0]
    assert s["img"].shape == (6, 3, 128, 352) and len(val) == 8
