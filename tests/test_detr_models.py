import pytest
import torch

from bev3d.config import load_config
from bev3d.models import build_criterion, build_model, build_postprocess
from bev3d.models.core import BoxCoder2D, HungarianMatcher, PostProcess, SetCriterion, SetPredictions


def _batch(B=2, H=64, W=96):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, :, 64:] = True  # image 1 is 64x64, padded to 96 wide
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return {"img": torch.randn(B, 3, H, W, generator=g), "mask": mask, "targets": targets,
            "img_shape": [(64, 96), (64, 64)], "orig_size": [(128, 192), (64, 64)]}


@pytest.mark.parametrize("name,opts", [
    ("detr_tiny_shapes", []),
    ("deformable_detr_tiny_shapes", []),
    ("deformable_detr_tiny_shapes", ["model.head.with_box_refine=false"]),
    ("deformable_detr_tiny_shapes", ["model.head.two_stage=true"]),
])
def test_train_and_eval_contract(name, opts):
    torch.manual_seed(0)
    cfg = load_config(name, opts + ["model.head.attn_backend=reference"] if "deformable" in name else opts)
    model, criterion, postprocess = build_model(cfg).train(), build_criterion(cfg), build_postprocess(cfg)
    batch = _batch()
    losses = criterion.weighted(criterion(model(batch, batch["targets"]), batch["targets"]))
    L = cfg.model.head.num_decoder_layers
    expected = {"loss_cls", "loss_bbox", "loss_giou"}
    expected |= {f"d{i}.{k}" for i in range(L - 1) for k in ("loss_cls", "loss_bbox", "loss_giou")}
    if cfg.model.head.__dict__.get("two_stage"):
        expected |= {"enc.loss_cls", "enc.loss_bbox", "enc.loss_giou"}
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0

    with torch.no_grad():
        dets = postprocess(model.eval()(batch), batch)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, [(128, 192), (64, 64)]):
        assert det["boxes"].shape == (len(det["scores"]), 4) and len(det["labels"]) == len(det["scores"])
        assert len(det["scores"]) <= cfg.model.max_detections
        boxes = det["boxes"]
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= w + 1e-3
        assert boxes[:, 1::2].max() <= h + 1e-3


def test_postprocess_softmax_by_hand():
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])  # query 1 is no-object (last logit)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    postprocess = PostProcess(BoxCoder2D(), "softmax", max_detections=1)
    (det,) = postprocess(SetPredictions(logits[None], boxes[None]), {"orig_size": [(100, 200)]})
    p = torch.softmax(logits[0, 0], -1)[0]
    torch.testing.assert_close(det["scores"], p[None])
    assert det["labels"].tolist() == [0]
    torch.testing.assert_close(det["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0]]))


def test_postprocess_sigmoid_topk_over_queries_and_classes():
    logits = torch.tensor([[[3.0, 2.0], [-5.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]]])
    postprocess = PostProcess(BoxCoder2D(), "focal", max_detections=3)
    (det,) = postprocess(SetPredictions(logits[None], boxes[None]), {"img_shape": [(10, 10)]})
    torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    assert det["labels"].tolist() == [0, 1, 1]  # query 0 gives two detections (classes 0 and 1)
    torch.testing.assert_close(det["boxes"][2], torch.tensor([0.0, 0.0, 5.0, 5.0]))


@pytest.mark.parametrize("use_focal", [False, True])
def test_set_criterion_by_hand(use_focal):
    """One target; the matched query's box is off by 0.1 in cx: L1 = 0.1, GIoU from the hull by hand."""
    K = 3
    mode = "focal" if use_focal else "softmax"
    matcher = HungarianMatcher(BoxCoder2D(), 1.0, {"bbox": 5.0, "giou": 2.0}, mode)
    crit = SetCriterion(K, matcher, BoxCoder2D(), {"loss_cls": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0}, mode)
    logits = torch.zeros(1, 2, K if use_focal else K + 1)
    boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses = crit(SetPredictions(logits[None], boxes[None]), targets)
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.1))
    # boxes [0.5,0.4,0.7,0.6] and [0.4,0.4,0.6,0.6]: inter 0.02, union 0.06, hull 0.06
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(1 - 1 / 3))
    if use_focal:  # logits 0: p = 0.5 everywhere; 1 positive, 5 negatives, / num_boxes = 1
        l_pos = 0.25 * 0.25 * torch.log(torch.tensor(2.0))
        l_neg = 0.75 * 0.25 * torch.log(torch.tensor(2.0))
        torch.testing.assert_close(losses["loss_cls"], l_pos + 5 * l_neg)
    else:  # uniform softmax: CE = log(4) for both queries, weights 1 and 0.1
        torch.testing.assert_close(losses["loss_cls"], torch.log(torch.tensor(4.0)))
