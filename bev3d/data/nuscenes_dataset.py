"""nuScenes (real or synthetic) read through the devkit, with an index cache for fast restarts.

`NuScenesDataset.get_info(i)` is the public per-sample record (numpy, float64, before augmentation);
`ds[i]` runs the pipeline on it. `boxes_to_nuscenes` maps LiDAR-frame boxes back to devkit results.
"""

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bev3d.constants import CAMERAS, CLASSES
from bev3d.errors import Bev3dError
from bev3d.geometry import intrinsics_4x4, matrix_to_quaternion, matrix_yaw, quaternion_to_matrix, rotation_z, \
    transform_matrix

log = logging.getLogger(__name__)

TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")
_CACHE_FORMAT = 2  # 2: scene_token, prev_token (temporal models)
# Speed above which a box is "moving" when choosing its attribute (mmdet3d / PETR use 0.2 m/s).
MOVING_SPEED = 0.2


def valid_splits(version):
    """Split names the devkit accepts for a version (nuscenes/utils/splits.py and load_gt)."""
    if version.endswith("mini"):
        return ["mini_train", "mini_val"]
    if version.endswith("trainval"):
        return ["train", "val", "train_detect", "train_track"]
    if version.endswith("test"):
        return ["test"]
    return []


def check_data_root(data_root, version):
    """Raise a Bev3dError naming what is missing under data_root, with the fix."""
    root = Path(data_root)
    hint = (f"Point data.root (or --data-root) at a nuScenes folder, or write the synthetic rig with "
            f"`bev3d synth --out {root}`.")
    if not root.is_dir():
        raise Bev3dError(f"nuScenes data root {root} does not exist. {hint}")
    table_dir = root / version
    if not table_dir.is_dir():
        found = sorted(p.name for p in root.glob("v1.0-*") if p.is_dir())
        raise Bev3dError(f"nuScenes version folder {table_dir} does not exist (found: {', '.join(found) or 'none'}). "
                         f"Set data.version to the folder name. {hint}")
    for table in TABLES:
        if not (table_dir / f"{table}.json").is_file():
            raise Bev3dError(f"nuScenes table {table_dir / (table + '.json')} is missing; all 13 tables are needed. "
                             f"{hint}")


def _cache_key(root, version, split):
    stats = [(t, os.stat(root / version / f"{t}.json").st_size, os.stat(root / version / f"{t}.json").st_mtime_ns)
             for t in TABLES]
    text = json.dumps([_CACHE_FORMAT, str(root.resolve()), version, split, stats])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _cache_path(root, version, split, key):
    """The index cache lives beside the data when writable, else in ~/.cache/bev3d."""
    name = f"index_{version}_{split}_{key}.npz"
    for base in (root / ".bev3d_cache", Path.home() / ".cache" / "bev3d"):
        try:
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base / name
        except OSError:
            continue
    return None


def _lidar_frame_boxes(nusc, ann_tokens, global2lidar):
    """Annotations -> (N, 9) boxes `x y z w l h yaw vx vy` in the key-frame LiDAR frame."""
    boxes = np.zeros((len(ann_tokens), 9))
    rot = global2lidar[:3, :3]
    for n, token in enumerate(ann_tokens):
        ann = nusc.get("sample_annotation", token)
        centre = rot @ np.array(ann["translation"]) + global2lidar[:3, 3]
        yaw = matrix_yaw(rot @ quaternion_to_matrix(ann["rotation"]))
        velocity = rot @ np.nan_to_num(nusc.box_velocity(token), nan=0.0)
        w, l, h = ann["size"]
        boxes[n] = [*centre, w, l, h, yaw, velocity[0], velocity[1]]
    return boxes


def _build_index(nusc, split):
    """One record per sample of the split, as stacked arrays (the cache layout)."""
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import points_in_box
    from nuscenes.utils.splits import create_splits_scenes

    scenes = set(create_splits_scenes()[split])
    samples = [s for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in scenes]
    out = {k: [] for k in ("sample_token", "scene_token", "prev_token", "timestamp", "image_paths", "lidar_path", "cam_intrinsics", "lidar2cam",
                           "lidar2ego", "ego2global", "gt_boxes", "gt_labels", "gt_count", "ann_tokens",
                           "image_hw")}
    for sample in samples:
        lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        lidar_cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
        lidar_pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
        lidar2ego = transform_matrix(lidar_cs["translation"], lidar_cs["rotation"])
        ego2global = transform_matrix(lidar_pose["translation"], lidar_pose["rotation"])
        lidar2global = ego2global @ lidar2ego
        global2lidar = transform_matrix(lidar_cs["translation"], lidar_cs["rotation"], inverse=True) @ \
            transform_matrix(lidar_pose["translation"], lidar_pose["rotation"], inverse=True)
        paths, intrinsics, lidar2cam, sizes = [], [], [], []
        for cam in CAMERAS:
            sd = nusc.get("sample_data", sample["data"][cam])
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            # LiDAR -> ego(t_lidar) -> global -> ego(t_cam) -> camera
            global2cam = transform_matrix(cs["translation"], cs["rotation"], inverse=True) @ transform_matrix(
                pose["translation"], pose["rotation"], inverse=True)
            lidar2cam.append(global2cam @ lidar2global)
            intrinsics.append(np.array(cs["camera_intrinsic"], dtype=np.float64))
            paths.append(sd["filename"])
            sizes.append((sd["height"], sd["width"]))
        # GT filtered like the devkit's evaluation: no LiDAR/radar points, bicycles in racks
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        racks = [Box(a["translation"], a["size"], _pyquaternion(a["rotation"])) for a in anns
                 if a["category_name"] == "static_object.bicycle_rack"]
        keep, labels = [], []
        for ann in anns:
            name = category_to_detection_name(ann["category_name"])
            if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue
            if name in ("bicycle", "motorcycle") and any(
                    points_in_box(rack, np.array(ann["translation"])[:, None]).any() for rack in racks):
                continue
            keep.append(ann["token"])
            labels.append(CLASSES.index(name))
        out["sample_token"].append(sample["token"])
        out["scene_token"].append(sample["scene_token"])
        out["prev_token"].append(sample["prev"])  # "" at a scene's first sample
        out["timestamp"].append(sample["timestamp"])
        out["image_paths"].append(paths)
        out["image_hw"].append(sizes)
        out["lidar_path"].append(lidar_sd["filename"])
        out["cam_intrinsics"].append(intrinsics)
        out["lidar2cam"].append(lidar2cam)
        out["lidar2ego"].append(lidar2ego)
        out["ego2global"].append(ego2global)
        out["gt_boxes"].append(_lidar_frame_boxes(nusc, keep, global2lidar))
        out["gt_labels"].append(np.array(labels, dtype=np.int64))
        out["gt_count"].append(len(keep))
        out["ann_tokens"] += keep
    arrays = {k: np.asarray(v) for k, v in out.items() if k not in ("gt_boxes", "gt_labels")}
    arrays["gt_boxes"] = np.concatenate(out["gt_boxes"]) if samples else np.zeros((0, 9))
    arrays["gt_labels"] = np.concatenate(out["gt_labels"]) if samples else np.zeros(0, np.int64)
    arrays["ann_tokens"] = np.asarray(out["ann_tokens"], dtype=str)
    return arrays


def _pyquaternion(q):
    from pyquaternion import Quaternion

    return Quaternion(q)


class BadSampleError(Exception):
    """A sample whose files cannot be read (raised by the pipeline, handled by NuScenesDataset)."""


class NuScenesDataset(torch.utils.data.Dataset):
    """Samples of one split of a nuScenes version (real or `bev3d synth`), in the LiDAR frame.

    data_root: folder holding `<version>/` tables and `samples/`; split: a devkit split name
    (`mini_train`, `mini_val`, `train`, `val`, ...); pipeline: callable on the info dict (see
    bev3d.data.transforms), or None for `ds[i] == get_info(i)`.
    """

    def __init__(self, data_root, version="v1.0-mini", split="mini_train", pipeline=None, skip_bad_samples=False,
                 use_cache=True):
        self.root = Path(data_root)
        self.version, self.split = version, split
        self.pipeline = pipeline
        self.skip_bad_samples = skip_bad_samples
        self.skipped = set()
        if split not in valid_splits(version):
            valid = valid_splits(version)
            raise Bev3dError(f"Split {split!r} does not belong to nuScenes version {version!r}; valid splits for "
                             f"{version}: {', '.join(valid) or 'none (unknown version)'}. Set data.train_split / "
                             f"data.val_split (or data.version) to match.")
        check_data_root(self.root, version)
        key = _cache_key(self.root, version, split)
        path = _cache_path(self.root, version, split, key) if use_cache else None
        self.from_cache = path is not None and path.is_file()
        if self.from_cache:
            with np.load(path, allow_pickle=False) as data:
                self._index = {k: data[k] for k in data.files}
        else:
            self._index = _build_index(self.nusc, split)
            self._nusc = None  # the devkit's tables are large (GBs for trainval): reload on demand only
            if path is not None:
                _atomic_savez(path, self._index)
        self._offsets = np.concatenate([[0], np.cumsum(self._index["gt_count"])]).astype(np.int64)
        if len(self) == 0:
            raise Bev3dError(f"Split {split} of {self.root / version} has no samples: the scene table holds none of "
                             f"the split's scene names (nuscenes/utils/splits.py).")

    @property
    def nusc(self):
        """The devkit's NuScenes object, loaded on first use (the index cache avoids it)."""
        if getattr(self, "_nusc", None) is None:
            from nuscenes import NuScenes

            try:
                self._nusc = NuScenes(version=self.version, dataroot=str(self.root), verbose=False)
            except Exception as e:  # the devkit asserts and raises KeyError/JSON errors on broken tables
                raise Bev3dError(f"The devkit could not load nuScenes {self.version} from {self.root}: "
                                 f"{type(e).__name__}: {e}. Re-download the tables or rewrite the synthetic set "
                                 f"with `bev3d synth --out {self.root}`.") from None
        return self._nusc

    def __len__(self):
        return len(self._index["sample_token"])

    def get_info(self, i):
        """The public per-sample record (docs/datasets.md): numpy arrays, float64, before augmentation."""
        idx = self._index
        lo, hi = self._offsets[i], self._offsets[i + 1]
        K = idx["cam_intrinsics"][i].astype(np.float64)
        lidar2cam = idx["lidar2cam"][i].astype(np.float64)
        lidar2img = np.stack([intrinsics_4x4(k) @ m for k, m in zip(K, lidar2cam)])
        return {
            "sample_token": str(idx["sample_token"][i]),
            "scene_token": str(idx["scene_token"][i]),
            "prev_token": str(idx["prev_token"][i]),  # "" at a scene's first sample
            "timestamp": int(idx["timestamp"][i]),  # microseconds
            "image_paths": [str(self.root / p) for p in idx["image_paths"][i]],
            "lidar_path": str(self.root / str(idx["lidar_path"][i])),
            "cam_intrinsics": K,
            "lidar2cam": lidar2cam,
            "lidar2img": lidar2img,
            "lidar2ego": idx["lidar2ego"][i].astype(np.float64),
            "ego2global": idx["ego2global"][i].astype(np.float64),
            "gt_boxes": idx["gt_boxes"][lo:hi].astype(np.float64),
            "gt_labels": idx["gt_labels"][lo:hi].astype(np.int64),
            "ann_tokens": [str(t) for t in idx["ann_tokens"][lo:hi]],
            "image_hw": idx["image_hw"][i].astype(np.int64),  # (N_cam, 2) stored image height, width
        }

    def __getitem__(self, i):
        if self.pipeline is None:
            return self.get_info(i)
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                return self.pipeline(self.get_info(j))
            except BadSampleError as e:
                if not self.skip_bad_samples:
                    raise Bev3dError(f"{e} Fix or remove the file, or set data.skip_bad_samples: true to skip such "
                                     f"samples.") from None
                self.skipped.add(j)
                log.warning("skipping sample %d (%s); %d sample(s) skipped so far in this process", j, e,
                            len(self.skipped))
        raise Bev3dError(f"Every sample of {self.root} {self.split} failed to load.")


def _atomic_savez(path, arrays):
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- results


def _attribute_name(name, speed):
    """Attribute from class and speed, the rule of mmdet3d / PETR's nuScenes output."""
    if name in ("car", "construction_vehicle", "bus", "truck", "trailer"):
        return "vehicle.moving" if speed > MOVING_SPEED else "vehicle.parked"
    if name in ("bicycle", "motorcycle"):
        return "cycle.with_rider" if speed > MOVING_SPEED else "cycle.without_rider"
    if name == "pedestrian":
        return "pedestrian.moving" if speed > MOVING_SPEED else "pedestrian.standing"
    return ""


def boxes_to_nuscenes(boxes, scores, labels, info):
    """LiDAR-frame boxes (K, 9) `x y z w l h yaw vx vy` -> devkit result dicts in the global frame.

    info: the sample's `get_info` dict (its lidar2ego and ego2global are used).
    """
    boxes = np.asarray(boxes.detach().cpu() if torch.is_tensor(boxes) else boxes, dtype=np.float64).reshape(-1, 9)
    scores = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels.detach().cpu() if torch.is_tensor(labels) else labels).reshape(-1)
    lidar2global = info["ego2global"] @ info["lidar2ego"]
    rot = lidar2global[:3, :3]
    results = []
    for box, score, label in zip(boxes, scores, labels):
        centre = rot @ box[:3] + lidar2global[:3, 3]
        quat = matrix_to_quaternion(rot @ rotation_z(box[6]))
        velocity = rot @ np.array([box[7], box[8], 0.0])
        name = CLASSES[int(label)]
        results.append({
            "sample_token": info["sample_token"],
            "translation": centre.tolist(),
            "size": box[3:6].tolist(),
            "rotation": quat.tolist(),
            "velocity": velocity[:2].tolist(),
            "detection_name": name,
            "detection_score": float(score),
            "attribute_name": _attribute_name(name, math.hypot(box[7], box[8])),
        })
    return results
