"""Overfit tests: the whole 2D chain (data, matcher, losses, refinement, post-processing, COCOeval) must
learn 4 synthetic images. Deformable DETR (with refinement) must reach AP >= 0.9; DETR, which converges
more slowly, AP >= 0.7; the RoI-based Sparse R-CNN and Dynamic DETR AP >= 0.9 (through RoIAlign too), with the
config's lr divided by 10 after `drop_at` steps (a step schedule, as their papers train): at a constant lr Sparse
R-CNN's boxes keep moving by a few pixels and its AP wanders around 0.85-0.93. Each stops as soon as it reaches
its bar."""

import random

import pytest
import torch

from bev3d.config import load_config
from bev3d.data.coco import build_coco_dataset, collate
from bev3d.data.shapes2d import write_shapes2d
from bev3d.evaluation.coco_eval import CocoEvaluator
from bev3d.models import build_criterion, build_model, build_postprocess


def _overfit(root, name, bar, max_iters, drop_at=None):
    torch.manual_seed(0)
    random.seed(0)
    write_shapes2d(root, seed=0, num_images=4)
    cfg = load_config(name, [f"data.root={root}"])
    ds = build_coco_dataset(cfg.data, "train", train=False)
    batch = collate([ds[i] for i in range(len(ds))], cfg.data.pad_divisor)
    model, criterion, postprocess = build_model(cfg).train(), build_criterion(cfg), build_postprocess(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [drop_at], 0.1) if drop_at else None
    ap = 0.0
    for it in range(1, max_iters + 1):
        losses = criterion.weighted(criterion(model(batch, batch["targets"]), batch["targets"]))
        opt.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        if it % 25 == 0 and it >= 75:
            model.eval()
            with torch.no_grad():
                evaluator = CocoEvaluator(ds.ann_file)
                evaluator.update(batch["image_id"], postprocess(model(batch), batch))
            ap = evaluator.summarize()["AP"]
            model.train()
            if ap >= bar:
                break
    return ap, it


@pytest.fixture
def one_thread():
    # Small matrices: several threads per test worker only contend with each other on a shared CI CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_deformable_detr_refine_overfits(tmp_path, one_thread):
    ap, iters = _overfit(tmp_path, "deformable_detr_tiny_shapes", bar=0.9, max_iters=250)
    assert ap >= 0.9, f"COCO AP {ap:.3f} after {iters} iterations"


@pytest.mark.slow
def test_detr_overfits(tmp_path, one_thread):
    ap, iters = _overfit(tmp_path, "detr_tiny_shapes", bar=0.7, max_iters=250)
    assert ap >= 0.7, f"COCO AP {ap:.3f} after {iters} iterations"


@pytest.mark.slow
def test_sparse_rcnn_overfits(tmp_path, one_thread):
    ap, iters = _overfit(tmp_path, "sparse_rcnn_tiny_shapes", bar=0.9, max_iters=200, drop_at=100)
    assert ap >= 0.9, f"COCO AP {ap:.3f} after {iters} iterations"


@pytest.mark.slow
def test_dynamic_detr_overfits(tmp_path, one_thread):
    ap, iters = _overfit(tmp_path, "dynamic_detr_tiny_shapes", bar=0.9, max_iters=200, drop_at=100)
    assert ap >= 0.9, f"COCO AP {ap:.3f} after {iters} iterations"
