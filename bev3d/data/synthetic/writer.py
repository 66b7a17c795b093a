"""The writer: scenes -> the 13 nuScenes v1.0-mini tables, the six images and the LiDAR sweep of every key
frame (rendered by worker processes), the rig stamp, the style file, and `bev3d synth`.

Objects are drawn at their key-frame (annotation) pose, each camera from its own ego pose at its own
timestamp, so the devkit's projection of an annotation lands on the drawn object in every camera.
"""

import hashlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from bev3d.constants import CAMERAS, CLASSES
from bev3d.data.synthetic.classes import ATTRIBUTES, CATEGORIES, SPECS, VISIBILITY
from bev3d.data.synthetic.lidar import cast_lidar, points_in_boxes
from bev3d.data.synthetic.render import ground_image, render_camera, statics
from bev3d.data.synthetic.rig import CAM_OFFSETS_US, LIDAR_RIG, RIG, scaled_intrinsics
from bev3d.data.synthetic.scene import ANNOTATION_RADIUS, RENDER_RADIUS, make_scene
from bev3d.data.synthetic.style import STYLES, apply_response, camera_response, object_look, scene_style
from bev3d.errors import Bev3dError
from bev3d.geometry import transform_matrix, transform_points, yaw_to_quaternion

VERSION = "v1.0-mini"
# The devkit hard-codes the split scene names (nuscenes/utils/splits.py).
MINI_TRAIN = ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077", "scene-1094",
              "scene-1100")
MINI_VAL = ("scene-0103", "scene-0916")
# Bump when what the rig writes changes: `bev3d demo` then rewrites a set an older rig wrote.
RIG_VERSION = 4  # 4: random styles by default; 3: 80 samples per scene by default (was 40)
RIG_STAMP = "synthetic_rig.json"  # in the dataset root, next to the tables' folder
# also in the root: each scene's style and each annotated instance's colour and pattern (for checks and debugging)
STYLE_FILE = "synthetic_style.json"
SAMPLE_PERIOD_US = 500_000  # key frames at 2 Hz
# Twice a real nuScenes scene (40 s instead of 20 s): more distinct views for the demo's tiny PETR in the same
# number of steps (docs/datasets.md).
SAMPLES_PER_SCENE = 80


def _token(*parts):
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def _render_sample(job):
    """Write the six images and the LiDAR sweep of one key frame; returns lidar point counts per annotation."""
    cv2.setNumThreads(1)
    root = Path(job["root"])
    boxes, labels, style = job["boxes"], job["labels"], job["style"]
    for cam in job["cams"]:
        img = ground_image(cam["channel"], style.image_size, cam["s_ego"], style)
        render_camera(img, boxes, job["looks"], cam["global2cam"], cam["K"], style)
        img = apply_response(img, cam["response"])
        cv2.imwrite(str(root / cam["filename"]), img, [cv2.IMWRITE_JPEG_QUALITY, cam["response"]["quality"]])
    lidar2global = job["lidar2global"]
    cloud = cast_lidar(boxes, labels, lidar2global)
    cloud.tofile(root / job["lidar_filename"])
    pts_global = transform_points(cloud[:, :3].astype(np.float64), lidar2global)
    ann = job["annotated"]
    return points_in_boxes(pts_global, boxes[ann]).tolist()


def _pose_record(token, timestamp, ego_xy, heading):
    return {"token": token, "timestamp": int(timestamp), "rotation": yaw_to_quaternion(heading).tolist(),
            "translation": [float(ego_xy[0]), float(ego_xy[1]), 0.0]}


def _link(records):
    for prev, nxt in zip(records[:-1], records[1:]):
        prev["next"], nxt["prev"] = nxt["token"], prev["token"]


def write_synthetic_nuscenes(out_dir, seed=0, train_scenes=8, val_scenes=2, samples_per_scene=SAMPLES_PER_SCENE,
                             image_size=None, style="random", style_seed=0, workers=None, verbose=False):
    """Write the synthetic rig as a nuScenes v1.0-mini dataset under out_dir; returns the root Path.

    The default 8 + 2 scenes of 80 samples (40 s at 2 Hz) give 640 training and 160 validation samples
    with ~10-20 evaluated objects each. `seed` draws the scenes' layout, `style_seed` their looks ("random":
    one style per scene; "fixed": the rig's original look); `image_size` (W, H) overrides the styles' sizes
    (fixed: 1600x900).
    """
    if style not in STYLES:
        raise Bev3dError(f"--style must be one of {', '.join(STYLES)}; got {style!r}.")
    if not 0 <= train_scenes <= len(MINI_TRAIN) or not 0 <= val_scenes <= len(MINI_VAL):
        raise Bev3dError(f"--train-scenes must be 0..{len(MINI_TRAIN)} and val scenes "
                         f"0..{len(MINI_VAL)} (the devkit's mini_train/mini_val scene names); got "
                         f"{train_scenes} and {val_scenes}.")
    if train_scenes + val_scenes == 0:
        raise Bev3dError("Asked for zero scenes; use --train-scenes 1 or more.")
    if samples_per_scene < 2:
        raise Bev3dError(f"--samples-per-scene must be >= 2 (velocities need two key frames); "
                         f"got {samples_per_scene}.")
    if image_size is not None:
        image_size = tuple(int(v) for v in image_size)
        if min(image_size) < 32:
            raise Bev3dError(f"--image-size {image_size[0]}x{image_size[1]} is too small; use e.g. 1600x900.")
    root = Path(out_dir)
    for sub in (VERSION, "samples", "maps", ".bev3d_cache"):
        shutil.rmtree(root / sub, ignore_errors=True)
    for channel in CAMERAS + ("LIDAR_TOP",):
        (root / "samples" / channel).mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    (root / VERSION).mkdir(parents=True, exist_ok=True)

    tables = {name: [] for name in ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log",
                                    "map", "sample", "sample_annotation", "sample_data", "scene", "sensor",
                                    "visibility")}
    tables["attribute"] = [{"token": _token("attribute", a), "name": a, "description": a} for a in ATTRIBUTES]
    tables["category"] = [{"token": _token("category", c), "name": c, "description": c, "index": i}
                          for i, c in enumerate(CATEGORIES)]
    tables["visibility"] = [{"token": t, "level": level, "description": f"visibility of whole object is {level}"}
                            for t, level in VISIBILITY]
    attr_token = {a["name"]: a["token"] for a in tables["attribute"]}
    cat_token = {c["name"]: c["token"] for c in tables["category"]}
    tables["sensor"] = [{"token": _token("sensor", channel), "channel": channel,
                         "modality": "lidar" if channel == "LIDAR_TOP" else "camera"}
                        for channel in CAMERAS + ("LIDAR_TOP",)]
    calib_by_size = {}

    def calibration(width, height):
        """The calibrated_sensor rows of the rig for images of this size (one set per image size)."""
        if (width, height) not in calib_by_size:
            calib = calib_by_size[width, height] = {}
            for sensor in tables["sensor"]:
                channel = sensor["channel"]
                lidar = channel == "LIDAR_TOP"
                translation, rotation = LIDAR_RIG if lidar else RIG[channel][:2]
                K = [] if lidar else scaled_intrinsics(channel, (width, height)).tolist()
                calib[channel] = {"token": _token("calib", channel, width, height), "sensor_token": sensor["token"],
                                  "translation": list(translation), "rotation": list(rotation),
                                  "camera_intrinsic": K}
                tables["calibrated_sensor"].append(calib[channel])
        return calib_by_size[width, height]

    map_token = _token("map", seed)
    mask_name = f"maps/{map_token}.png"
    cv2.imwrite(str(root / mask_name), np.full((64, 64), 255, np.uint8))
    tables["map"].append({"token": map_token, "log_tokens": [], "category": "semantic_prior",
                          "filename": mask_name})

    names = MINI_TRAIN[:train_scenes] + MINI_VAL[:val_scenes]
    jobs, ann_rows = [], []
    styles = {"style": style, "style_seed": style_seed, "scenes": {}, "instances": {}}
    lidar2ego = transform_matrix(*LIDAR_RIG)
    for scene_idx, name in enumerate(names):
        rng = np.random.default_rng([seed, scene_idx])
        look = scene_style(style, style_seed, scene_idx, image_size)
        styles["scenes"][name] = look.to_json()
        width, height = look.image_size
        calib = calibration(width, height)
        duration = (samples_per_scene - 1) * SAMPLE_PERIOD_US * 1e-6
        v_ego, tracks = make_scene(rng, duration + 0.1, look)
        # looks and camera responses have random streams of their own: the layout stream draws what rig version 3
        # drew (the fixed style's layout is that version's)
        look_rng = np.random.default_rng([0x100C5, style_seed, scene_idx])
        track_looks = [object_look(look, look_rng, tr.label) for tr in tracks]
        heading = float(rng.uniform(-math.pi, math.pi))
        origin = rng.uniform(300.0, 1700.0, 2)
        road2global = transform_matrix([origin[0], origin[1], 0.0], yaw_to_quaternion(heading))
        road_dir = road2global[:2, 0]
        log = {"token": _token("log", seed, name), "logfile": f"synth-{seed}-{name}", "vehicle": "n015",
               "date_captured": "2018-07-24", "location": "singapore-onenorth"}
        tables["log"].append(log)
        tables["map"][0]["log_tokens"].append(log["token"])
        t0 = 1_532_402_900_000_000 + scene_idx * 100_000_000

        # which tracks are annotated when: within ANNOTATION_RADIUS, and at least twice (velocities)
        times = np.arange(samples_per_scene) * SAMPLE_PERIOD_US * 1e-6
        pos = np.array([[tr.position(t) for t in times] for tr in tracks])  # (T, S, 3) road frame
        dist = np.hypot(pos[..., 0] - v_ego * times[None], pos[..., 1])
        annotated = dist <= ANNOTATION_RADIUS
        annotated &= annotated.sum(1, keepdims=True) >= 2
        rendered = dist <= RENDER_RADIUS

        instances = []
        for k, tr in enumerate(tracks):
            if annotated[k].any():
                spec = SPECS[CLASSES[tr.label]]
                instances.append({"token": _token("instance", seed, name, k),
                                  "category_token": cat_token[spec.category],
                                  "nbr_annotations": int(annotated[k].sum()), "_track": k})
                bgr, pattern = track_looks[k]
                styles["instances"][instances[-1]["token"]] = {"bgr": bgr.tolist(), "pattern": list(pattern)}
        inst_by_track = {inst["_track"]: inst for inst in instances}
        samples, scene_anns = [], {k: [] for k in inst_by_track}
        sd_by_channel = {ch: [] for ch in calib}
        for i, t in enumerate(times):
            ts = t0 + i * SAMPLE_PERIOD_US
            sample = {"token": _token("sample", seed, name, i), "timestamp": ts, "prev": "", "next": "",
                      "scene_token": _token("scene", seed, name)}
            samples.append(sample)
            # global boxes of every rendered track at the key-frame time
            idx = np.flatnonzero(rendered[:, i])
            boxes = np.zeros((len(idx), 7))
            for r, k in enumerate(idx):
                tr = tracks[k]
                centre = road2global[:3, :3] @ pos[k, i] + road2global[:3, 3]
                boxes[r] = [*centre, *tr.size, heading + tr.yaw]
            labels = np.array([tracks[k].label for k in idx], dtype=np.int64)
            ann_local = [r for r, k in enumerate(idx) if annotated[k, i]]
            for r in ann_local:
                k = idx[r]
                tr = tracks[k]
                vel = road_dir * tr.speed
                row = {"token": _token("ann", seed, name, k, i), "sample_token": sample["token"],
                       "instance_token": inst_by_track[k]["token"], "visibility_token": "4",
                       "attribute_tokens": [attr_token[tr.attribute]] if tr.attribute else [],
                       "translation": boxes[r, :3].tolist(), "size": tr.size.tolist(),
                       "rotation": yaw_to_quaternion(boxes[r, 6]).tolist(), "prev": "", "next": "",
                       "num_lidar_pts": 0, "num_radar_pts": 0, "_velocity": vel}
                scene_anns[k].append(row)
                ann_rows.append(row)
            job = {"root": str(root), "style": look, "boxes": boxes, "labels": labels,
                   "looks": [track_looks[k] for k in idx],
                   "annotated": np.array(ann_local, dtype=np.int64), "cams": [],
                   "ann_rows": [len(ann_rows) - len(ann_local) + j for j in range(len(ann_local))]}
            for channel in ("LIDAR_TOP",) + CAMERAS:
                sd_ts = ts + CAM_OFFSETS_US.get(channel, 0)
                s_ego = v_ego * (sd_ts - t0) * 1e-6
                ego_xy = origin + road_dir * s_ego
                pose = _pose_record(_token("pose", seed, name, i, channel), sd_ts, ego_xy, heading)
                tables["ego_pose"].append(pose)
                ext = "pcd.bin" if channel == "LIDAR_TOP" else "jpg"
                filename = f"samples/{channel}/{log['logfile']}__{channel}__{sd_ts}.{ext}"
                sd = {"token": _token("sd", seed, name, i, channel), "sample_token": sample["token"],
                      "ego_pose_token": pose["token"], "calibrated_sensor_token": calib[channel]["token"],
                      "timestamp": sd_ts, "fileformat": "pcd" if channel == "LIDAR_TOP" else "jpg",
                      "is_key_frame": True, "height": 0 if channel == "LIDAR_TOP" else height,
                      "width": 0 if channel == "LIDAR_TOP" else width, "filename": filename, "prev": "",
                      "next": ""}
                sd_by_channel[channel].append(sd)
                ego2global = transform_matrix(pose["translation"], pose["rotation"])
                if channel == "LIDAR_TOP":
                    job["lidar2global"] = ego2global @ lidar2ego
                    job["lidar_filename"] = filename
                else:
                    cam2ego = transform_matrix(calib[channel]["translation"], calib[channel]["rotation"])
                    response_rng = np.random.default_rng([0xCA3E7A, style_seed, scene_idx, i, CAMERAS.index(channel)])
                    job["cams"].append({"channel": channel, "filename": filename, "s_ego": s_ego,
                                        "global2cam": np.linalg.inv(ego2global @ cam2ego),
                                        "K": np.array(calib[channel]["camera_intrinsic"]),
                                        "response": camera_response(look, response_rng)})
            jobs.append(job)
        _link(samples)
        for records in sd_by_channel.values():
            _link(records)
            tables["sample_data"] += records
        for k, rows in scene_anns.items():
            _link(rows)
            inst = inst_by_track[k]
            inst["first_annotation_token"], inst["last_annotation_token"] = rows[0]["token"], rows[-1]["token"]
        tables["instance"] += [{key: v for key, v in inst.items() if key != "_track"} for inst in instances]
        tables["sample"] += samples
        tables["scene"].append({"token": samples[0]["scene_token"], "log_token": log["token"],
                                "nbr_samples": len(samples), "first_sample_token": samples[0]["token"],
                                "last_sample_token": samples[-1]["token"], "name": name,
                                "description": f"synthetic road, ego {v_ego:.1f} m/s, seed {seed}"})

    n_workers = workers or min(2, os.cpu_count() or 1)
    start = time.time()
    for size in calib_by_size:  # computed once here, inherited by the forked workers
        for channel in CAMERAS:
            statics(channel, size)
    if n_workers > 1:
        pool = multiprocessing.get_context("fork").Pool(n_workers)
        try:
            counts = pool.map(_render_sample, jobs, chunksize=1)
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    else:
        counts = [_render_sample(job) for job in jobs]
    for job, job_counts in zip(jobs, counts):
        for row_index, n in zip(job["ann_rows"], job_counts):
            ann_rows[row_index]["num_lidar_pts"] = int(n)
            # visibility from the LiDAR: an object no ray reaches counts as hidden
            ann_rows[row_index]["visibility_token"] = "4" if n > 0 else "1"
    tables["sample_annotation"] = [{k: v for k, v in row.items() if not k.startswith("_")} for row in ann_rows]
    for name, rows in tables.items():
        (root / VERSION / f"{name}.json").write_text(json.dumps(rows))
    (root / STYLE_FILE).write_text(json.dumps(styles))
    (root / RIG_STAMP).write_text(json.dumps({"rig_version": RIG_VERSION, "seed": seed, "style": style,
                                              "style_seed": style_seed, "image_sizes": sorted(calib_by_size)}))
    if verbose:
        cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        sizes = ", ".join(f"{w}x{h}" for w, h in sorted(calib_by_size))
        print(f"rendered {len(jobs)} samples x 6 cameras ({style} style, {sizes}) in {time.time() - start:.1f} s "
              f"({n_workers} workers, {cpu:.0f} CPU-s in all); {len(ann_rows)} annotations")
    return root


def stale_rig_version(root):
    """The rig version that wrote the synthetic set at `root` when it is older than RIG_VERSION, else None
    (also for a dataset that bev3d's rig did not write)."""
    try:
        version = json.loads((Path(root) / RIG_STAMP).read_text())["rig_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if version != RIG_VERSION else None


def main(args):
    if getattr(args, "kind", "nuscenes") == "shapes2d":
        from bev3d.data import shapes2d

        return shapes2d.main(args)
    start = time.time()
    root = write_synthetic_nuscenes(
        args.out,
        seed=args.seed,
        train_scenes=8 if args.train_scenes is None else args.train_scenes,
        samples_per_scene=SAMPLES_PER_SCENE if args.samples_per_scene is None else args.samples_per_scene,
        image_size=args.image_size,
        style=args.style,
        style_seed=args.style_seed,
        verbose=True,
    )
    print(f"wrote synthetic nuScenes {VERSION} to {root} in {time.time() - start:.1f} s")
    return 0
