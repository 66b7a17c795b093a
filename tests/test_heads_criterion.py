import itertools
import math

import pytest
import torch

from bev3d.models.core import BoxCoder3D, HungarianMatcher, SetCriterion, SetPredictions
from bev3d.models.core.box_coder_3d import encode

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]
WEIGHTS = {"loss_cls": 2.0, "loss_bbox": 0.25}


def _matcher():
    return HungarianMatcher(BoxCoder3D(PC_RANGE), cost_class=2.0, box_costs={"bbox": 0.25})


def _criterion():
    return SetCriterion(10, _matcher(), BoxCoder3D(PC_RANGE), WEIGHTS)


def _targets(boxes, labels):
    return [{"labels": lab, "boxes": b} for b, lab in zip(boxes, labels)]


def _boxes(n, g):
    return torch.cat([torch.randn(n, 3, generator=g) * 10, torch.rand(n, 3, generator=g) * 3 + 0.5,
                      torch.rand(n, 1, generator=g) * 6 - 3, torch.randn(n, 2, generator=g)], 1)


def _focal(p, pos, alpha=0.25, gamma=2.0):
    """Hand-written focal loss of one probability (float64 reference)."""
    return -alpha * (1 - p) ** gamma * math.log(p) if pos else -(1 - alpha) * p ** gamma * math.log(1 - p)


def _pair_cost(logits, code, labels, tcode, q, n):
    """Matching cost of query q and GT n, written without the matcher (float64)."""
    pc = torch.sigmoid(logits[q, labels[n]].double()).item()
    cls = 0.25 * (1 - pc) ** 2 * -math.log(pc + 1e-8) - 0.75 * pc ** 2 * -math.log(1 - pc + 1e-8)
    return 2.0 * cls + 0.25 * (code[q, :8].double() - tcode[n, :8].double()).abs().sum().item()


def _brute_force_cost(*args):
    """Minimum matching cost over every injective map GT -> query."""
    Q, N = len(args[1]), len(args[2])
    return min(sum(_pair_cost(*args, q, n) for n, q in enumerate(rows)) for rows in itertools.permutations(range(Q), N))


def test_matcher_is_optimal_and_handles_empty_gt():
    g = torch.Generator().manual_seed(0)
    matcher = _matcher()
    logits = torch.randn(3, 6, 10, generator=g)
    code = encode(_boxes(18, g)).view(3, 6, 10)
    sizes = [3, 0, 4]
    tcodes = [encode(_boxes(n, g)) for n in sizes]
    labels = [torch.randint(0, 10, (n,), generator=g) for n in sizes]
    indices = matcher(logits, code, labels, tcodes)
    assert len(indices[1][0]) == 0 and len(indices[1][1]) == 0
    for b in (0, 2):
        q, n = indices[b]
        assert sorted(n.tolist()) == list(range(sizes[b])) and len(set(q.tolist())) == sizes[b]
        args = (logits[b], code[b], labels[b], tcodes[b])
        cost = sum(_pair_cost(*args, qi, ni) for qi, ni in zip(q.tolist(), n.tolist()))
        assert cost == pytest.approx(_brute_force_cost(*args), rel=1e-5)


def test_criterion_matches_hand_computed_loss():
    # Two queries, one GT: query 1 is the obvious match (right box, confident class).
    gt = torch.tensor([[1.0, 2.0, 0.5, 2.0, 4.0, 1.5, 0.3, 1.0, -1.0]])
    target = encode(gt)
    code = torch.stack([encode(gt + 5.0)[0], target[0] + 0.1]).view(1, 1, 2, 10)  # (L=1, B=1, Q=2, 10)
    logits = torch.full((1, 1, 2, 10), -3.0)
    logits[0, 0, 1, 4] = 2.0
    crit = _criterion()
    raw = crit(SetPredictions(logits, code), _targets([gt], [torch.tensor([4])]))
    assert set(raw) == {"loss_cls", "loss_bbox", "cardinality_error"}
    losses = crit.weighted(raw)
    assert set(losses) == {"loss_cls", "loss_bbox"}
    assert raw["cardinality_error"].item() == 0.0  # one query above 0.5 for one box
    p_neg, p_pos = 1 / (1 + math.exp(3.0)), 1 / (1 + math.exp(-2.0))
    cls = 19 * _focal(p_neg, False) + _focal(p_pos, True)
    assert losses["loss_cls"].item() == pytest.approx(2.0 * cls, rel=1e-5)
    bbox = 0.1 * (8 * 1.0 + 2 * 0.2)  # |0.1| per dim with code weights [1 x 8, 0.2, 0.2]
    assert losses["loss_bbox"].item() == pytest.approx(0.25 * bbox, rel=1e-5)


def test_aux_keys_normalisation_and_empty_batch():
    g = torch.Generator().manual_seed(1)
    L, B, Q = 3, 2, 8
    logits = torch.randn(L, B, Q, 10, generator=g, requires_grad=True)
    code = encode(_boxes(L * B * Q, g)).view(L, B, Q, 10).requires_grad_()
    crit = _criterion()
    targets = _targets([_boxes(3, g), _boxes(1, g)], [torch.tensor([0, 1, 2]), torch.tensor([9])])
    losses = crit.weighted(crit(SetPredictions(logits, code), targets))
    assert set(losses) == {"loss_cls", "loss_bbox", "d0.loss_cls", "d0.loss_bbox", "d1.loss_cls", "d1.loss_bbox"}
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(code.grad).all()
    # Every layer's loss divides by the same number of GT boxes (4): duplicating the batch keeps the loss.
    twice = crit(SetPredictions(logits.detach().repeat(1, 2, 1, 1), code.detach().repeat(1, 2, 1, 1)),
                 targets + targets)
    for k in losses:
        assert crit.weighted(twice)[k].item() == pytest.approx(losses[k].item(), rel=1e-5)
    empty = crit(SetPredictions(logits, code), _targets([torch.zeros(0, 9)] * 2, [torch.zeros(0, dtype=torch.int64)] * 2))
    assert empty["loss_bbox"].item() == 0.0 and empty["loss_cls"].item() > 0
    # without aux_loss only the last layer is scored
    last_only = SetCriterion(10, _matcher(), BoxCoder3D(PC_RANGE), WEIGHTS, aux_loss=False)
    assert set(last_only(SetPredictions(logits, code), targets)) == {"loss_cls", "loss_bbox", "cardinality_error"}
