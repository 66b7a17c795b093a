"""Overfit: each tiny detector fits two synthetic training samples to mAP >= 0.9.

mAP here is the nuScenes detection AP written out independently of the model and of bev3d.evaluation:
greedy matching by BEV centre distance at 0.5 / 1 / 2 / 4 m, precision envelope sampled at 101
recall points, averaged over thresholds and the classes present. A minimal AdamW loop (not the
engine) on reduced inputs (64x176 images) keeps each test to a few minutes on two CPU cores.
"""

import numpy as np
import pytest
import torch
from overfit import overfit

from bev3d.config import load_config
from bev3d.data import build_dataset, collate
from bev3d.models import build_criterion, build_model, build_postprocess

THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


def center_distance_ap(results, gt_boxes, gt_labels, num_classes=10):
    aps = []
    for c in range(num_classes):
        gts = [g[l == c, :2].double().numpy() for g, l in zip(gt_boxes, gt_labels)]
        n_gt = sum(len(g) for g in gts)
        if n_gt == 0:
            continue
        dets = sorted(((s.item(), i, b[:2].double().numpy()) for i, r in enumerate(results)
                       for b, s in zip(r["boxes"][r["labels"] == c], r["scores"][r["labels"] == c])),
                      key=lambda d: -d[0])
        for thr in THRESHOLDS:
            taken = [np.zeros(len(g), bool) for g in gts]
            tp = np.zeros(len(dets))
            for k, (_, i, xy) in enumerate(dets):
                if len(gts[i]) == 0:
                    continue
                dist = np.where(taken[i], np.inf, np.linalg.norm(gts[i] - xy, axis=1))
                j = int(np.argmin(dist))
                if dist[j] < thr:
                    taken[i][j], tp[k] = True, 1.0
            hits = np.cumsum(tp)
            precision = np.maximum.accumulate((hits / np.arange(1, len(dets) + 1))[::-1])[::-1]
            recall = hits / n_gt
            aps.append(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0
                                for r in np.linspace(0, 1, 101)]))
    return float(np.mean(aps))


def test_center_distance_ap_reference_cases():
    gt = [torch.tensor([[0.0, 0.0] + [0.0] * 7, [10.0, 0.0] + [0.0] * 7])]
    labels = [torch.tensor([1, 1])]
    perfect = [{"boxes": gt[0].clone(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}]
    assert center_distance_ap(perfect, gt, labels) == pytest.approx(1.0)
    # One hit and one miss by 3 m: found at 4 m only, half found at the tighter thresholds.
    shifted = [{"boxes": gt[0] + torch.tensor([0.0, 3.0] + [0.0] * 7) * torch.tensor([[0.0], [1.0]]),
                "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}]
    assert center_distance_ap(shifted, gt, labels) == pytest.approx((3 * 51 / 101 + 1.0) / 4)
    wrong_class = [{**perfect[0], "labels": torch.tensor([2, 2])}]
    assert center_distance_ap(wrong_class, gt, labels) == 0.0


# PETR at 2e-3 stalls: its cross-attention values grow to rms ~80 within 50 steps and, averaged
# near-uniformly over all tokens, wash out every query's identity after layer 0 (loss_cls flat at 1.03).
# At 5e-4 (official PETR: 2e-4) it reached mAP 0.94 at step 100 when measured.
@pytest.mark.slow
@pytest.mark.parametrize("name,lr,max_steps", [
    ("detr3d_tiny_synth", 2e-3, 300),
    ("petr_tiny_synth", 5e-4, 300),
])
def test_tiny_detector_overfits_two_samples(name, lr, max_steps, synth_root):
    cfg = load_config(name, [f"data.root={synth_root}", "data.image_size=[64,176]"])
    dataset = build_dataset(cfg, "train")
    batch = collate([dataset[0], dataset[len(dataset) - 1]])  # one sample of each training scene
    torch.manual_seed(0)
    model, criterion, postprocess = build_model(cfg), build_criterion(cfg), build_postprocess(cfg)
    targets = batch["targets"]

    def score(model):
        return center_distance_ap(postprocess(model(batch), batch), [t["boxes"] for t in targets],
                                  [t["labels"] for t in targets])

    # a tenfold lr drop for the last half: the centres then settle within the 0.5 m threshold
    best, step = overfit(model, criterion, batch, targets, score, lr, max_steps, max_steps // 2, weight_decay=0.01)
    assert best >= 0.9, f"{name}: mAP {best:.3f} after {step} steps"
