"""PETR query denoising: the noisy ground-truth queries, their attention mask, and that they leave the
object queries' predictions untouched."""

import torch

from bev3d.config import load_config
from bev3d.data import build_dataset, collate
from bev3d.models import build_model
from bev3d.models.heads.denoising import POSITIVE_RADIUS, QueryDenoising

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]


def _boxes():
    boxes = [torch.tensor([[10.0, -4.0, 0.5, 2.0, 4.0, 1.5, 0.3, 1.0, 0.0],
                           [-20.0, 30.0, -1.0, 0.6, 0.8, 1.8, -1.0, 0.0, 0.5]]),
             torch.tensor([[5.0, 5.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])]
    return boxes, [torch.tensor([0, 8]), torch.tensor([9])]


def test_zero_noise_copies_sit_on_their_boxes():
    boxes, labels = _boxes()
    dn = QueryDenoising(10, PC_RANGE, groups=3, noise=0.0)(boxes, labels, num_queries=5, device="cpu")
    assert dn.num_queries == 3 * 2 and dn.reference.shape == (2, 6, 3)
    # slot g * n_max + j is copy g of box j; sample 1 has one box, so its slot j = 1 of each group is padding
    assert dn.valid.tolist() == [[True] * 6, [True, False] * 3]
    lo, size = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:]) - torch.tensor(PC_RANGE[:3])
    for g in range(3):
        for b, j in ((0, 0), (0, 1), (1, 0)):
            assert torch.allclose(dn.reference[b, 2 * g + j], (boxes[b][j, :3] - lo) / size)
            assert dn.labels[b, 2 * g + j] == labels[b][j]
    assert (dn.labels[1, 1::2] == 10).all()  # padding is background


def test_noise_stays_within_the_box_scale_and_far_copies_are_background():
    torch.manual_seed(0)
    box = torch.tensor([[0.0, 0.0, 0.0, 2.0, 4.0, 1.0, 0.0, 0.0, 0.0]])  # w 2, l 4, h 1
    dn = QueryDenoising(10, PC_RANGE, groups=400, noise=1.0)([box], [torch.tensor([3])], 7, "cpu")
    lo, size = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:]) - torch.tensor(PC_RANGE[:3])
    centres = dn.reference[0] * size + lo  # (400, 3) metres
    unit = centres / torch.tensor([2.0, 1.0, 0.5])  # half extents along x (length), y (width), z (height)
    assert unit.abs().max() <= 1 + 1e-5 and unit.abs().max() > 0.9
    positive = dn.labels[0] == 3
    assert torch.equal(positive, unit.norm(dim=-1) <= POSITIVE_RADIUS)
    assert 0 < positive.sum() < 400 and (dn.labels[0][~positive] == 10).all()


def test_attention_mask_isolates_groups_and_hides_the_ground_truth():
    boxes, labels = _boxes()
    dn = QueryDenoising(10, PC_RANGE, groups=2, noise=1.0)(boxes, labels, num_queries=3, device="cpu")
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
    empty = [torch.zeros(0, 9), torch.zeros(0, 9)]
    assert QueryDenoising(10, PC_RANGE, 2, 1.0)(empty, [torch.zeros(0, dtype=torch.long)] * 2, 5, "cpu") is None


def test_denoising_leaves_object_query_predictions_unchanged(synth_root):
    cfg = load_config("petr_tiny_synth", [f"data.root={synth_root}", "model.head.denoising_groups=3"])
    dataset = build_dataset(cfg, "train")
    batch = collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    captured = []
    model.criterion.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()) or None)
    losses = model(batch)
    L = cfg.model.head.num_decoder_layers
    dn_keys = {"dn.loss_cls", "dn.loss_bbox"} | {f"d{i}.dn.loss_{k}" for i in range(L - 1) for k in ("cls", "bbox")}
    assert dn_keys <= set(losses) and all(torch.isfinite(losses[k]) for k in dn_keys)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.head.query_embedding.parameters())

    with_dn = captured[0]  # object-query class logits seen by the set loss
    model.denoising = None
    model(batch)
    without_dn = captured[1]
    assert with_dn.shape == without_dn.shape == (L, 2, cfg.model.head.num_queries, 10)
    assert torch.allclose(with_dn, without_dn, atol=1e-5)
