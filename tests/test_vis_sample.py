"""bev3d vis on a tiny synthetic nuScenes set (the real devkit reads it)."""

import json
import os

import cv2
import numpy as np
import pytest

from bev3d.cli import main as cli_main
from bev3d.data.nuscenes_dataset import NuScenesDataset, boxes_to_nuscenes
from bev3d.data.synthetic import MINI_VAL, write_synthetic_nuscenes
from bev3d.errors import Bev3dError
from bev3d.sysdeps import open3d_missing
from bev3d.vis import render_sample, render_scene_video
from bev3d.vis.results import detections_to_lidar

MISSING, APT_LINE = open3d_missing()
needs_open3d = pytest.mark.skipif(
    bool(MISSING), reason=f"Open3D headless rendering needs system libraries; run: {APT_LINE}"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("vis_synth")
    write_synthetic_nuscenes(out, train_scenes=0, val_scenes=1, samples_per_scene=2, image_size=(320, 180),
                             workers=1)
    return str(out)


def write_results(root, path, extra_token=None):
    """The ground truth of every mini_val sample as a results file (score 0.9)."""
    ds = NuScenesDataset(root, "v1.0-mini", "mini_val")
    results = {}
    for i in range(len(ds)):
        info = ds.get_info(i)
        n = len(info["gt_boxes"])
        results[info["sample_token"]] = boxes_to_nuscenes(info["gt_boxes"], np.full(n, 0.9), info["gt_labels"], info)
    if extra_token:
        results[extra_token] = []
    with open(path, "w") as f:
        json.dump({"meta": {"use_camera": True}, "results": results}, f)
    return ds


def test_results_round_trip_to_the_lidar_frame(root, tmp_path):
    path = tmp_path / "results.json"
    ds = write_results(root, path)
    info = ds.get_info(1)
    dets = json.loads(path.read_text())["results"][info["sample_token"]]
    boxes, scores, labels = detections_to_lidar(dets, info["lidar2ego"], info["ego2global"])
    np.testing.assert_allclose(boxes[:, :7], info["gt_boxes"][:, :7], atol=1e-6)
    np.testing.assert_array_equal(labels, info["gt_labels"])


@needs_open3d
def test_render_sample_writes_every_picture(root, tmp_path):
    results = tmp_path / "results.json"
    ds = write_results(root, results)
    token = ds.get_info(0)["sample_token"]
    paths = render_sample(root, "v1.0-mini", token, results=str(results), out_dir=str(tmp_path / "vis"))
    assert set(paths) == {"cameras", "bev", "birdseye", "chase"}
    sizes = {name: cv2.imread(p).shape for name, p in paths.items()}
    assert sizes["cameras"] == (2 * 360, 3 * 640, 3)
    assert sizes["birdseye"] == sizes["chase"] == (720, 960, 3)


def test_unknown_sample_token_in_results_is_an_error_naming_it(root, tmp_path, capsys):
    results = tmp_path / "results.json"
    write_results(root, results, extra_token="feedfacefeedface")
    with pytest.raises(Bev3dError, match="feedfacefeedface"):
        render_sample(root, "v1.0-mini", 0, results=str(results), out_dir=str(tmp_path / "vis"))
    code = cli_main(["vis", "--data-root", root, "--index", "0", "--results", str(results), "--out", str(tmp_path)])
    assert code == 2
    assert "feedfacefeedface" in capsys.readouterr().err


@needs_open3d
def test_scene_video_has_a_frame_per_sample(root, tmp_path):
    path = render_scene_video(root, "v1.0-mini", MINI_VAL[0], out_dir=str(tmp_path))
    assert os.path.isfile(path)
    if path.endswith(".mp4"):
        cap = cv2.VideoCapture(path)
        frames = 0
        while cap.read()[0]:
            frames += 1
        assert frames == 2
