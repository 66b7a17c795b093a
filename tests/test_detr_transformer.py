import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bev3d.models.heads.ray_bias import LowRankBias, LowRankBiasAttention
from bev3d.models.transformer import (MLP, MultiheadAttention, PositionEmbeddingLearned, PositionEmbeddingSine,
                                      TransformerDecoderLayer, inverse_sigmoid)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    C, M = 32, 4
    ours = MultiheadAttention(C, M).eval()
    ref = nn.MultiheadAttention(C, M, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.randn(3 * C))
        ours.q_proj.bias.copy_(ref.in_proj_bias[:C])
        ours.k_proj.bias.copy_(ref.in_proj_bias[C:2 * C])
        ours.v_proj.bias.copy_(ref.in_proj_bias[2 * C:])
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    q, k, v = torch.randn(2, 5, C), torch.randn(2, 7, C), torch.randn(2, 7, C)
    qp, kp = torch.randn(2, 5, C), torch.randn(2, 7, C)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    attn_mask = torch.rand(5, 7) > 0.3
    attn_mask[:, 0] = True  # every query keeps at least one key
    expected, _ = ref(q + qp, k + kp, v, key_padding_mask=pad, attn_mask=~attn_mask)
    out = ours(q, k, v, query_pos=qp, key_pos=kp, key_padding_mask=pad, attn_mask=attn_mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_low_rank_bias_equals_the_dense_mask_and_its_gradients(padded):
    """The factored bias (fused SDPA) and the same bias as a dense float mask (math path) agree, values
    and gradients of the factors; under bf16 autocast too, with biases of hundreds like PETR's narrow
    ray-bias heads."""
    torch.manual_seed(0)
    B, M, L, S, C, r = 2, 4, 6, 9, 32, 6
    attn = LowRankBiasAttention(C, M).eval()
    x, mem = torch.randn(B, L, C), torch.randn(B, S, C)
    fq = (3 * torch.randn(B, M, L, r, dtype=torch.float64)).requires_grad_()
    fk = torch.randn(B, S, r, dtype=torch.float64).requires_grad_()
    pad = None
    if padded:
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, 6:] = True
    outs, grads = [], []
    for factored in (True, False):
        bias = LowRankBias(fq.float(), fk.float())
        mask = bias if factored else bias.dense()
        out = attn(x, mem, mem, key_padding_mask=pad, attn_mask=mask)
        gq, gk = torch.autograd.grad((out * torch.linspace(-1, 1, C)).sum(), (fq, fk))
        outs.append(out)
        grads.append((gq, gk))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    # PETR's ray bias: 400 * cos(angle between unit vectors); the keys' rays all within a few degrees of
    # the queries' directions, so logits differ by fractions of one on top of ~400
    axis = F.normalize(torch.randn(B, 1, 1, 3), dim=-1)
    u = F.normalize(axis + 0.05 * torch.randn(B, 1, L, 3), dim=-1)
    d = F.normalize(axis[:, 0] + 0.05 * torch.randn(B, S, 3), dim=-1)
    with torch.no_grad():
        big = LowRankBias(400 * u.expand(B, M, L, 3), d)
        expected = attn(x, mem, mem, key_padding_mask=pad, attn_mask=big.dense())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the bias stays float32 under autocast
            out = attn(x, mem, mem, key_padding_mask=pad, attn_mask=big)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_self_attention_uses_query_pos_for_keys():
    torch.manual_seed(0)
    attn = MultiheadAttention(16, 2).eval()
    x, pos = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    torch.testing.assert_close(attn(x, query_pos=pos), attn(x, x, x, query_pos=pos, key_pos=pos))


def test_sine_encoding_hand_value_and_padding_invariance():
    pe = PositionEmbeddingSine(num_feats=4, normalize=True)
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    out = pe(mask)  # (1, 8, 2, 4): channels [y sin, y cos, y sin, y cos, x ...]
    eps, scale = 1e-6, 2 * math.pi
    y, x = 1 / (2 + eps) * scale, 3 / (4 + eps) * scale  # row 0 (cumsum 1 of 2), column 2 (cumsum 3 of 4)
    t = 10000 ** (2 * 1 / 4)  # dim_t for channels 2, 3
    expected = [math.sin(y), math.cos(y), math.sin(y / t), math.cos(y / t),
                math.sin(x), math.cos(x), math.sin(x / t), math.cos(x / t)]
    torch.testing.assert_close(out[0, :, 0, 2], torch.tensor(expected))
    # Padding the image to the right/bottom leaves the valid region's encoding unchanged.
    padded = torch.ones(1, 5, 7, dtype=torch.bool)
    padded[:, :2, :4] = False
    torch.testing.assert_close(pe(padded)[..., :2, :4], out)


def test_learned_encoding_reads_column_then_row_tables():
    pe = PositionEmbeddingLearned(num_feats=8)
    out = pe(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert out.shape == (2, 16, 3, 5)
    # channel block [0, 8) is column j's embedding, [8, 16) row i's, for every image of the batch
    for i, j in ((0, 0), (2, 4), (1, 3)):
        torch.testing.assert_close(out[1, :8, i, j], pe.col_embed.weight[j])
        torch.testing.assert_close(out[0, 8:, i, j], pe.row_embed.weight[i])
    # the gradient reaches only the rows and columns that exist in the map
    out.sum().backward()
    assert (pe.col_embed.weight.grad[:5] != 0).all() and (pe.col_embed.weight.grad[5:] == 0).all()
    assert (pe.row_embed.weight.grad[:3] != 0).all() and (pe.row_embed.weight.grad[3:] == 0).all()


def test_decoder_layer_ignores_padded_memory():
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(16, 2, 32, 0.0).eval()
    tgt, memory, qp = torch.randn(1, 3, 16), torch.randn(1, 6, 16), torch.randn(1, 3, 16)
    pad = torch.tensor([[False] * 4 + [True] * 2])
    changed = memory.clone()
    changed[:, 4:] = 100.0
    torch.testing.assert_close(layer(tgt, memory, qp, None, pad), layer(tgt, changed, qp, None, pad))


def test_mlp_and_inverse_sigmoid():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(inverse_sigmoid(x)[1:3], torch.tensor([math.log(1 / 3), 0.0]))
    assert torch.isfinite(inverse_sigmoid(x)).all()
    assert MLP(4, 8, 2, 3)(torch.randn(5, 4)).shape == (5, 2)
