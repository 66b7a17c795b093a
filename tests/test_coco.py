import json
import random

import numpy as np
import pytest
import torch

from bev3d.cli import main as cli_main
from bev3d.config import load_config
from bev3d.data.coco import CocoDetection, CocoTransforms, RandomHorizontalFlip, RandomSizeCrop, build_coco_dataset, \
    collate, resized_size
from bev3d.errors import Bev3dError
from bev3d.evaluation.coco_eval import CocoEvaluator


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes2d")
    assert cli_main(["synth", "--kind", "shapes2d", "--out", str(root), "--num-images", "6",
                     "--image-size", "96x64"]) == 0
    return root


def test_synth_writes_valid_coco(shapes):
    from pycocotools.coco import COCO

    coco = COCO(str(shapes / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == 6 and len(coco.getCatIds()) == 3
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        assert 0 <= x and x + w <= 96 and 0 <= y and y + h <= 64 and w > 0 and h > 0
    assert (shapes / "val" / "000000.png").is_file()


def test_dataset_item_and_collate(shapes):
    cfg = load_config("deformable_detr_tiny_shapes", [f"data.root={shapes}", "data.coco.short_side=128",
                                                      "data.coco.max_size=192"])
    ds = build_coco_dataset(cfg.data, "train", train=False)  # resizes the 64-px side to 128
    raw = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    item = ds[0]
    assert item["img"].shape == (3, 128, 192)
    x, y, w, h = raw["annotations"][0]["bbox"]  # image 1's first box, in 96x64 pixels
    torch.testing.assert_close(item["target"]["boxes"][0], torch.tensor([(x + w / 2) / 96, (y + h / 2) / 64,
                                                                          w / 96, h / 64]))
    assert item["target"]["orig_size"] == (64, 96) and item["target"]["size"] == (128, 192)
    batch = collate([ds[0], ds[1]], pad_divisor=32)
    assert batch["img"].shape == (2, 3, 128, 192) and not batch["mask"].any()


def test_collate_pads_and_masks():
    items = [{"img": torch.ones(3, 10, 20), "target": {"size": (10, 20), "orig_size": (10, 20), "image_id": 1}},
             {"img": torch.ones(3, 15, 5), "target": {"size": (15, 5), "orig_size": (15, 5), "image_id": 2}}]
    batch = collate(items, pad_divisor=8)
    assert batch["img"].shape == (2, 3, 16, 24)
    assert batch["mask"][0, :10, :20].logical_not().all() and batch["mask"][0, 10:].all()
    assert batch["mask"][1, :15, :5].logical_not().all() and batch["mask"][1, :, 5:].all()
    assert (batch["img"][batch["mask"][:, None].expand(-1, 3, -1, -1)] == 0).all()


def test_transforms_by_hand():
    assert resized_size(480, 640, 800, 1333) == (800, 1066)
    assert resized_size(100, 1000, 800, 1333) == (133, 1330)  # the long side caps the scale (DETR rounds so)
    img = np.zeros((10, 20, 3), np.uint8)
    boxes = np.array([[2.0, 1.0, 5.0, 4.0]], np.float32)
    flipped_img, flipped = RandomHorizontalFlip(p=1.0)(img, boxes)
    np.testing.assert_allclose(flipped, [[15.0, 1.0, 18.0, 4.0]])
    random.seed(0)
    crop_img, cropped, labels = RandomSizeCrop(5, 8)(img, np.array([[0, 0, 20, 10], [0, 0, 0.5, 0.5]], np.float32),
                                                     np.array([1, 2]))
    h, w = crop_img.shape[:2]
    assert labels.tolist() == [1] and np.allclose(cropped, [[0, 0, w, h]])  # the big box fills the crop
    train = CocoTransforms(True, 800, 1333, train_short_sides=[480, 800], flip=True)
    assert train.resize.shorts == [480, 800] and train.resize.max_size == 1333
    assert CocoTransforms(False, 800, 1333, train_short_sides=[480, 800]).resize.shorts == [800]
    assert load_config("detr_r50_coco").data.coco.train_short_sides == list(range(480, 801, 32))  # DETR's scales
    with pytest.raises(Bev3dError, match="data.image_size .* data.coco.short_side"):
        load_config("detr_tiny_shapes", ["data.image_size=[128,128]"])


def test_missing_annotations_is_a_user_error(tmp_path):
    with pytest.raises(Bev3dError, match="instances_train.json"):
        CocoDetection(tmp_path, "train", None)


def test_evaluator_scores_ground_truth_as_perfect(shapes):
    ann_file = shapes / "annotations" / "instances_train.json"
    raw = json.loads(ann_file.read_text())
    by_image = {}
    for a in raw["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], a["category_id"]))
    ev, shifted = CocoEvaluator(ann_file), CocoEvaluator(ann_file)
    for image_id, items in by_image.items():
        boxes = torch.tensor([b for b, _ in items], dtype=torch.float64)
        labels = torch.tensor([c for _, c in items])
        det = {"boxes": boxes, "scores": torch.ones(len(items)), "labels": labels}
        ev.update([image_id], [det])
        # Shift each box by 40% of its width: IoU 0.43 < 0.5, so no match at any COCO threshold.
        off = boxes.clone()
        off[:, 0::2] += 0.4 * (boxes[:, 2] - boxes[:, 0])[:, None]
        shifted.update([image_id], [{**det, "boxes": off}])
    assert ev.summarize()["AP"] == pytest.approx(1.0)
    assert shifted.summarize()["AP"] == pytest.approx(0.0)
