"""Predictions from a nuScenes results file (submission JSON, global frame) as LiDAR-frame boxes."""

import json
import os

import numpy as np

from bev3d.constants import CLASSES
from bev3d.errors import Bev3dError
from bev3d.geometry import matrix_yaw, transform_matrix


def load_results(path, known_tokens=None):
    """Read a results file -> {sample_token: [detection dicts]}.

    known_tokens: the sample tokens of the dataset drawn from; a token of the file that is not
    among them means the file belongs to another dataset or split, and is an error.
    """
    if not os.path.isfile(path):
        raise Bev3dError(f"Results file {path} does not exist. Pass the results_nusc.json that "
                         "`bev3d test` wrote with --results.")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise Bev3dError(f"Results file {path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise Bev3dError(f"Results file {path} has no 'results' mapping; it must be in the nuScenes "
                         "submission format {'meta': {...}, 'results': {sample_token: [...]}}.")
    results = data["results"]
    if known_tokens is not None:
        unknown = [t for t in results if t not in known_tokens]
        if unknown:
            raise Bev3dError(
                f"Results file {path} has sample token {unknown[0]!r} ({len(unknown)} unknown in all), "
                "which is not in the dataset being drawn. Pass the --data-root and --version the "
                "results were computed on."
            )
    return results


def detections_to_lidar(detections, lidar2ego, ego2global, path="results"):
    """nuScenes detections of one sample (global frame) -> boxes (K, 9) LiDAR frame, scores, labels."""
    global2lidar = np.linalg.inv(np.asarray(ego2global) @ np.asarray(lidar2ego))
    boxes, scores, labels = [], [], []
    for det in detections:
        name = det.get("detection_name")
        if name not in CLASSES:
            raise Bev3dError(f"{path}: detection_name {name!r} of sample {det.get('sample_token')!r} is not "
                             f"one of the detection classes {', '.join(CLASSES)}.")
        pose = global2lidar @ transform_matrix(det["translation"], det["rotation"])
        velocity = global2lidar[:3, :3] @ np.array([*det.get("velocity", (0.0, 0.0))[:2], 0.0])
        w, l, h = det["size"]
        boxes.append([*pose[:3, 3], w, l, h, matrix_yaw(pose[:3, :3]), velocity[0], velocity[1]])
        scores.append(float(det["detection_score"]))
        labels.append(CLASSES.index(name))
    return (np.array(boxes, dtype=np.float64).reshape(-1, 9), np.array(scores, dtype=np.float64),
            np.array(labels, dtype=np.int64))


def sample_detections(results, sample_token, path="results"):
    """The detections of one sample; a sample missing from the file is an error naming it."""
    if sample_token not in results:
        raise Bev3dError(f"Results file {path} has no entry for sample {sample_token!r}. Draw a sample of "
                         "the split the results were computed on, or omit --results.")
    return results[sample_token]
