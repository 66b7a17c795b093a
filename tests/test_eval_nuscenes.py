"""`bev3d eval` against the devkit itself: GT copied from the tables scores 1.0, a noisy copy scores what a
direct DetectionEval call scores, and the failure modes the devkit handles with a crash get clear answers."""

import json
import shutil

import numpy as np
import pytest

from bev3d.cli import main as cli
from bev3d.errors import Bev3dError
from bev3d.evaluation.nuscenes_eval import RESULTS_META, evaluate_results, load_nuscenes, split_sample_tokens

SPLIT = "mini_val"


def _gt_results(nusc, tokens):
    """The split's annotations as devkit result dicts, read from the tables (independent of bev3d.data)."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    attributes = {a["token"]: a["name"] for a in nusc.attribute}
    results = {}
    for token in tokens:
        boxes = []
        for ann_token in nusc.get("sample", token)["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            name = category_to_detection_name(ann["category_name"])
            if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue  # the devkit drops these GT boxes; a copy would be a false positive
            velocity = nusc.box_velocity(ann_token)[:2]
            boxes.append({
                "sample_token": token,
                "translation": ann["translation"],
                "size": ann["size"],
                "rotation": ann["rotation"],
                "velocity": [0.0, 0.0] if np.isnan(velocity).any() else velocity.tolist(),
                "detection_name": name,
                "detection_score": 1.0,
                "attribute_name": attributes[ann["attribute_tokens"][0]] if ann["attribute_tokens"] else "",
            })
        results[token] = boxes
    return results


def _write(path, results):
    path.write_text(json.dumps({"meta": RESULTS_META, "results": results}))
    return path


@pytest.fixture(scope="module")
def nusc(synth_root):
    return load_nuscenes(synth_root, "v1.0-mini")


@pytest.fixture(scope="module")
def gt(nusc):
    return _gt_results(nusc, split_sample_tokens(nusc, SPLIT))


def test_gt_as_predictions_scores_one(tmp_path, synth_root, gt):
    path = _write(tmp_path / "results.json", gt)
    rc = cli(["eval", "--results", str(path), "--data-root", str(synth_root), "--split", SPLIT,
              "--out", str(tmp_path / "eval")])
    assert rc == 0
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["mean_ap"] == pytest.approx(1.0, abs=1e-9)
    assert summary["nd_score"] == pytest.approx(1.0, abs=1e-9)
    assert not any((tmp_path / "eval" / "plots").iterdir())  # plots only with --plots


def test_noisy_copy_equals_direct_detection_eval(tmp_path, synth_root, nusc, gt):
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    rng = np.random.default_rng(0)
    noisy = {}
    for token, boxes in gt.items():
        kept = [dict(b) for b in boxes if rng.random() > 0.2]
        for b in kept:
            b["translation"] = (np.array(b["translation"]) + rng.normal(0, 0.7, 3)).tolist()
            b["detection_score"] = float(rng.random())
        noisy[token] = kept
    path = _write(tmp_path / "noisy.json", noisy)
    ours = evaluate_results(path, synth_root, "v1.0-mini", SPLIT, tmp_path / "ours", quiet=True)
    direct = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), SPLIT,
                           output_dir=str(tmp_path / "direct"), verbose=False).main(0, render_curves=False)
    assert 0.0 < ours["mean_ap"] < 1.0 and 0.0 < ours["nd_score"] < 1.0
    for key in ("mean_ap", "nd_score", "tp_errors", "mean_dist_aps"):
        assert ours[key] == direct[key], key
    on_disk = json.loads((tmp_path / "ours" / "metrics_summary.json").read_text())
    assert on_disk["nd_score"] == direct["nd_score"]


def test_token_mismatch_names_count_and_example(tmp_path, synth_root, gt):
    tokens = sorted(gt)
    bad = dict(gt)
    del bad[tokens[0]]
    bad["not-a-sample-token"] = []
    path = _write(tmp_path / "bad.json", bad)
    with pytest.raises(Bev3dError) as err:
        evaluate_results(path, synth_root, "v1.0-mini", SPLIT, tmp_path, quiet=True)
    text = str(err.value)
    assert "1 sample token(s) are not in split" in text and "not-a-sample-token" in text
    assert "1 sample(s) of split mini_val are missing" in text and tokens[0] in text
    assert cli(["eval", "--results", str(path), "--data-root", str(synth_root), "--split", SPLIT]) == 2


def test_no_prediction_at_all_scores_zero(tmp_path, synth_root, gt):
    path = _write(tmp_path / "empty.json", {t: [] for t in gt})
    summary = evaluate_results(path, synth_root, "v1.0-mini", SPLIT, tmp_path, quiet=True)
    assert summary["mean_ap"] == 0.0 and summary["nd_score"] == 0.0
    assert (tmp_path / "metrics_summary.json").is_file()


def test_split_without_annotations_scores_zero(tmp_path, synth_root, gt, capsys):
    root = tmp_path / "no_gt"
    shutil.copytree(synth_root / "v1.0-mini", root / "v1.0-mini")
    (root / "maps").symlink_to(synth_root / "maps")
    for table in ("sample_annotation", "instance"):
        (root / "v1.0-mini" / f"{table}.json").write_text("[]")
    path = _write(tmp_path / "gt.json", gt)
    summary = evaluate_results(path, root, "v1.0-mini", SPLIT, tmp_path / "out")
    assert summary["mean_ap"] == 0.0 and summary["nd_score"] == 0.0
    assert "has no annotated box" in capsys.readouterr().out


def test_split_of_other_version_is_refused(tmp_path, synth_root, gt):
    path = _write(tmp_path / "gt.json", gt)
    with pytest.raises(Bev3dError, match="valid splits for this version: mini_train, mini_val"):
        evaluate_results(path, synth_root, "v1.0-mini", "val", tmp_path, quiet=True)
