"""tools/error_breakdown.py on detections made from the ground truth by a hand-set offset from each box."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from error_breakdown import error_breakdown  # noqa: E402

from bev3d.errors import Bev3dError  # noqa: E402
from bev3d.evaluation.nuscenes_eval import load_nuscenes, split_sample_tokens, write_results  # noqa: E402


def shifted_results(root, path, radial, across):
    """Every annotated box of mini_val as a detection, moved `radial` metres away from the ego along the line of
    sight (the sample's LIDAR_TOP ego pose) and `across` metres to its left; or no detections with radial None."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    nusc = load_nuscenes(root, "v1.0-mini")
    results = {}
    for token in split_sample_tokens(nusc, "mini_val"):
        sample = nusc.get("sample", token)
        ego = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        boxes = []
        for ann in (nusc.get("sample_annotation", a) for a in sample["anns"]):
            name = category_to_detection_name(ann["category_name"])
            if name is None or radial is None:
                continue
            centre = np.array(ann["translation"][:2])
            u = centre - np.array(ego["translation"][:2])
            u /= np.linalg.norm(u)
            moved = centre + radial * u + across * np.array([-u[1], u[0]])
            attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
            boxes.append({"sample_token": token, "translation": [*moved.tolist(), ann["translation"][2]],
                          "size": ann["size"], "rotation": ann["rotation"], "velocity": [0.0, 0.0],
                          "detection_name": name, "detection_score": 0.9, "attribute_name": attrs[0] if attrs else ""})
        results[token] = boxes
    return write_results(path, results)


def test_radial_and_across_offsets_are_recovered(synth_root, tmp_path):
    path = shifted_results(synth_root, tmp_path / "r.json", radial=0.8, across=0.3)
    figures = error_breakdown(path, synth_root, "v1.0-mini", "mini_val")
    assert {"car", "pedestrian"} <= set(figures)
    for f in figures.values():
        assert f["matched"] > 0
        assert f["radial_mean"] == pytest.approx(0.8, abs=1e-3) and f["radial_median"] == pytest.approx(0.8, abs=1e-3)
        assert f["tangential_abs_mean"] == pytest.approx(0.3, abs=1e-3)
        assert f["end_on"] + f["side_on"] <= f["matched"]
    # nearer than 20 m and farther both carry the same offset where present
    assert all(v is None or v == pytest.approx(0.8, abs=1e-3)
               for f in figures.values() for v in (f["radial_mean_near"], f["radial_mean_far"]))


def test_detections_beyond_the_match_radius_and_empty_results_match_nothing(synth_root, tmp_path):
    far = shifted_results(synth_root, tmp_path / "far.json", radial=2.5, across=0.0)
    assert error_breakdown(far, synth_root, "v1.0-mini", "mini_val") == {}
    assert error_breakdown(far, synth_root, "v1.0-mini", "mini_val", max_dist=3.0)["car"]["radial_mean"] == \
        pytest.approx(2.5, abs=1e-3)
    empty = shifted_results(synth_root, tmp_path / "empty.json", radial=None, across=0.0)
    assert error_breakdown(empty, synth_root, "v1.0-mini", "mini_val") == {}


def test_a_missing_results_file_names_it(synth_root, tmp_path):
    with pytest.raises(Bev3dError, match="nope.json"):
        error_breakdown(tmp_path / "nope.json", synth_root, "v1.0-mini", "mini_val")
