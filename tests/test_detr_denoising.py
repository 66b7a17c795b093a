"""DN-DETR query denoising in the 2D models: the object queries never see the noisy copies (their outputs are
those of a run without copies), the copy groups never see each other, and a copy whose input label was flipped
must still predict its box's true class."""

import dataclasses

import pytest
import torch

from bev3d.config import load_config
from bev3d.models import build_criterion, build_model

MODELS = [("detr_tiny_shapes", []), ("deformable_detr_tiny_shapes", []),
          ("deformable_detr_tiny_shapes", ["model.head.two_stage=true"]), ("conditional_detr_tiny_shapes", []),
          ("anchor_detr_tiny_shapes", []), ("anchor_detr_tiny_shapes", ["model.head.attention=standard"])]
GROUPS = 3


def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return {"img": torch.randn(2, 3, 64, 96, generator=g), "mask": mask}, targets


def _model(name, opts, *dn_opts):
    torch.manual_seed(0)
    backend = ["model.head.attn_backend=reference"] if "deformable" in name else []
    cfg = load_config(name, opts + backend + [f"model.denoising.groups={GROUPS}", *dn_opts])
    return cfg, build_model(cfg).eval()


class Fixed:
    """Stands in for the model's QueryDenoising: returns given queries, so that a test can edit them."""

    def __init__(self, queries):
        self.queries = queries

    def __call__(self, targets, num_queries, device):
        return self.queries


def _float64(model, batch):
    """In float64 the comparisons below measure the masking, not float32 rounding (which alone is ~1e-6)."""
    return model.double(), {**batch, "img": batch["img"].double()}


@pytest.mark.parametrize("name,opts", MODELS)
def test_object_queries_do_not_see_the_copies(name, opts):
    _, model = _model(name, opts, "model.denoising.label_noise=0.5")
    model, batch = _float64(model, _batch()[0])
    targets = _batch()[1]
    with torch.no_grad():
        with_dn = model(batch, targets)
        without = model(batch)
    assert with_dn.dn is not None and with_dn.dn.logits.shape[2] == GROUPS * 2 and without.dn is None
    torch.testing.assert_close(with_dn.logits, without.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_dn.boxes, without.boxes, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,opts", MODELS)
def test_groups_do_not_see_each_other(name, opts):
    """Changing group 1's copies (labels and boxes) changes group 1's outputs only."""
    _, model = _model(name, opts)
    batch, targets = _batch()
    model, batch = _float64(model, batch)
    torch.manual_seed(1)
    queries = model.denoising(targets, 30, "cpu")
    changed = dataclasses.replace(queries, input_labels=queries.input_labels.clone(),
                                  reference=queries.reference.clone())
    group1 = slice(2, 4)  # n_max = 2 slots per group
    changed.input_labels[:, group1] = (changed.input_labels[:, group1] + 1) % 4
    changed.reference[:, group1, :2] = 1 - changed.reference[:, group1, :2]
    with torch.no_grad():
        model.denoising = Fixed(queries)
        a = model(batch, targets)
        model.denoising = Fixed(changed)
        b = model(batch, targets)
    others = [0, 1, 4, 5]
    torch.testing.assert_close(b.dn.logits[:, :, others], a.dn.logits[:, :, others], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.dn.boxes[:, :, others], a.dn.boxes[:, :, others], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)
    assert (b.dn.logits[:, :, group1] - a.dn.logits[:, :, group1]).abs().max() > 1e-4


@pytest.mark.parametrize("name,opts", [MODELS[1], MODELS[3]])
def test_flipped_label_copies_predict_the_true_class(name, opts):
    cfg, model = _model(name, opts, "model.denoising.label_noise=1.0", "model.denoising.positive_radius=.inf")
    batch, targets = _batch()
    seen = []
    model.label_embed.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    torch.manual_seed(2)
    out = model.train()(batch, targets)
    q = out.dn.queries
    assert torch.equal(seen[0], q.input_labels)  # the model embeds the (flipped) input label
    true = torch.tensor([[1, 3], [2, 4]]).repeat(1, GROUPS)  # slot g * 2 + j: box j; 4 = padding (background)
    assert torch.equal(q.labels, true)
    flipped = q.valid & (q.input_labels != true)
    assert flipped.sum() >= 3  # label_noise 1: a random class for every copy
    losses = build_criterion(cfg)(out, targets)
    assert torch.isfinite(losses["dn.loss_cls"]) and losses["dn.loss_bbox"] > 0


def test_2d_model_without_denoising_support_refuses_it():
    from bev3d.errors import Bev3dError

    cfg = load_config("efficient_detr_tiny_shapes", ["model.denoising.groups=2"])
    with pytest.raises(Bev3dError, match="model.denoising"):
        build_model(cfg)
