"""PETR's (and StreamPETR's) optional per-camera map supervision (model.head.depth_supervision,
heatmap_supervision): what each camera sees, the targets and losses on hand-computed cases, and the tiny models'
training step."""

import math

import numpy as np
import pytest
import torch

from bev3d.config import load_config
from bev3d.data import build_dataset, collate
from bev3d.errors import Bev3dError
from bev3d.geometry import lid_index
from bev3d.models import build_criterion, build_model
from bev3d.models.core import SetPredictions
from bev3d.models.core.box_coder_mono import BACKGROUND_WEIGHT, FOREGROUND_WEIGHT, heatmap_target, lid_edges
from bev3d.models.core.predictions import CameraMapPredictions

OPTS = ["model.head.depth_supervision=true", "data.image_size=[64,176]"]


def tiny_cfg(root, extra=(), name="petr_tiny_synth"):
    return load_config(name, [f"data.root={root}", *OPTS, *extra])


def test_camera_boxes_are_the_boxes_each_camera_sees(synth_root):
    """Every box whose centre lies in front of a camera and projects into its (augmented) image is in that camera's
    list, at the pixel and depth the item's own lidar2img gives (a plain matrix product here)."""
    cfg = tiny_cfg(synth_root)
    train = build_dataset(cfg, "train")
    for i in (0, 7):
        item = train[i]
        boxes = item["targets"]["boxes"].double().numpy()
        H, W = item["img_shape"]
        assert len(item["targets"]["camera_boxes"]) == len(item["lidar2img"]) == 6
        seen = 0
        for cam, rows in enumerate(item["targets"]["camera_boxes"]):
            labels = item["targets"]["camera_labels"][cam]
            p = np.c_[boxes[:, :3], np.ones(len(boxes))] @ item["lidar2img"][cam].double().numpy().T
            depth = p[:, 2]
            u, v = p[:, 0] / depth, p[:, 1] / depth
            inside = (depth > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
            assert rows.dtype == torch.float32 and rows.shape == (inside.sum(), 11)
            np.testing.assert_allclose(rows[:, 0].numpy() * W, u[inside], atol=2e-3)
            np.testing.assert_allclose(rows[:, 1].numpy() * H, v[inside], atol=2e-3)
            np.testing.assert_allclose(rows[:, 6].numpy(), depth[inside], rtol=1e-6)
            assert labels.tolist() == item["targets"]["labels"][torch.from_numpy(inside)].tolist()
            seen += int(inside.sum())
        assert seen > 0


def test_depth_map_loss_of_uniform_logits_by_hand():
    """Zero logits give every cell p = 1 / (K + 1) of its target bin: the loss is alpha (1 - p)^gamma log(K + 1)
    times the mean cell weight over the valid cells (13 where a box lies, 1 elsewhere). Sample 0, camera 1 sees a
    box over cells x 2..4 (of 8), y 1..2 (of 4); the right half of sample 1's maps is padding."""
    cfg = load_config("petr_tiny_synth", ["model.head.depth_supervision=true"])
    criterion = build_criterion(cfg)
    h = cfg.model.head
    K = h.depth_num
    edges = lid_edges(K, h.depth_start, h.position_range[3])
    box = torch.tensor([[0.4, 0.5, 0.15, 0.25, 0.2, 0.25, 20.0, 1, 1, 1, 0]])  # x 0.25..0.6, y 0.25..0.75
    none = torch.zeros(0, 11)
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 9), "camera_boxes": [none, box]},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 9), "camera_boxes": [none, none]}]
    ratios = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.5, 1.0], [0.5, 1.0]])
    logits = torch.zeros(4, K + 1, 4, 8, requires_grad=True)
    loss = criterion.depth_map_loss(CameraMapPredictions(logits, ratios), criterion.image_boxes(targets))
    p = 1.0 / (K + 1)
    per_cell = 0.25 * (1 - p) ** 2 * math.log(K + 1)
    fg = 3 * 2  # cells x 2, 3, 4 (floor 2.0 .. ceil 4.8) times y 1, 2 (floor 1.0 .. ceil 3.0)
    valid = 32 + 32 + 16 + 16
    expected = per_cell * (FOREGROUND_WEIGHT * fg + BACKGROUND_WEIGHT * (valid - fg)) / valid
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the box's cells pull its depth's bin up, every other cell the background bin
    loss.backward()
    b = int(lid_index(torch.tensor(20.0), K, float(edges[0]), float(edges[-1])).floor())
    assert (logits.grad[1, b, 1:3, 2:5] < 0).all() and (logits.grad[1, K, 1:3, 2:5] > 0).all()
    assert (logits.grad[0, K] < 0).all() and (logits.grad[2, :, :, 4:] == 0).all()


BOX = [0.4, 0.5, 0.15, 0.25, 0.2, 0.25, 20.0, 1, 1, 1, 0]  # centre (3.2, 2.0) cells of a 4 x 8 map, 2.8 x 2 cells


def test_heatmap_target_by_hand():
    """A box of class 2 at (3.2, 2.0) cells, 2.8 x 2.0 cells wide: sigma = max(size / 6, 0.5) = 0.5 on both axes,
    1 at its cell (x 3, y 2), exp(-(dx^2 + dy^2) / (2 * 0.25)) at the others (cell centres at +0.5); nothing in the
    other classes. On a map whose right half is padding the box covers half the cells along x."""
    target = heatmap_target(torch.tensor([BOX]), torch.tensor([2]), 4, (4, 8), (1.0, 1.0))
    assert target.shape == (4, 4, 8) and target[[0, 1, 3]].abs().sum() == 0
    assert target[2, 2, 3] == 1.0 and target.max() == 1.0
    assert target[2, 2, 4].item() == pytest.approx(math.exp(-(1.3 ** 2 + 0.5 ** 2) / 0.5), rel=1e-6)
    assert target[2, 0, 0].item() == pytest.approx(math.exp(-(2.7 ** 2 + 1.5 ** 2) / 0.5), rel=1e-6)
    # two overlapping boxes of one class: the maximum; a second class gets its own channel
    two = heatmap_target(torch.tensor([BOX, BOX, BOX]), torch.tensor([2, 2, 0]), 4, (4, 8), (1.0, 1.0))
    torch.testing.assert_close(two[2], target[2], rtol=0, atol=0)
    torch.testing.assert_close(two[0], target[2], rtol=0, atol=0)
    half = heatmap_target(torch.tensor([BOX]), torch.tensor([2]), 4, (4, 8), (0.5, 1.0))
    assert half[2, 2, 1] == 1.0  # x 0.4 * 4 = 1.6 cells
    assert half[2, 2, 2].item() == pytest.approx(math.exp(-(0.9 ** 2 + 0.5 ** 2) / 0.5), rel=1e-6)


def test_heatmap_loss_of_zero_logits_by_hand():
    """Zero logits: p = 1/2 everywhere, CenterNet's loss is (1 - p)^2 log 2 at the one centre and
    (1 - t)^4 p^2 log 2 at every other valid cell of every class, over one centre; padding cells count nothing."""
    cfg = load_config("petr_tiny_synth", ["model.head.heatmap_supervision=true"])
    criterion = build_criterion(cfg)
    K = cfg.model.head.num_classes
    none = torch.zeros(0, 11)
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 9), "camera_boxes": [none, box],
                "camera_labels": [torch.zeros(0, dtype=torch.long), torch.tensor([2])]}
               for box in [torch.tensor([BOX])]]
    ratios = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    logits = torch.zeros(2, K, 4, 8, requires_grad=True)
    loss = criterion.heatmap_loss(CameraMapPredictions(logits, ratios), criterion.image_boxes(targets),
                                  criterion.image_labels(targets))
    t = heatmap_target(torch.tensor([BOX]), torch.tensor([2]), K, (4, 8), (0.5, 1.0))[:, :, :4]  # valid half
    negatives = 32 * K + ((1 - t) ** 4).sum().item()  # image 0: all 32 cells; image 1: 16 (the centre's is 0)
    expected = math.log(2) * 0.25 * (1 + negatives)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad[1, 2, 2, 1] < 0 and (logits.grad[1, :, :, 4:] == 0).all() and (logits.grad[0] > 0).all()


def test_targets_without_camera_boxes_are_refused():
    cfg = load_config("petr_tiny_synth", ["model.head.depth_supervision=true"])
    criterion = build_criterion(cfg)
    out = SetPredictions(torch.zeros(1, 1, 3, 10), torch.zeros(1, 1, 3, 10),
                         depth_map=CameraMapPredictions(torch.zeros(6, 65, 2, 4), torch.ones(6, 2)))
    with pytest.raises(Bev3dError, match="depth_supervision"):
        criterion(out, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 9)}])


@pytest.mark.parametrize("name", ["petr_tiny_synth", "streampetr_tiny_synth"])
def test_tiny_model_with_camera_maps_trains_and_predicts_as_before(synth_root, name):
    # (the 8 training frames make 2 streams, not the tiny recipe's 16)
    extra = ["train.stream_interleave=1"] if name.startswith("stream") else []
    cfg = tiny_cfg(synth_root, ["model.head.heatmap_supervision=true", *extra], name=name)
    train = build_dataset(cfg, "train")
    if name.startswith("stream"):
        # the streaming sampler reads the wrapped dataset's scenes and times; its first step's two streams
        from bev3d.data.streaming import StreamingDataset
        from bev3d.engine.train import streaming_sampler

        keys = next(iter(streaming_sampler(cfg, train, 1, 0)))
        assert [first for _, first in keys] == [True, True]
        batch = collate([StreamingDataset(train)[k] for k in keys])
    else:
        batch = collate([train[0], train[1]])
    torch.manual_seed(0)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    out = model(batch, batch["targets"])
    assert out.depth_map.logits.shape == (12, cfg.model.head.depth_num + 1, 4, 12)  # stride 16 of 64 x 192 padded
    assert out.heatmap.logits.shape == (12, cfg.model.head.num_classes, 4, 12)
    losses = criterion(out, batch["targets"])
    for term, head in (("loss_depth_map", "depth_head"), ("loss_heatmap", "heatmap_head")):
        assert term in criterion.weighted(losses) and torch.isfinite(losses[term])
        model.zero_grad()
        losses[term].backward(retain_graph=True)
        # each map's term trains its head and, through the features, the backbone; not the decoder
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert grads[f"head.{head}.2.weight"].abs().sum() > 0
        assert grads["backbone.conv1.weight"].abs().sum() > 0
        assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith("head.decoder."))
    # inference does not compute the maps: the same predictions as the model without the options
    plain = build_model(load_config(name, [f"data.root={synth_root}", "data.image_size=[64,176]",
                                           "model.head.depth_supervision=false",
                                           "model.head.heatmap_supervision=false"]))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.depth_head.", "head.heatmap_"))}
    plain.load_state_dict(state)
    model.eval(), plain.eval()
    with torch.no_grad():
        a, b = model(batch), plain(batch)
    assert a.depth_map is None and a.heatmap is None
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=0)


def test_depth_supervision_is_an_option_of_the_petr_heads(synth_root):
    with pytest.raises(Bev3dError, match="depth_supervision"):
        load_config("detr3d_tiny_synth", [f"data.root={synth_root}", "model.head.depth_supervision=true"])
