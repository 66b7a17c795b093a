"""tools/bench_heads.py times the shipped tiny configs: its random batch must be one their criterion accepts."""

import importlib.util
from pathlib import Path

import torch

from bev3d.config import load_config
from bev3d.models import build_criterion, build_model

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_heads.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_heads", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_batch_carries_what_each_camera_sees_for_the_camera_map_losses():
    cfg = load_config("petr_tiny_synth")
    assert cfg.model.head.camera_maps()  # the shipped recipe trains the per-camera maps
    batch = _tool().random_batch(cfg, 2, torch.device("cpu"))
    targets = batch["targets"]
    assert all(len(t["camera_boxes"]) == batch["img"].shape[1] for t in targets)
    assert sum(len(b) for t in targets for b in t["camera_boxes"]) > 0
    torch.manual_seed(0)
    model, criterion = build_model(cfg), build_criterion(cfg)
    losses = criterion(model(batch, targets), targets)
    assert {"loss_depth_map", "loss_heatmap"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
