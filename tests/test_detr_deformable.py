import math

import pytest
import torch

from bev3d.models.transformer import DeformableTransformer, MLP, MSDeformAttn
from bev3d.models.transformer.deformable_transformer import encoder_proposals, encoder_reference_points, valid_ratio
from bev3d.ops import build


def test_sampling_offset_init_as_in_the_paper():
    attn = MSDeformAttn(embed_dims=32, num_levels=2, num_heads=8, num_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    # head 0 looks along +x, head 2 along +y, head 1 along the diagonal (normalised to the unit square)
    torch.testing.assert_close(bias[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[2, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 0, 1], torch.tensor([2.0, 2.0]))
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0


def test_valid_ratio_reference_points_by_hand():
    mask = torch.ones(1, 4, 8, dtype=torch.bool)
    mask[:, :2, :6] = False  # valid region: 2 of 4 rows, 6 of 8 columns
    ratios = valid_ratio(mask)
    torch.testing.assert_close(ratios, torch.tensor([[6 / 8, 2 / 4]]))
    refs = encoder_reference_points(torch.tensor([[4, 8]]), ratios[:, None])  # (1, 32, 1, 2)
    # Pixel (row 1, col 5) is the last valid centre: (5.5 / 6 of the valid width) * 6/8 of the map = 5.5 / 8.
    torch.testing.assert_close(refs[0, 1 * 8 + 5, 0], torch.tensor([5.5 / 8, 1.5 / 4]))


def test_encoder_proposals_skip_padding():
    mask = torch.zeros(1, 4 * 4 + 2 * 2, dtype=torch.bool)
    mask[0, [3, 7, 11, 15]] = True  # level 0: last column padded, 3 of 4 columns valid
    proposals, valid = encoder_proposals(torch.zeros(1, 20, 8), mask, torch.tensor([[4, 4], [2, 2]]))
    assert not valid[0, 3] and torch.isinf(proposals[0, 3]).all()
    # level 0 pixel (row 0, col 1): centre (1.5 / 3, 0.5 / 4) of the valid region, size 0.05
    torch.testing.assert_close(proposals[0, 1].sigmoid(), torch.tensor([1.5 / 3, 0.5 / 4, 0.05, 0.05]))
    torch.testing.assert_close(proposals[0, 16].sigmoid(), torch.tensor([0.25, 0.25, 0.1, 0.1]))


def _inputs(B=2, C=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 16), (6, 8), (3, 4), (2, 2)]
    srcs = [torch.randn(B, C, h, w, generator=g) for h, w in shapes]
    masks = [torch.zeros(B, h, w, dtype=torch.bool) for h, w in shapes]
    for m in masks:  # image 1 is padded on the right and bottom
        m[1, (m.shape[1] + 1) // 2:, :] = True
        m[1, :, (m.shape[2] * 3 + 3) // 4:] = True
    pos = [torch.randn(B, C, h, w, generator=g) for h, w in shapes]
    return srcs, masks, pos


def _build_transformer(two_stage, C=32, Q=10):
    torch.manual_seed(0)
    t = DeformableTransformer(C, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dims=64, dropout=0.0,
                              num_levels=4, num_points=3, two_stage=two_stage, two_stage_num_proposals=Q)
    t.decoder.bbox_embed = torch.nn.ModuleList(MLP(C, C, 4, 3) for _ in range(2))  # iterative refinement
    if two_stage:
        t.enc_class_embed, t.enc_bbox_embed = torch.nn.Linear(C, 5), MLP(C, C, 4, 3)
    return t.eval()


@pytest.mark.parametrize("two_stage", [False, True])
def test_refinement_and_two_stage_shapes(two_stage):
    t = _build_transformer(two_stage)
    t.set_backend("reference")
    srcs, masks, pos = _inputs()
    query = None if two_stage else torch.randn(10, 64)
    hidden, refs, enc = t(srcs, masks, pos, query)
    assert hidden.shape == (2, 2, 10, 32)
    assert [r.shape[-1] for r in refs] == ([4, 4] if two_stage else [2, 4])
    assert all(((r >= 0) & (r <= 1)).all() for r in refs)
    assert (enc is not None) == two_stage


@pytest.mark.parametrize("two_stage", [False, True])
def test_reference_backend_matches_cpu_kernel(two_stage):
    reason = build.unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"compiled CPU kernel unavailable: {reason}")
    t = _build_transformer(two_stage)
    srcs, masks, pos = _inputs()
    query = None if two_stage else torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    outs = {}
    for backend in ("reference", "cpu"):
        t.set_backend(backend)
        t.zero_grad()
        hidden, refs, _ = t(srcs, masks, pos, query)
        hidden.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in t.named_parameters() if p.grad is not None}
        outs[backend] = (hidden.detach(), [r.detach() for r in refs], grads)
    torch.testing.assert_close(outs["cpu"][0], outs["reference"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs["cpu"][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, g in outs["reference"][2].items():
        torch.testing.assert_close(outs["cpu"][2][name], g, rtol=1e-4, atol=1e-4, msg=name)


def test_box_reference_sampling_scales_with_box_size():
    """With (cx, cy, w, h) references an offset of P (the number of points) moves by half the box size."""
    attn = MSDeformAttn(embed_dims=8, num_levels=1, num_heads=1, num_points=2, backend="reference")
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([2.0, 0.0, 2.0, 0.0]))  # both points: +P in x
        attn.attention_weights.bias.zero_()
        attn.value_proj.weight.copy_(torch.eye(8))
        attn.value_proj.bias.zero_()
        attn.output_proj.weight.copy_(torch.eye(8))
        attn.output_proj.bias.zero_()
    # value = x coordinate of each pixel centre (constant along y), so the output reads the sampled x.
    H, W = 4, 8
    xs = ((torch.arange(W) + 0.5) / W).repeat(H)
    value = xs[None, :, None].expand(1, H * W, 8).contiguous()
    ref = torch.tensor([[[[0.25, 0.5, 0.25, 0.5]]]])  # (B, Q, L, 4)
    out = attn(torch.zeros(1, 1, 8), ref, value, torch.tensor([[H, W]]), torch.tensor([0]))
    assert math.isclose(out[0, 0, 0].item(), 0.25 + 0.25 / 2, rel_tol=1e-5)
