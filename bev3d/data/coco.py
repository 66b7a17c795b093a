"""COCO-format 2D detection data: dataset, DETR's transforms, collate (the 2D batch contract of bev3d.models.detr).

Layout: ROOT/<split>/<file_name> images and ROOT/annotations/instances_<split>.json.
Labels are COCO category ids as they are (DETR's convention: num_classes = max id + 1).
Boxes travel through the transforms as absolute xyxy and leave as cxcywh normalised by the
transformed, unpadded image size.
"""

import json
import random
from pathlib import Path

import cv2
import numpy as np
import torch

from bev3d.errors import Bev3dError

MEANS = {"torchvision": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "rgb"),
         "caffe": ([103.53, 116.28, 123.675], [1.0, 1.0, 1.0], "bgr")}


def resized_size(h, w, short, max_size=None):
    """(h, w) scaled so the shorter side is `short` and the longer at most `max_size` (DETR's rule)."""
    if max_size is not None:
        lo, hi = min(h, w), max(h, w)
        if hi / lo * short > max_size:
            short = int(round(max_size * lo / hi))
    if h < w:
        return short, int(short * w / h)
    return int(short * h / w), short


class RandomResize:
    def __init__(self, shorts, max_size=None):
        self.shorts, self.max_size = list(shorts), max_size

    def __call__(self, img, boxes):
        h, w = img.shape[:2]
        nh, nw = resized_size(h, w, random.choice(self.shorts), self.max_size)
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        return img, boxes * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, boxes):
        if random.random() >= self.p:
            return img, boxes
        w = img.shape[1]
        return img[:, ::-1].copy(), np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)


class RandomSizeCrop:
    """A random crop with sides in [min_size, max_size]; boxes are clipped, boxes left empty are dropped."""

    def __init__(self, min_size, max_size):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, img, boxes, labels):
        h, w = img.shape[:2]
        ch = random.randint(min(self.min_size, h), min(h, self.max_size))
        cw = random.randint(min(self.min_size, w), min(w, self.max_size))
        y0, x0 = random.randint(0, h - ch), random.randint(0, w - cw)
        boxes = boxes - np.array([x0, y0, x0, y0], np.float32)
        boxes = np.clip(boxes, 0, [cw, ch, cw, ch]).astype(np.float32)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return img[y0:y0 + ch, x0:x0 + cw], boxes[keep], labels[keep]


class CocoTransforms:
    """DETR's pipeline. Train: flip, then either a resize to one of `train_short_sides` or (p=crop_prob) a resize
    to {400, 500, 600} + a 384-600 crop + that resize; eval: one resize to `short_side`. The longer side is
    capped at `max_size`."""

    def __init__(self, train, short_side=800, max_size=1333, train_short_sides=(), flip=False, crop_prob=0.0):
        self.max_size = max_size
        self.train, self.crop_prob = train, crop_prob
        self.resize = RandomResize(train_short_sides if train and train_short_sides else [short_side], max_size)
        self.flip = RandomHorizontalFlip() if train and flip else None
        self.crop_resize = RandomResize([400, 500, 600])
        self.crop = RandomSizeCrop(384, 600)

    def __call__(self, img, boxes, labels):
        if self.flip is not None:
            img, boxes = self.flip(img, boxes)
        if self.train and random.random() < self.crop_prob:
            img, boxes = self.crop_resize(img, boxes)
            img, boxes, labels = self.crop(img, boxes, labels)
        img, boxes = self.resize(img, boxes)
        return img, boxes, labels


def normalize(img_bgr, mode):
    """(H, W, 3) uint8 BGR -> (3, H, W) float32 normalised tensor."""
    if mode not in MEANS:
        raise Bev3dError(f"data.normalize must be one of {sorted(MEANS)}, got {mode!r}.")
    mean, std, order = MEANS[mode]
    img = img_bgr[..., ::-1] if order == "rgb" else img_bgr
    img = img.astype(np.float32) / (255.0 if mode == "torchvision" else 1.0)
    img = (img - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class CocoDetection(torch.utils.data.Dataset):
    """One item: {"img" (3, H, W), "target": {"labels", "boxes" (cxcywh in [0, 1]), "image_id",
    "orig_size" (H0, W0), "size" (H, W)}}. Crowd annotations are left out (COCOeval ignores them)."""

    def __init__(self, root, split, transforms, normalize_mode="torchvision"):
        self.root, self.split = Path(root), split
        ann_file = self.root / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            raise Bev3dError(f"COCO annotation file {ann_file} not found. data.root must hold annotations/"
                             f"instances_<split>.json and <split>/ images (write a toy set with "
                             f"`bev3d synth --kind shapes2d --out DIR`).")
        try:
            coco = json.loads(ann_file.read_text())
            self.images = sorted(coco["images"], key=lambda im: im["id"])
            anns = coco["annotations"]
            self.categories = coco["categories"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise Bev3dError(f"COCO annotation file {ann_file} is not valid COCO JSON ({e}).") from None
        self.ann_file = ann_file
        self.anns = {im["id"]: [] for im in self.images}
        for a in anns:
            if not a.get("iscrowd", 0) and a["image_id"] in self.anns:
                self.anns[a["image_id"]].append(a)
        self.transforms, self.normalize_mode = transforms, normalize_mode

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        info = self.images[index]
        path = self.root / self.split / info["file_name"]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise Bev3dError(f"Cannot read image {path} (listed in {self.ann_file}).")
        h0, w0 = img.shape[:2]
        anns = self.anns[info["id"]]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes = np.clip(boxes, 0, [w0, h0, w0, h0]).astype(np.float32)
        labels = np.array([a["category_id"] for a in anns], np.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        img, boxes, labels = self.transforms(img, boxes[keep], labels[keep])
        h, w = img.shape[:2]
        cxcywh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                           (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], 1)
        target = {"labels": torch.from_numpy(labels), "boxes": torch.from_numpy(cxcywh.astype(np.float32)),
                  "image_id": info["id"], "orig_size": (h0, w0), "size": (h, w)}
        return {"img": normalize(img, self.normalize_mode), "target": target}


def collate(items, pad_divisor=1):
    """Pads images to a common (divisible) size -> {"img" (B, 3, H, W), "mask" (B, H, W) True at padding,
    "targets", "img_shape" [(H, W)], "orig_size" [(H0, W0)], "image_id" [int]}."""
    H = max(it["img"].shape[1] for it in items)
    W = max(it["img"].shape[2] for it in items)
    H, W = (-(-H // pad_divisor) * pad_divisor, -(-W // pad_divisor) * pad_divisor)
    img = items[0]["img"].new_zeros(len(items), 3, H, W)
    mask = torch.ones(len(items), H, W, dtype=torch.bool)
    for i, it in enumerate(items):
        _, h, w = it["img"].shape
        img[i, :, :h, :w] = it["img"]
        mask[i, :h, :w] = False
    targets = [it["target"] for it in items]
    return {"img": img, "mask": mask, "targets": targets, "img_shape": [t["size"] for t in targets],
            "orig_size": [t["orig_size"] for t in targets], "image_id": [t["image_id"] for t in targets]}


def build_coco_dataset(data_cfg, split, train):
    """DataConfig -> CocoDetection for `split` with the train or eval transforms."""
    c = data_cfg.coco
    transforms = CocoTransforms(train, c.short_side, c.max_size, c.train_short_sides, data_cfg.flip, c.crop_prob)
    return CocoDetection(data_cfg.root, split, transforms, data_cfg.normalize)
