"""Anchor DETR: row-column decoupled attention against a loop over the paper's formulas, and the query layout."""

import math

import pytest
import torch

from bev3d.config import load_config
from bev3d.errors import Bev3dError
from bev3d.models import build_model
from bev3d.models.transformer.rcda import RowColumnAttention


def _linear(lin, x):
    return x @ lin.weight.T + lin.bias


def _softmax(logits):
    e = [math.exp(v) if v != -math.inf else 0.0 for v in logits]
    return [v / sum(e) for v in e]


@torch.no_grad()
def naive_rcda(attn, query_x, query_y, key_x, key_y, value, mask):
    """Anchor DETR's equations, one query, head, row and column at a time: K_x (K_y) are the keys averaged over
    the rows (columns), A_x = softmax(Q_x K_x^T / sqrt(d)) over the W columns, Z = weighted_sum_W(A_x, V),
    A_y = softmax(Q_y K_y^T / sqrt(d)) over the H rows, Out = weighted_sum_H(A_y, Z)."""
    B, Q, C = query_x.shape
    _, H, W, _ = value.shape
    M = attn.num_heads
    E = C // M
    out = torch.zeros(B, Q, C, dtype=torch.float64)
    for b in range(B):
        k_x = [_linear(attn.k_x_proj, sum(key_x[b, h, w] for h in range(H)) / H) for w in range(W)]
        k_y = [_linear(attn.k_y_proj, sum(key_y[b, h, w] for w in range(W)) / W) for h in range(H)]
        v = [[_linear(attn.v_proj, value[b, h, w]) for w in range(W)] for h in range(H)]
        for q in range(Q):
            q_x, q_y = _linear(attn.q_x_proj, query_x[b, q]), _linear(attn.q_y_proj, query_y[b, q])
            heads = []
            for m in range(M):
                s = slice(m * E, (m + 1) * E)
                a_x = _softmax([-math.inf if mask[b, 0, w] else float(q_x[s] @ k_x[w][s]) / math.sqrt(E)
                                for w in range(W)])
                a_y = _softmax([-math.inf if mask[b, h, 0] else float(q_y[s] @ k_y[h][s]) / math.sqrt(E)
                                for h in range(H)])
                z = [sum(a_x[w] * v[h][w][s] for w in range(W)) for h in range(H)]
                heads.append(sum(a_y[h] * z[h] for h in range(H)))
            out[b, q] = _linear(attn.out_proj, torch.cat(heads))
    return out


@pytest.mark.parametrize("H,W", [(3, 5), (5, 3)])  # both summation orders of the fast path
def test_rcda_equals_the_papers_formulas(H, W):
    torch.manual_seed(0)
    B, Q, C = 2, 3, 8
    attn = RowColumnAttention(C, num_heads=2).double()
    with torch.no_grad():
        attn.out_proj.bias.normal_()
        attn.k_x_proj.bias.normal_()
    query_x, query_y = torch.randn(B, Q, C, dtype=torch.float64), torch.randn(B, Q, C, dtype=torch.float64)
    key_x, key_y, value = (torch.randn(B, H, W, C, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, -1, :] = True  # image 1 has a padded row and a padded column
    mask[1, :, -1] = True
    out = attn(query_x, query_y, key_x, key_y, value, mask)
    torch.testing.assert_close(out, naive_rcda(attn, query_x, query_y, key_x, key_y, value, mask), atol=1e-10,
                               rtol=0)


def test_queries_are_patterns_at_anchors():
    """Query p * A + a is pattern p at anchor a: with a zero box head its box centre is anchor a."""
    torch.manual_seed(0)
    cfg = load_config("anchor_detr_tiny_shapes", ["model.head.anchors=grid", "model.head.num_queries=12",
                                                  "model.head.num_patterns=3", "model.head.attention=standard"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model({"img": torch.randn(1, 3, 64, 64)})
    grid = torch.tensor([[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]])  # x-major, 2 x 2
    torch.testing.assert_close(out.boxes[:, 0, :, :2], grid.repeat(3, 1).expand(3, -1, -1))
    size = torch.sigmoid(torch.tensor(-2.0))  # the box head's initial size bias
    torch.testing.assert_close(out.boxes[..., 2:], torch.full_like(out.boxes[..., 2:], size.item()))
    # the three patterns of one anchor see the same position but predict different classes
    assert (out.logits[-1, 0, 0] - out.logits[-1, 0, 4]).abs().max() > 1e-4


def test_grid_anchors_need_a_square_number():
    cfg = load_config("anchor_detr_tiny_shapes", ["model.head.anchors=grid"])  # 30 queries / 3 patterns = 10
    with pytest.raises(Bev3dError, match="square"):
        build_model(cfg)
