"""Every shipped config builds and runs one small forward + backward + post-processing on the model contract
(SetPredictions in, loss terms and detections out); the multi-view heads do not depend on the camera order."""

from pathlib import Path

import pytest
import torch

from bev3d.config import load_config
from bev3d.data import build_dataset, collate
from bev3d.models import build_criterion, build_model, build_postprocess
from bev3d.models.core import SetPredictions
from bev3d.models.core.build import build_box_coder
from bev3d.models.registry import MODELS
from bev3d.models.detector import MultiViewDetector

CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith("_"))
TINY = ["petr_tiny_synth.yaml", "detr3d_tiny_synth.yaml", "streampetr_tiny_synth.yaml"]


def _batch_2d():
    """Two images, the second padded, one of them without boxes."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return {"img": torch.randn(2, 3, 64, 96, generator=g), "mask": mask, "targets": targets,
            "img_shape": [(64, 96), (64, 64)], "orig_size": [(128, 192), (64, 64)]}


def _small(name, synth_root, *overrides):
    """A config at CPU-test size and a batch of it: two samples; one for a released 3D config, whose large backbone
    takes most of the suite's time (the tiny configs check the batching)."""
    cfg = load_config(name, [f"data.root={synth_root}", *overrides])
    if cfg.data.type == "coco":
        return cfg, _batch_2d()
    cfg = load_config(name, [f"data.root={synth_root}", "data.version=v1.0-mini", "data.train_split=mini_train",
                             "data.image_size=[64,176]", *overrides])
    dataset = build_dataset(cfg, "train")
    samples = [0, len(dataset) - 1] if "tiny" in name else [0]
    return cfg, collate([dataset[i] for i in samples])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_runs_forward_backward_and_postprocess(name, synth_root):
    cfg, batch = _small(name, synth_root)
    torch.manual_seed(0)
    model, criterion, postprocess = build_model(cfg).train(), build_criterion(cfg), build_postprocess(cfg)
    is_3d = cfg.data.type == "nuscenes"
    mono = MODELS[cfg.model.type].boxes == "mono"  # per camera image: the batch holds two camera items
    assert isinstance(model, MultiViewDetector) == is_3d
    targets = batch["targets"]
    out = model(batch, targets)
    h = cfg.model.head
    # StreamPETR's decoder also runs its memory queries
    L, B, Q = h.num_decoder_layers, len(targets), h.num_queries + getattr(h, "num_propagated", 0)
    K = h.num_classes + (0 if cfg.model.loss.use_focal else 1)
    if getattr(h, "two_stage", False):  # at most one query per position of the small image
        Q = min(Q, out.enc.logits.shape[-2])
    assert isinstance(out, SetPredictions)
    assert out.logits.shape == (L, B, Q, K) and out.boxes.shape == (L, B, Q, build_box_coder(cfg).code_size)
    assert (out.dn is not None) == (cfg.model.denoising.groups > 0)

    losses = criterion(out, targets)
    weighted = criterion.weighted(losses)
    prefixes = [""] + [f"d{i}." for i in range(L - 1)] + (["dn."] if out.dn is not None else [])
    prefixes += [f"d{i}.dn." for i in range(L - 1)] if out.dn is not None else []
    prefixes += ["enc."] if out.enc is not None else []
    terms = ("loss_cls", "loss_bbox") if is_3d else ("loss_cls", "loss_bbox", "loss_giou")
    if mono:
        terms = ("loss_cls", "loss_bbox", "loss_giou", "loss_center", "loss_depth", "loss_dim", "loss_angle")
    maps = {"loss_depth_map"} if mono or getattr(h, "depth_supervision", False) else set()
    maps |= {"loss_heatmap"} if getattr(h, "heatmap_supervision", False) else set()
    assert set(weighted) == {p + t for p in prefixes for t in terms} | maps
    assert set(losses) - set(weighted) == {"cardinality_error"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(weighted.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # every parameter the forward used got a finite gradient, the backbone's first trainable one included
    assert all(p.grad is None or torch.isfinite(p.grad).all() for _, p in trainable)
    assert all(p.grad is not None for n, p in trainable if n.startswith(("head.", "transformer.", "class_embed")))
    backbone = [p for n, p in trainable if n.startswith("backbone.")]
    assert backbone and backbone[-1].grad is not None and backbone[-1].grad.abs().sum() > 0

    model.eval()
    if mono:  # inference reads whole rigs
        batch = collate([build_dataset(cfg, "mini_val")[i] for i in range(B)])
    with torch.no_grad():
        out = model(batch)
        detections = postprocess(out, batch)
    assert out.dn is None  # no targets, no denoising queries
    assert len(detections) == B
    for det in detections:
        n = len(det["scores"])
        assert 0 < n <= cfg.model.max_detections
        assert det["boxes"].shape == (n, 9 if is_3d else 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64 and (det["labels"] >= 0).all()
        assert (det["labels"] < h.num_classes).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # sorted by score
        if is_3d:
            assert (det["boxes"][:, 3:6] > 0).all()
        else:
            assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()


@pytest.mark.parametrize("name", TINY)
def test_camera_permutation_invariance(name, synth_root):
    """Permuting the cameras together with their lidar2img leaves the predictions unchanged."""
    _, batch = _small(name, synth_root)
    torch.manual_seed(0)
    model = build_model(load_config(name)).eval()
    perm = torch.tensor([3, 0, 4, 1, 5, 2])

    def predict(img, lidar2img):
        with torch.no_grad():
            return model({**batch, "img": img, "lidar2img": lidar2img})

    a = predict(batch["img"], batch["lidar2img"])
    b = predict(batch["img"][:, perm], batch["lidar2img"][:, perm])
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.boxes, a.boxes, atol=1e-5, rtol=1e-5)
    # A broken correspondence (cameras permuted, matrices not) must change the outputs.
    c = predict(batch["img"][:, perm], batch["lidar2img"])
    assert (c.logits - a.logits).abs().max() > 1e-3
