"""Camera-rig data: nuScenes through the devkit, the synthetic rig, the augmentation pipeline; COCO for the
2D models."""

import functools

from bev3d.data.nuscenes_dataset import NuScenesDataset, boxes_to_nuscenes
from bev3d.data.transforms import build_pipeline, collate


def build_dataset(cfg, split):
    """Dataset + pipeline from `cfg.data` for split "train" | "val" or a split name of the config.

    The train pipeline (augmentation, range filter on `cfg.model.pc_range`) is used for "train" and
    `cfg.data.train_split`, seen per camera with `data.train_view: per_camera` (with what each camera sees for
    `model.head.depth_supervision` / `heatmap_supervision`); everything else gets the test pipeline over whole rigs.
    """
    data = cfg.data
    train = split in ("train", data.train_split)
    name = {"train": data.train_split, "val": data.val_split}.get(split, split)
    if data.type == "coco":
        from bev3d.data.coco import build_coco_dataset

        return build_coco_dataset(data, name, train)
    dataset = NuScenesDataset(data.root, data.version, name, skip_bad_samples=data.skip_bad_samples)
    native = tuple(int(v) for v in dataset.get_info(0)["image_hw"][0])
    dataset.pipeline = build_pipeline(data, train, pc_range=cfg.model.pc_range if train else None,
                                      native_size=native)
    if train and data.train_view == "per_camera":
        from bev3d.data.per_camera import PerCameraDataset

        return PerCameraDataset(dataset)
    if train and cfg.model.head.camera_maps():
        from bev3d.data.per_camera import CameraBoxes

        return CameraBoxes(dataset)
    return dataset


def collate_fn_for(cfg):
    """The collate function of `cfg.data.type`: both give a batch with per-sample `targets`."""
    if cfg.data.type == "coco":
        from bev3d.data import coco

        return functools.partial(coco.collate, pad_divisor=cfg.data.pad_divisor)
    return collate


__all__ = ["NuScenesDataset", "boxes_to_nuscenes", "build_dataset", "build_pipeline", "collate", "collate_fn_for"]
