"""Query denoising (the core's mechanism): the noisy ground-truth queries, their attention mask, their loss,
and that they leave the object queries' predictions untouched in every head that uses them."""

import math

import pytest
import torch

from bev3d.config import load_config
from bev3d.data import build_dataset, collate
from bev3d.models import build_criterion, build_model
from bev3d.models.core import (BoxCoder2D, BoxCoder3D, DenoisingPredictions, HungarianMatcher, QueryDenoising,
                               SetCriterion, SetPredictions)
from bev3d.models.core.denoising import POSITIVE_RADIUS

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]


def _targets():
    return [{"boxes": torch.tensor([[10.0, -4.0, 0.5, 2.0, 4.0, 1.5, 0.3, 1.0, 0.0],
                                    [-20.0, 30.0, -1.0, 0.6, 0.8, 1.8, -1.0, 0.0, 0.5]]),
             "labels": torch.tensor([0, 8])},
            {"boxes": torch.tensor([[5.0, 5.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]), "labels": torch.tensor([9])}]


def _denoising(groups, noise, **kw):
    return QueryDenoising(10, BoxCoder3D(PC_RANGE), groups, noise, **kw)


def test_zero_noise_copies_sit_on_their_boxes():
    targets = _targets()
    dn = _denoising(3, 0.0)(targets, num_queries=5, device="cpu")
    assert dn.num_queries == 3 * 2 and dn.reference.shape == (2, 6, 3)
    # slot g * n_max + j is copy g of box j; sample 1 has one box, so its slot j = 1 of each group is padding
    assert dn.valid.tolist() == [[True] * 6, [True, False] * 3]
    lo, size = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:]) - torch.tensor(PC_RANGE[:3])
    for g in range(3):
        for b, j in ((0, 0), (0, 1), (1, 0)):
            assert torch.allclose(dn.reference[b, 2 * g + j], (targets[b]["boxes"][j, :3] - lo) / size)
            assert dn.labels[b, 2 * g + j] == dn.input_labels[b, 2 * g + j] == targets[b]["labels"][j]
            assert torch.equal(dn.targets[b, 2 * g + j], BoxCoder3D(PC_RANGE).encode(targets[b]["boxes"][j:j + 1])[0])
    assert (dn.labels[1, 1::2] == 10).all()  # padding is background


def test_noise_stays_within_the_box_scale_and_far_copies_are_background():
    torch.manual_seed(0)
    box = torch.tensor([[0.0, 0.0, 0.0, 2.0, 4.0, 1.0, 0.0, 0.0, 0.0]])  # w 2, l 4, h 1
    dn = _denoising(400, 1.0)([{"boxes": box, "labels": torch.tensor([3])}], 7, "cpu")
    lo, size = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:]) - torch.tensor(PC_RANGE[:3])
    centres = dn.reference[0] * size + lo  # (400, 3) metres
    unit = centres / torch.tensor([2.0, 1.0, 0.5])  # half extents along x (length), y (width), z (height)
    assert unit.abs().max() <= 1 + 1e-5 and unit.abs().max() > 0.9
    positive = dn.labels[0] == 3
    assert torch.equal(positive, unit.norm(dim=-1) <= POSITIVE_RADIUS)
    assert 0 < positive.sum() < 400 and (dn.labels[0][~positive] == 10).all()


def test_2d_jitter_is_dn_detr_box_noise():
    """DN-DETR: centres move by up to noise * half size, sizes by up to noise * size, then clamp to [0, 1]."""
    torch.manual_seed(1)
    box = torch.tensor([[0.5, 0.4, 0.2, 0.1]])
    dn = QueryDenoising(5, BoxCoder2D(), 300, 0.4, positive_radius=math.inf)([{"boxes": box,
                                                                                 "labels": torch.tensor([2])}], 4, "cpu")
    shift = (dn.reference[0] - box) / torch.tensor([0.1, 0.05, 0.2, 0.1])  # in units of the noise scale
    assert shift.abs().max() <= 0.4 + 1e-5 and shift.abs().max() > 0.38
    assert (dn.labels[0] == 2).all()  # no negatives with an infinite radius


def test_label_noise_flips_about_that_fraction_of_input_labels_only():
    torch.manual_seed(2)
    labels = torch.zeros(50, dtype=torch.long)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).expand(50, 4)
    dn = QueryDenoising(10, BoxCoder2D(), 20, 0.0, label_noise=0.5)([{"boxes": box, "labels": labels}], 4, "cpu")
    changed = (dn.input_labels != 0).float().mean().item()
    assert 0.4 < changed < 0.5  # flipped with p = 0.5 to a uniform class, which is 0 again one time in ten
    assert (dn.labels == 0).all()  # the targets keep the true class


def test_attention_mask_isolates_groups_and_hides_the_ground_truth():
    dn = _denoising(2, 1.0)(_targets(), num_queries=3, device="cpu")
    allowed = dn.attn_mask  # (4 + 3, 4 + 3), True = may attend
    expected = torch.tensor([[1, 1, 0, 0, 1, 1, 1],
                             [1, 1, 0, 0, 1, 1, 1],
                             [0, 0, 1, 1, 1, 1, 1],
                             [0, 0, 1, 1, 1, 1, 1],
                             [0, 0, 0, 0, 1, 1, 1],
                             [0, 0, 0, 0, 1, 1, 1],
                             [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_no_boxes_means_no_denoising_queries():
    empty = [{"boxes": torch.zeros(0, 9), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert _denoising(2, 1.0)(empty, 5, "cpu") is None


@pytest.mark.parametrize("class_loss", ["focal", "softmax"])
def test_denoising_loss_by_hand(class_loss):
    """One positive copy (exact box) and one background copy: the loss needs no matching."""
    coder = BoxCoder2D()
    K = 3
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    dn = QueryDenoising(K, coder, 2, 0.0)([{"boxes": box, "labels": torch.tensor([1])}], 1, "cpu")
    dn.labels[0, 1] = K  # make copy 1 a background copy
    logits = torch.zeros(1, 1, 2, K + (class_loss == "softmax"))
    boxes = torch.tensor([[[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]]])  # copy 0 off by 0.1 in cx
    crit = SetCriterion(K, HungarianMatcher(coder, 1.0, {"bbox": 1.0}, class_loss), coder,
                        {"loss_cls": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0}, class_loss)
    main = SetPredictions(torch.zeros(1, 1, 1, logits.shape[-1]), torch.full((1, 1, 1, 4), 0.5))
    losses = crit(SetPredictions(main.logits, main.boxes, dn=DenoisingPredictions(logits, boxes, dn)),
                  [{"boxes": box, "labels": torch.tensor([1])}])
    torch.testing.assert_close(losses["dn.loss_bbox"], torch.tensor(0.1))  # only the positive copy
    torch.testing.assert_close(losses["dn.loss_giou"], torch.tensor(1 - 1 / 3))
    if class_loss == "focal":  # p = 0.5 everywhere: 1 positive and 5 negative entries over 1 positive box
        expected = (0.25 + 5 * 0.75) * 0.25 * math.log(2)
    else:  # uniform softmax over 4: CE log(4) for both, weights 1 (class 1) and 0.1 (no-object)
        expected = math.log(4)
    assert losses["dn.loss_cls"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["petr_tiny_synth", "detr3d_tiny_synth"])
def test_denoising_leaves_object_query_predictions_unchanged(name, synth_root):
    cfg = load_config(name, [f"data.root={synth_root}", "model.denoising.groups=3"])
    dataset = build_dataset(cfg, "train")
    batch = collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    targets = batch["targets"]
    with_dn = model(batch, targets)
    losses = criterion.weighted(criterion(with_dn, targets))
    L = cfg.model.head.num_decoder_layers
    dn_keys = {"dn.loss_cls", "dn.loss_bbox"} | {f"d{i}.dn.loss_{k}" for i in range(L - 1) for k in ("cls", "bbox")}
    assert dn_keys <= set(losses) and all(torch.isfinite(losses[k]) for k in dn_keys)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)

    without_dn = model(batch)  # no targets: no denoising queries
    assert with_dn.dn.logits.shape[2] == with_dn.dn.queries.num_queries > 0 and without_dn.dn is None
    assert with_dn.logits.shape == without_dn.logits.shape == (L, 2, cfg.model.head.num_queries, 10)
    torch.testing.assert_close(with_dn.logits, without_dn.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn.boxes, without_dn.boxes, atol=1e-4, rtol=1e-5)
