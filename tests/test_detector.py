"""Every shipped config builds; the tiny detectors run forward+backward on synthetic data, follow the
model contract and do not depend on the camera order."""

from pathlib import Path

import pytest
import torch

from bev3d.config import load_config
from bev3d.data import build_dataset, collate
from bev3d.models import build_model
from bev3d.models.detector import MultiViewDetector

CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith("_"))
TINY = ["petr_tiny_synth.yaml", "detr3d_tiny_synth.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_builds(name):
    cfg = load_config(name)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    if cfg.model.type in ("petr", "detr3d"):
        assert isinstance(model, MultiViewDetector)


def _tiny(name, synth_root, *overrides):
    cfg = load_config(name, [f"data.root={synth_root}", *overrides])
    dataset = build_dataset(cfg, "train")
    batch = collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    return cfg, build_model(cfg), batch


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_and_output_contract(name, synth_root):
    cfg, model, batch = _tiny(name, synth_root)
    model.train()
    losses = model(batch)
    L = cfg.model.head.num_decoder_layers
    expected = {"loss_cls", "loss_bbox"} | {f"d{i}.loss_{k}" for i in range(L - 1) for k in ("cls", "bbox")}
    if getattr(cfg.model.head, "denoising_groups", 0):
        expected |= {"dn.loss_cls", "dn.loss_bbox"}
        expected |= {f"d{i}.dn.loss_{k}" for i in range(L - 1) for k in ("cls", "bbox")}
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head_grads = [p.grad for p in model.head.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert model.backbone.conv1.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        results = model(batch)
    assert len(results) == 2
    for r in results:
        K = len(r["scores"])
        assert 0 < K <= cfg.model.max_detections
        assert r["boxes"].shape == (K, 9) and r["boxes"].dtype == torch.float32
        assert r["labels"].shape == (K,) and r["labels"].dtype == torch.int64
        assert (r["labels"] >= 0).all() and (r["labels"] < 10).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()  # sorted by score
        assert (r["boxes"][:, 3:6] > 0).all()


@pytest.mark.parametrize("name", TINY)
def test_camera_permutation_invariance(name, synth_root):
    """Permuting the cameras together with their lidar2img leaves the predictions unchanged."""
    _, model, batch = _tiny(name, synth_root)
    model.eval()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])

    def predict(img, lidar2img):
        img_shape = torch.tensor(batch["img_shape"])
        with torch.no_grad():
            return model.head(model.extract_feats(img), lidar2img, img_shape, tuple(img.shape[-2:]))

    cls_a, box_a = predict(batch["img"], batch["lidar2img"])
    cls_b, box_b = predict(batch["img"][:, perm], batch["lidar2img"][:, perm])
    torch.testing.assert_close(cls_b, cls_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(box_b, box_a, atol=1e-5, rtol=1e-5)
    # A broken correspondence (cameras permuted, matrices not) must change the outputs.
    cls_c, _ = predict(batch["img"][:, perm], batch["lidar2img"])
    assert (cls_c - cls_a).abs().max() > 1e-3
