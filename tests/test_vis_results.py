import json

import numpy as np
import pytest
from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.utils.data_classes import Box
from pyquaternion import Quaternion

from bev3d.constants import CLASSES
from bev3d.errors import Bev3dError
from bev3d.geometry import transform_matrix
from bev3d.sysdeps import install_command, missing_packages
from bev3d.vis.results import detections_to_lidar, load_results, sample_detections


def detection(token, translation, yaw, name="car", score=0.7, velocity=(1.0, 2.0)):
    return {"sample_token": token, "translation": list(translation), "size": [1.9, 4.6, 1.7],
            "rotation": list(Quaternion(axis=[0, 0, 1], angle=yaw).elements), "velocity": list(velocity),
            "detection_name": name, "detection_score": score, "attribute_name": ""}


def write(tmp_path, results):
    path = tmp_path / "results_nusc.json"
    path.write_text(json.dumps({"meta": {"use_camera": True}, "results": results}))
    return str(path)


def test_unknown_sample_token_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, {"tok_a": [], "tok_from_elsewhere": []})
    with pytest.raises(Bev3dError, match="tok_from_elsewhere"):
        load_results(path, known_tokens={"tok_a", "tok_b"})
    results = load_results(path, known_tokens={"tok_a", "tok_from_elsewhere"})
    with pytest.raises(Bev3dError, match="tok_b"):
        sample_detections(results, "tok_b", path)


def test_bad_results_files_are_errors(tmp_path):
    with pytest.raises(Bev3dError, match="does not exist"):
        load_results(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(Bev3dError, match="not valid JSON"):
        load_results(str(bad))
    with pytest.raises(Bev3dError, match="detection_name"):
        detections_to_lidar([detection("t", [0, 0, 0], 0.0, name="spaceship")], np.eye(4), np.eye(4))


def test_global_detections_match_devkit_box_transforms():
    rng = np.random.default_rng(0)
    lidar2ego = transform_matrix([0.94, 0.0, 1.84], Quaternion(axis=[0, 0, 1], angle=-np.pi / 2).elements)
    ego_q = Quaternion(axis=[0.1, -0.05, 1.0], angle=1.1)
    ego2global = transform_matrix([400.0, 1100.0, 0.5], ego_q.elements)
    dets = [detection("t", rng.uniform(380, 420, 3), rng.uniform(-3, 3), CLASSES[i % 10]) for i in range(4)]
    boxes, scores, labels = detections_to_lidar(dets, lidar2ego, ego2global)

    for det, box, label in zip(dets, boxes, labels):
        # the devkit's way: global -> ego -> LiDAR with Box.translate / Box.rotate
        ref = Box(det["translation"], det["size"], Quaternion(det["rotation"]), velocity=(*det["velocity"], 0.0))
        ref.translate(-np.array(ego2global[:3, 3]))
        ref.rotate(ego_q.inverse)
        ref.translate(-lidar2ego[:3, 3])
        ref.rotate(Quaternion(matrix=lidar2ego[:3, :3]).inverse)
        np.testing.assert_allclose(box[:3], ref.center, atol=1e-9)
        np.testing.assert_allclose(box[3:6], ref.wlh, atol=1e-12)
        assert box[6] == pytest.approx(quaternion_yaw(ref.orientation), abs=1e-9)
        np.testing.assert_allclose(box[7:9], ref.velocity[:2], atol=1e-9)
        assert CLASSES[label] == det["detection_name"]
    np.testing.assert_allclose(scores, [d["detection_score"] for d in dets])


def test_sysdeps_reports_missing_packages_with_the_apt_line():
    assert missing_packages(("bev3d-no-such-package-xyz",)) == ["bev3d-no-such-package-xyz"]
    assert install_command(["libgl1", "libegl1"]) == "sudo apt-get install -y libgl1 libegl1"
