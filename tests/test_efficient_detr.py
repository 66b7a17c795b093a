"""Efficient DETR: the sparse part starts from the dense part's best detections, and the dense part's loss is
matched on the classes (the core's `enc_classes` option)."""

import pytest
import torch

from bev3d.config import load_config
from bev3d.models import build_criterion, build_model
from bev3d.models.core import BoxCoder2D, HungarianMatcher, SetCriterion, SetPredictions
from bev3d.models.transformer.deformable_transformer import encoder_proposals


def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    return {"img": torch.randn(2, 3, 64, 96, generator=g), "mask": mask}


@pytest.mark.parametrize("layers", [1, 6])  # the paper's one decoder layer, and the cascade
def test_queries_are_the_top_k_dense_detections(layers):
    torch.manual_seed(0)
    cfg = load_config("efficient_detr_tiny_shapes", ["model.head.attn_backend=reference",
                                                     f"model.head.num_decoder_layers={layers}"])
    model = build_model(cfg).eval()
    seen = {}

    def capture(module, args):
        seen["tgt"], _, seen["reference"], seen["memory"], seen["shapes"] = args[:5]
        seen["mask"] = args[7]

    model.decoder.register_forward_pre_hook(capture)
    with torch.no_grad():
        out = model(_batch())
    K = cfg.model.head.num_queries
    assert out.logits.shape == (layers, 2, K, 4) and out.enc_classes
    dense_logits, dense_boxes = out.enc.logits[0], out.enc.boxes[0]  # (B, S, 4), (B, S, 4)
    _, valid = encoder_proposals(seen["memory"], seen["mask"], seen["shapes"])
    assert valid[0].all() and not valid[1].all()  # image 1's padding tokens have no anchor box: never chosen
    for b in range(2):
        scores = dense_logits[b].max(-1).values
        order = [int(i) for i in scores.argsort(descending=True) if valid[b, i]][:K]
        chosen = [int(i) for i in (seen["memory"][b][:, None] == seen["tgt"][b][None]).all(-1).nonzero()[:, 0]]
        assert sorted(chosen) == sorted(order)  # content: the encoder features of the best valid tokens
        expected = dense_boxes[b, order]
        ref = seen["reference"][b]
        match = (ref[:, None] == expected[None]).all(-1)  # references: those tokens' dense boxes
        assert match.any(1).all()
    # with a zero box head the first layer's boxes are its references
    torch.testing.assert_close(out.boxes[0], seen["reference"])


def test_dense_loss_is_matched_on_the_classes():
    """The same predictions as the last layer and as `enc`: with enc_classes the two losses agree; class-agnostic
    (two-stage) scoring gives another class loss and the same box loss."""
    coder = BoxCoder2D()
    crit = SetCriterion(3, HungarianMatcher(coder, 2.0, {"bbox": 5.0, "giou": 2.0}), coder,
                        {"loss_cls": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0})
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 6, 3, generator=g)
    boxes = torch.rand(1, 2, 6, 4, generator=g) * 0.5 + 0.25
    targets = [{"labels": torch.tensor([2, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}]
    aware = crit(SetPredictions(logits, boxes, enc=SetPredictions(logits, boxes), enc_classes=True), targets)
    for k in ("loss_cls", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(aware["enc." + k], aware[k])
    agnostic = crit(SetPredictions(logits, boxes, enc=SetPredictions(logits, boxes)), targets)
    assert (agnostic["enc.loss_cls"] - aware["enc.loss_cls"]).abs() > 1e-3


def test_train_step_has_dense_losses():
    torch.manual_seed(0)
    cfg = load_config("efficient_detr_tiny_shapes", ["model.head.attn_backend=reference"])
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    losses = criterion.weighted(criterion(model(_batch(), targets), targets))
    assert {"enc.loss_cls", "enc.loss_bbox", "enc.loss_giou", "loss_cls"} <= set(losses)
    sum(losses.values()).backward()
    assert model.dense_class_embed.weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].ffn.linear1.weight.grad.abs().sum() > 0
