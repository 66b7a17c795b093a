"""Pictures of dataset samples: read a sample of a nuScenes-format dataset (and optionally its
predictions from a results file) and write the 3D, camera and BEV pictures, or a scene video."""

import os
import time

import cv2
import numpy as np

from bev3d.errors import Bev3dError
from bev3d.vis.bev import render_bev
from bev3d.vis.cameras import render_cameras
from bev3d.vis.results import detections_to_lidar, load_results, sample_detections
from bev3d.vis.scene3d import build_scene, default_views, display_available, render_frames, show_scene_3d

# Splits of each version, the validation split first: an --index counts in it.
SPLITS = {
    "v1.0-mini": ("mini_val", "mini_train"),
    "v1.0-trainval": ("val", "train"),
    "v1.0-test": ("test",),
}
VIDEO_FPS = 2  # nuScenes key frames are 2 Hz


class SampleSource:
    """A dataset version's samples by split, with the LiDAR file of each sample."""

    def __init__(self, data_root, version):
        from bev3d.data.nuscenes_dataset import NuScenesDataset

        if version not in SPLITS:
            raise Bev3dError(f"Unknown --version {version!r}; use one of {', '.join(SPLITS)}.")
        self.data_root, self.version = data_root, version
        self._make = NuScenesDataset
        self._datasets, self._tokens = {}, {}

    def dataset(self, split):
        if split not in self._datasets:
            self._datasets[split] = self._make(self.data_root, self.version, split)
        return self._datasets[split]

    def tokens(self, split):
        """Sample tokens of a split in dataset order; none for a split without scenes in this dataset
        (a synthetic set may have validation scenes only), other errors go up from the first split."""
        if split not in self._tokens:
            try:
                ds = self.dataset(split)
            except Bev3dError:
                if split == SPLITS[self.version][0]:
                    raise
                ds = []
            self._tokens[split] = [ds.get_info(i)["sample_token"] for i in range(len(ds))]
        return self._tokens[split]

    def all_tokens(self):
        return {t for split in SPLITS[self.version] for t in self.tokens(split)}

    def find(self, index_or_token):
        """(split, index) of a sample given its index in the validation split or its token."""
        if isinstance(index_or_token, (int, np.integer)):
            split = SPLITS[self.version][0]
            n = len(self.dataset(split))
            if not 0 <= index_or_token < n:
                raise Bev3dError(f"--index {index_or_token} is out of range: {split} of {self.data_root} "
                                 f"has {n} samples (0..{n - 1}).")
            return split, int(index_or_token)
        for split in SPLITS[self.version]:
            tokens = self.tokens(split)
            if index_or_token in tokens:
                return split, tokens.index(index_or_token)
        raise Bev3dError(f"Sample token {index_or_token!r} is in no split of {self.version} under "
                         f"{self.data_root}. List tokens with nuscenes.NuScenes(...).sample.")

    def scene(self, name):
        """(split, [indices in scene order]) of the samples of scene `name`."""
        nusc = self.nusc()
        scene = next((s for s in nusc.scene if s["name"] == name), None)
        if scene is None:
            names = ", ".join(s["name"] for s in nusc.scene[:12])
            raise Bev3dError(f"Scene {name!r} is not in {self.version} under {self.data_root}; scenes: {names}.")
        chain, token = [], scene["first_sample_token"]
        while token:
            chain.append(token)
            token = nusc.get("sample", token)["next"]
        split, _ = self.find(chain[0])
        tokens = self.tokens(split)
        return split, [tokens.index(t) for t in chain if t in tokens]

    def nusc(self):
        """The devkit's NuScenes object of this version."""
        return self.dataset(SPLITS[self.version][0]).nusc

    def load(self, split, index):
        """The info dict of a sample, with `images` (6 RGB arrays) and `points` (P, 5) added."""
        info = dict(self.dataset(split).get_info(index))
        info["images"] = [_read_rgb(p) for p in info["image_paths"]]
        lidar = info["lidar_path"]
        info["points"] = np.fromfile(lidar, dtype=np.float32).reshape(-1, 5) if os.path.isfile(lidar) else None
        return info


def boxes_to_draw(info, results, results_path, score_thr):
    """Keyword arguments of the render functions: the sample's ground truth and, from a loaded
    results mapping (or None), its predictions in the LiDAR frame."""
    boxes = dict(gt_boxes=info["gt_boxes"], gt_labels=info["gt_labels"], score_thr=score_thr)
    if results is not None:
        dets = sample_detections(results, info["sample_token"], results_path)
        pred_boxes, pred_scores, pred_labels = detections_to_lidar(
            dets, info["lidar2ego"], info["ego2global"], results_path)
        boxes.update(pred_boxes=pred_boxes, pred_labels=pred_labels, pred_scores=pred_scores)
    return boxes


def scene_of(info, boxes):
    """The sample's 3D scene (bev3d.vis.scene3d.build_scene) with its points and camera frusta."""
    h, w = info["images"][0].shape[:2]
    return build_scene(points=info["points"], lidar2img=info["lidar2img"], image_size=(w, h),
                       lidar2ego=info["lidar2ego"], **boxes)


def render_sample(data_root, version, index_or_token, results=None, out_dir="vis", score_thr=0.3, show=False):
    """Write the pictures of one sample and return {name: png path}.

    index_or_token: an int counts in the validation split (mini_val for v1.0-mini), a str is a
    sample token of any split. results: path of a nuScenes results JSON (predictions), or None.
    Pictures: "cameras" (mosaic), "bev" (matplotlib top view), "birdseye" and "chase" (Open3D);
    the Open3D ones are skipped with a printed apt line when its system libraries are missing.
    show: open an Open3D window instead of the two Open3D PNGs when a display exists.
    """
    from bev3d.sysdeps import open3d_missing

    src = SampleSource(data_root, version)
    split, index = src.find(index_or_token)
    loaded = load_results(results, src.all_tokens()) if results else None
    info = src.load(split, index)
    boxes = boxes_to_draw(info, loaded, results, score_thr)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, info["sample_token"])
    paths = {}

    t = time.perf_counter()
    _save(f"{stem}_cameras.png", render_cameras(info["images"], info["lidar2img"], **boxes), paths, "cameras", t)
    t = time.perf_counter()
    bev = render_bev(points=info["points"], lidar2ego=info["lidar2ego"], **boxes)
    _save(f"{stem}_bev.png", bev, paths, "bev", t)

    scene = scene_of(info, boxes)
    views = default_views(info["lidar2ego"])
    if show and display_available():
        show_scene_3d(scene, views["chase"])
        return paths
    if show:
        print(f"[vis] --show: no display here (DISPLAY and WAYLAND_DISPLAY are unset), so no window opens; "
              f"the pictures are in {os.path.abspath(out_dir)}")
    missing, apt_line = open3d_missing()
    if missing:
        print(f"[vis] skipped the Open3D pictures: missing system libraries {' '.join(missing)}; run: {apt_line}")
        return paths
    t = time.perf_counter()
    images = render_frames([{"scene": scene, "views": views}])[0]
    print(f"[vis] Open3D: {len(images)} views in {time.perf_counter() - t:.2f} s (with the renderer's start)")
    for name, img in images.items():
        _save(f"{stem}_{name}.png", img, paths, name)
    return paths


def render_scene_video(data_root, version, scene_name, results=None, out_dir="vis", score_thr=0.3):
    """Render every sample of a scene (mosaic, BEV, chase view) into `out_dir/<scene>.mp4`
    (a GIF where OpenCV has no MP4 writer). Returns the video's path."""
    from bev3d.sysdeps import open3d_missing

    src = SampleSource(data_root, version)
    split, indices = src.scene(scene_name)
    loaded = load_results(results, src.all_tokens()) if results else None
    mosaics, bevs, frames = [], [], []
    for index in indices:
        info = src.load(split, index)
        boxes = boxes_to_draw(info, loaded, results, score_thr)
        mosaics.append(render_cameras(info["images"], info["lidar2img"], tile_width=480, **boxes))
        bevs.append(render_bev(points=info["points"], lidar2ego=info["lidar2ego"], size_px=540, **boxes))
        chase = default_views(info["lidar2ego"], 720, 540)["chase"]
        frames.append({"scene": scene_of(info, boxes), "views": {"chase": chase}})
        print(f"[vis] {scene_name}: sample {len(mosaics)}/{len(indices)}")
    missing, apt_line = open3d_missing()
    if missing:
        print(f"[vis] video without the Open3D chase view: missing {' '.join(missing)}; run: {apt_line}")
        chase = [np.zeros((540, 720, 3), np.uint8) for _ in frames]
    else:
        chase = [images["chase"] for images in render_frames(frames)]

    video = [_video_frame(m, b, c) for m, b, c in zip(mosaics, bevs, chase)]
    os.makedirs(out_dir, exist_ok=True)
    return write_video(video, os.path.join(out_dir, scene_name))


def write_video(frames, stem, fps=VIDEO_FPS):
    """RGB frames -> `stem.mp4` (OpenCV mp4v), or `stem.gif` where that writer cannot open."""
    h, w = frames[0].shape[:2]
    path = stem + ".mp4"
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if writer.isOpened():
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))
        writer.release()
        return path
    from PIL import Image

    path = stem + ".gif"
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def _video_frame(mosaic, bev, chase):
    """Mosaic on top, BEV and chase view below, padded to the mosaic's width."""
    bottom = np.concatenate([bev, chase], axis=1)
    width = max(mosaic.shape[1], bottom.shape[1])
    rows = [np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0))) for img in (mosaic, bottom)]
    return np.concatenate(rows, axis=0)


def _read_rgb(path):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise Bev3dError(f"Cannot read image {path}; is the dataset complete?")
    return img[..., ::-1]


def _save(path, rgb, paths, name, t0=None):
    cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1]))
    paths[name] = path
    took = f" ({time.perf_counter() - t0:.2f} s)" if t0 is not None else ""
    print(f"[vis] {name}: {path}{took}")
