"""The synthetic rig, checked through the real devkit."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from nuscenes import NuScenes
from nuscenes.eval.detection.utils import category_to_detection_name

from bev3d.constants import CAMERAS, CLASSES
from bev3d.data import synthetic
from bev3d.data.synthetic.scene import make_scene
from bev3d.errors import Bev3dError
from bev3d.geometry import transform_matrix, transform_points


@pytest.fixture(scope="module")
def nusc(synth_root):
    return NuScenes(version="v1.0-mini", dataroot=str(synth_root), verbose=False)


def test_tables_load_and_split_names(nusc):
    names = sorted(s["name"] for s in nusc.scene)
    assert names == sorted(synthetic.MINI_TRAIN[:2] + synthetic.MINI_VAL[:2])
    assert len(nusc.sample) == 4 * 4
    # 2 Hz key frames in microseconds, linked both ways
    for scene in nusc.scene:
        sample = nusc.get("sample", scene["first_sample_token"])
        while sample["next"]:
            nxt = nusc.get("sample", sample["next"])
            assert nxt["timestamp"] - sample["timestamp"] == 500_000
            assert nxt["prev"] == sample["token"]
            sample = nxt


def test_every_class_in_each_split_with_points(nusc):
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    for split in ("mini_train", "mini_val"):
        names = set()
        for ann in nusc.sample_annotation:
            scene = nusc.get("scene", nusc.get("sample", ann["sample_token"])["scene_token"])
            if scene["name"] in splits[split] and ann["num_lidar_pts"] > 0:
                names.add(category_to_detection_name(ann["category_name"]))
        assert names == set(CLASSES), split


def test_lidar_counts_match_written_cloud_and_edge_cases(nusc, synth_root):
    """num_lidar_pts equals the points of the written .pcd.bin inside the box (devkit's points_in_box)."""
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import points_in_box

    sample = nusc.sample[1]
    sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    cloud = LidarPointCloud.from_file(nusc.get_sample_data_path(sd["token"]))
    assert cloud.points.shape[0] == 4 and cloud.points.shape[1] > 10_000
    _, boxes, _ = nusc.get_sample_data(sd["token"])
    for box in boxes:
        ann = nusc.get("sample_annotation", box.token)
        inside = points_in_box(box.copy(), cloud.points[:3], wlh_factor=1.0).sum()
        grown = points_in_box(box.copy(), cloud.points[:3], wlh_factor=1.05).sum()
        assert inside <= ann["num_lidar_pts"] <= grown, ann["token"]
    dist = []
    for ann in nusc.sample_annotation:
        pose = nusc.get("ego_pose", nusc.get("sample_data", nusc.get("sample", ann["sample_token"])["data"][
            "LIDAR_TOP"])["ego_pose_token"])
        dist.append(np.hypot(*(np.array(ann["translation"][:2]) - pose["translation"][:2])))
    points = np.array([a["num_lidar_pts"] for a in nusc.sample_annotation])
    assert (points == 0).any(), "no zero-point annotation (edge case)"
    assert ((np.array(dist) > 50) & (points > 0)).any(), "no annotated object with points beyond 50 m"


def test_attributes_follow_motion(nusc):
    for ann in nusc.sample_annotation:
        speed = np.linalg.norm(np.nan_to_num(nusc.box_velocity(ann["token"]))[:2])
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        name = category_to_detection_name(ann["category_name"])
        if name in ("barrier", "traffic_cone"):
            assert attrs == []
        else:
            moving = speed > 0.2
            assert attrs[0] in {
                True: ("vehicle.moving", "cycle.with_rider", "pedestrian.moving"),
                False: ("vehicle.parked", "cycle.without_rider", "pedestrian.standing"),
            }[moving], (name, speed, attrs)


def test_rendered_object_colour_at_projected_centre(nusc, synth_root):
    """A box centre drawn by the devkit's own geometry lands on its class colour in the JPEG whenever
    no other box is in front of it there."""
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points

    checked = 0
    for sample in nusc.sample[:4]:
        for cam in CAMERAS:
            # every box, also those with no corner inside the image (a trailer passing by): they occlude too
            path, boxes, K = nusc.get_sample_data(sample["data"][cam], box_vis_level=BoxVisibility.NONE)
            img = cv2.imread(path)
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            centres = [view_points(b.center[:, None], K, normalize=True)[:2, 0] for b in boxes]
            hulls = [view_points(b.corners(), K, normalize=True)[:2] for b in boxes]
            for b, c in zip(boxes, centres):
                u, v = int(c[0]), int(c[1])
                if b.center[2] < 1 or not (2 <= u < img.shape[1] - 2 and 2 <= v < img.shape[0] - 2):
                    continue
                # a nearer box covers the centre if its projected corners enclose it; one reaching behind the
                # camera has no meaningful projection, so it might cover anything
                hidden = any(o is not b and 0 < o.corners()[2].max() and o.corners()[2].min() < b.center[2] and (
                    o.corners()[2].min() < 0.5 or (h[0].min() - 3 <= c[0] <= h[0].max() + 3
                                                   and h[1].min() - 3 <= c[1] <= h[1].max() + 3))
                    for o, h in zip(boxes, hulls))
                if hidden or np.ptp(view_points(b.corners(), K, normalize=True)[0]) < 12:
                    continue
                label = CLASSES.index(category_to_detection_name(b.name))
                expected = synthetic.SPECS[CLASSES[label]].hue
                h, s, _ = hsv[v, u].astype(int)
                assert s > 80 and min(abs(h - expected), 180 - abs(h - expected)) <= 6, (cam, b.name, h, s)
                checked += 1
    assert checked >= 10


def test_rig_uses_real_calibration(nusc):
    """Camera axes point where the nuScenes rig's do, intrinsics scaled to the image size."""
    sds = [nusc.get("sample_data", nusc.sample[0]["data"][c]) for c in CAMERAS]
    cs = {c: nusc.get("calibrated_sensor", sd["calibrated_sensor_token"]) for c, sd in zip(CAMERAS, sds)}
    front = transform_matrix(cs["CAM_FRONT"]["translation"], cs["CAM_FRONT"]["rotation"])
    # optical axis of CAM_FRONT points along ego +x, CAM_BACK along -x
    assert transform_points(np.array([[0.0, 0.0, 10.0]]), front)[0, 0] > 8
    back = transform_matrix(cs["CAM_BACK"]["translation"], cs["CAM_BACK"]["rotation"])
    assert transform_points(np.array([[0.0, 0.0, 10.0]]), back)[0, 0] < -8
    assert np.isclose(cs["CAM_FRONT"]["camera_intrinsic"][0][0], 1266.417203046554 * 480 / 1600)


def test_deterministic_scene_layout():
    a = make_scene(np.random.default_rng([3, 1]), 5.0)
    b = make_scene(np.random.default_rng([3, 1]), 5.0)
    assert a[0] == b[0] and len(a[1]) == len(b[1])
    assert all(ta.x0 == tb.x0 and ta.label == tb.label for ta, tb in zip(a[1], b[1]))


@pytest.mark.parametrize("kwargs", [{"train_scenes": 9}, {"samples_per_scene": 1}, {"image_size": (8, 8)}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(Bev3dError):
        synthetic.write_synthetic_nuscenes(tmp_path, **kwargs)


def test_cli_rejects_bad_size(tmp_path, capsys):
    from bev3d.cli import main as cli_main

    assert cli_main(["synth", "--out", str(tmp_path), "--image-size", "big"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_rig_stamp_names_sets_an_older_rig_wrote(synth_root, tmp_path):
    stamp = json.loads((Path(synth_root) / synthetic.RIG_STAMP).read_text())
    assert stamp["rig_version"] == synthetic.RIG_VERSION and synthetic.stale_rig_version(synth_root) is None
    (tmp_path / synthetic.RIG_STAMP).write_text(json.dumps({"rig_version": synthetic.RIG_VERSION - 1}))
    assert synthetic.stale_rig_version(tmp_path) == synthetic.RIG_VERSION - 1
    assert synthetic.stale_rig_version(tmp_path / "real_nuscenes_without_stamp") is None


def _digests(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def test_random_styles_are_seeded(tmp_path):
    """The same seeds write the same bytes; another style seed changes the images, not the data's structure."""
    kwargs = {"seed": 2, "train_scenes": 2, "val_scenes": 0, "samples_per_scene": 2, "workers": 1}
    a = _digests(synthetic.write_synthetic_nuscenes(tmp_path / "a", style_seed=5, **kwargs))
    b = _digests(synthetic.write_synthetic_nuscenes(tmp_path / "b", style_seed=5, **kwargs))
    c = _digests(synthetic.write_synthetic_nuscenes(tmp_path / "c", style_seed=6, **kwargs))
    assert a == b
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) == 2 * 2 * len(CAMERAS) and all(a[k] != c.get(k) for k in jpgs)
    styles = json.loads((tmp_path / "a" / synthetic.STYLE_FILE).read_text())
    looks = {tuple(v["bgr"]) for v in styles["instances"].values()}
    assert styles["style"] == "random" and len(styles["scenes"]) == 2 and len(looks) > len(CLASSES)


def test_fixed_style_writes_the_original_rig(tmp_path):
    """`style="fixed"` reproduces the rig as version 3 wrote it (tests/data/synth_fixed: two of its images and
    every annotation, written before the styles existed)."""
    golden = Path(__file__).parent / "data" / "synth_fixed"
    root = synthetic.write_synthetic_nuscenes(tmp_path, seed=0, train_scenes=2, val_scenes=1, samples_per_scene=3,
                                              image_size=(480, 270), style="fixed", workers=1)
    anns = json.loads((root / "v1.0-mini" / "sample_annotation.json").read_text())
    expected = json.loads((golden / "annotations.json").read_text())
    assert [a["token"] for a in anns] == [e["token"] for e in expected]
    for a, e in zip(anns, expected):
        assert np.allclose(a["translation"], e["translation"], atol=1e-5)
        assert np.allclose(a["size"], e["size"], atol=1e-5) and a["num_lidar_pts"] == e["num_lidar_pts"]
    for cam, stamp in (("CAM_FRONT", 1532402900012000), ("CAM_BACK", 1532402900037000)):
        img = cv2.imread(str(root / f"samples/{cam}/synth-0-scene-0061__{cam}__{stamp}.jpg")).astype(int)
        ref = cv2.imread(str(golden / f"{cam}.jpg")).astype(int)
        assert img.shape == ref.shape and (np.abs(img - ref) > 8).mean() < 0.002, cam


def test_random_style_sizes_and_calibration(random_synth_root):
    """Each random-style scene has its own image size; the devkit reads the intrinsics scaled to it."""
    nusc = NuScenes(version="v1.0-mini", dataroot=str(random_synth_root), verbose=False)
    styles = json.loads((Path(random_synth_root) / synthetic.STYLE_FILE).read_text())
    for scene in nusc.scene:
        width, height = styles["scenes"][scene["name"]]["image_size"]
        sample = nusc.get("sample", scene["first_sample_token"])
        sd = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
        K = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
        assert (sd["width"], sd["height"]) == (width, height)
        assert cv2.imread(str(Path(random_synth_root) / sd["filename"])).shape[:2] == (height, width)
        assert np.isclose(K[0, 0], 1266.417203046554 * width / 1600)


def test_cli_rejects_unknown_style(tmp_path, capsys):
    from bev3d.cli import main as cli_main

    assert cli_main(["synth", "--out", str(tmp_path), "--style", "cartoon"]) == 2
    assert "--style" in capsys.readouterr().err and not any(tmp_path.iterdir())
    with pytest.raises(Bev3dError, match="--style"):
        synthetic.write_synthetic_nuscenes(tmp_path, style="cartoon")
