import itertools

import pytest
import torch

from bev3d.models.core import BoxCoder2D, HungarianMatcher, hungarian_assign, sigmoid_focal_loss


def _brute_force(cost):
    """Minimum total cost over every injective map targets -> predictions (Q >= T)."""
    Q, T = cost.shape
    best = min(itertools.permutations(range(Q), T), key=lambda rows: sum(cost[r, c] for c, r in enumerate(rows)))
    return sum(cost[r, c] for c, r in enumerate(best)).item()


def _random_batch(sizes, Q=6, K=5, seed=0):
    """(logits (B, Q, K), boxes (B, Q, 4)) and per-image target labels and boxes."""
    g = torch.Generator().manual_seed(seed)
    outputs = (torch.randn(len(sizes), Q, K, generator=g), torch.rand(len(sizes), Q, 4, generator=g) * 0.5 + 0.1)
    labels = [torch.randint(0, K, (n,), generator=g) for n in sizes]
    boxes = [torch.rand(n, 4, generator=g) * 0.5 + 0.1 for n in sizes]
    return outputs, labels, boxes


def _matcher(class_cost="softmax"):
    return HungarianMatcher(BoxCoder2D(), 1.0, {"bbox": 5.0, "giou": 2.0}, class_cost)


def test_assignment_is_optimal():
    g = torch.Generator().manual_seed(1)
    for T in (1, 3, 5):
        cost = torch.randn(5, T, generator=g)
        ((rows, cols),) = hungarian_assign([cost])
        assert sorted(cols.tolist()) == list(range(T))
        assert cost[rows, cols].sum().item() == pytest.approx(_brute_force(cost))


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
def test_batched_equals_per_image_and_empty_targets(class_cost):
    (logits, boxes), labels, targets = _random_batch([3, 0, 4, 1])
    matcher = _matcher(class_cost)
    batched = matcher(logits, boxes, labels, targets)
    assert len(batched[1][0]) == 0 and len(batched[1][1]) == 0
    for b, (rows, cols) in enumerate(batched):
        ((r1, c1),) = matcher(logits[b:b + 1], boxes[b:b + 1], [labels[b]], [targets[b]])
        assert torch.equal(rows, r1) and torch.equal(cols, c1)
        assert len(rows) == len(labels[b])


def test_matcher_cost_by_hand():
    """Two queries, two targets: the by-hand cheaper pairing (softmax, L1, GIoU) is the one returned."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # query 0 says class 0, query 1 class 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])  # same box: only the class decides
    ((rows, cols),) = _matcher()(logits, boxes, [torch.tensor([1, 0])], [boxes[0, :2]])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}
    # with equal classes the L1 + GIoU cost decides: query 1 sits on target 0
    logits = torch.zeros(1, 2, 3)
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]])
    targets = torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.25, 0.2, 0.1, 0.1]])
    ((rows, cols),) = _matcher()(logits, boxes, [torch.tensor([0, 0])], [targets])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_list_and_batched_forms_agree():
    g = torch.Generator().manual_seed(2)
    costs = [torch.randn(7, n, generator=g) for n in (2, 0, 5)]
    batched = torch.cat([torch.cat([c if i == j else torch.randn(7, c.shape[1]) for j, c in enumerate(costs)], 1)[None]
                         for i in range(3)])
    for (r0, c0), (r1, c1) in zip(hungarian_assign(costs), hungarian_assign(batched, [2, 0, 5])):
        assert torch.equal(r0, r1) and torch.equal(c0, c1)


def test_permuting_targets_permutes_assignment():
    (logits, boxes), labels, targets = _random_batch([5], Q=8)
    matcher = _matcher()
    ((rows, cols),) = matcher(logits, boxes, labels, targets)
    perm = torch.tensor([3, 0, 4, 1, 2])
    ((rows_p, cols_p),) = matcher(logits, boxes, [labels[0][perm]], [targets[0][perm]])
    # Query q was given original target cols[q]; after the permutation that target sits at perm^-1.
    assert dict(zip(rows_p.tolist(), perm[cols_p].tolist())) == dict(zip(rows.tolist(), cols.tolist()))


def test_nonfinite_costs_do_not_crash():
    cost = torch.tensor([[float("nan"), 1.0], [0.0, float("inf")], [2.0, 3.0]])
    ((rows, cols),) = hungarian_assign([cost])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_sigmoid_focal_loss_hand_computed():
    logits = torch.tensor([0.0, 2.0])
    targets = torch.tensor([1.0, 0.0])
    p = torch.sigmoid(torch.tensor(2.0)).item()
    expected = [0.25 * 0.5**2 * -torch.log(torch.tensor(0.5)).item(),
                0.75 * p**2 * -torch.log(torch.tensor(1 - p)).item()]
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), torch.tensor(expected))
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, num_boxes=2.0), torch.tensor(sum(expected) / 2))
