"""Parameter counts of the DETR-variant recipes against their papers (docs/models.md cites where), counted as
DETR's main.py does: trainable parameters (the frozen stem and layer1 and frozen BatchNorm buffers left out)."""

import pytest

from bev3d.config import load_config
from bev3d.models import build_model

PAPER = {  # config -> parameters (millions) reported by the paper
    "conditional_detr_r50_coco": 44.0,
    "efficient_detr_r50_coco": 32.0,
    "dn_deformable_detr_r50_coco": 48.0,
}
# Anchor DETR's transformer (everything but backbone and input projection), counted on the official code's
# Transformer(256, 8, 6, 6, 1024, num_query_position=300, num_query_pattern=3, attention_type="RCDA")
ANCHOR_DETR_OFFICIAL_TRANSFORMER = 13_058_743


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameters_within_3_percent_of_the_paper(name):
    model = build_model(load_config(name))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert abs(trainable / PAPER[name] - 1) < 0.03, f"{name}: {trainable:.2f}M vs {PAPER[name]}M"


def test_anchor_detr_transformer_has_the_official_size():
    model = build_model(load_config("anchor_detr_r50_coco"))
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("backbone.", "neck.")))
    assert head == ANCHOR_DETR_OFFICIAL_TRANSFORMER
