"""`bev3d synth --kind shapes2d`: a small COCO-format detection set of rendered shapes.

Layout (the COCO one, so the same loader reads both):
  ROOT/train/000000.png ...          ROOT/annotations/instances_train.json
  ROOT/val/000000.png ...            ROOT/annotations/instances_val.json
Categories 1 rectangle, 2 ellipse, 3 triangle; 1-4 filled shapes per image on a noisy background,
each in a colour far from the background, overlapping earlier shapes by at most 0.3 IoU.
"""

import json
import time
from pathlib import Path

import cv2
import numpy as np

from bev3d.errors import Bev3dError

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]
DEFAULT_SIZE = (128, 128)  # (W, H)


def _iou(a, b):  # xywh
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _draw(img, category, box, colour, rng):
    """Draws one filled shape inside box (x, y, w, h) -> its tight xywh box from the drawn pixels."""
    x, y, w, h = box
    mask = np.zeros(img.shape[:2], np.uint8)
    if category == 1:
        cv2.rectangle(mask, (x, y), (x + w - 1, y + h - 1), 255, -1)
    elif category == 2:
        cv2.ellipse(mask, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, 255, -1)
    else:
        apex = x + int(rng.integers(0, w))
        pts = np.array([[apex, y], [x, y + h - 1], [x + w - 1, y + h - 1]], np.int32)
        cv2.fillPoly(mask, [pts], 255)
    img[mask > 0] = colour
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def render_image(rng, width, height, max_shapes=4):
    """-> (H, W, 3) uint8 BGR image, list of (category_id, [x, y, w, h])."""
    background = rng.integers(0, 256, 3)
    img = np.clip(background + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    shapes = []
    side = min(width, height)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(20):
            w, h = (int(v) for v in rng.uniform(0.15, 0.45, 2) * side)
            box = [int(rng.integers(0, width - w)), int(rng.integers(0, height - h)), w, h]
            if all(_iou(box, b) <= 0.3 for _, b in shapes):
                break
        else:
            continue
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - background).sum() < 200:
            colour = rng.integers(0, 256, 3)
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        shapes.append((category, _draw(img, category, box, colour, rng)))
    return img, shapes


def write_split(root, split, num_images, size, rng):
    width, height = size
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img, shapes = render_image(rng, width, height)
        name = f"{i:06d}.png"
        cv2.imwrite(str(root / split / name), img)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for category, bbox in shapes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))


def write_shapes2d(out, seed=0, num_images=64, size=DEFAULT_SIZE):
    """num_images training images and max(1, num_images // 4) validation images of `size` (W, H)."""
    root = Path(out)
    rng = np.random.default_rng(seed)
    write_split(root, "train", num_images, size, rng)
    write_split(root, "val", max(1, num_images // 4), size, rng)
    return root


def main(args):
    start = time.time()
    num = 64 if getattr(args, "num_images", None) is None else args.num_images
    if num < 1:
        raise Bev3dError(f"--num-images must be at least 1, got {num}.")
    root = write_shapes2d(args.out, seed=args.seed, num_images=num, size=getattr(args, "image_size", None) or DEFAULT_SIZE)
    print(f"wrote shapes2d ({num} train images) to {root} in {time.time() - start:.1f} s")
    return 0
