import math

import numpy as np
import torch

from bev3d.models.core import BoxCoder3D, PostProcess, SetPredictions
from bev3d.models.core.box_coder_3d import (decode_boxes, denormalize_points, encode, normalize_points, refine_centres,
                                            with_centres)

PC_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]


def _random_boxes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([100.0, 100.0, 6.0], dtype=torch.float64)
    wlh = torch.rand(n, 3, generator=g, dtype=torch.float64) * 5 + 0.3
    yaw = (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5) * 2 * math.pi * 0.999
    vel = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return torch.cat([xyz, wlh, yaw, vel], 1)


def test_encode_layout_and_roundtrip():
    boxes = _random_boxes(50)
    code = encode(boxes)
    x, y, z, w, l, h, yaw, vx, vy = boxes.T
    expected = torch.stack([x, y, w.log(), l.log(), z, h.log(), yaw.sin(), yaw.cos(), vx, vy], 1)
    assert torch.equal(code, expected)
    torch.testing.assert_close(decode_boxes(code), boxes, rtol=0, atol=1e-12)


def test_points_normalisation_roundtrip_and_refinement():
    pts = _random_boxes(20)[:, :3]
    frac = normalize_points(pts, PC_RANGE)
    assert (frac >= 0).all() and (frac <= 1).all()
    torch.testing.assert_close(denormalize_points(frac, PC_RANGE), pts)
    # A zero offset keeps the reference point; the code's centre slots are cx, cy (0, 1) and cz (4).
    code = torch.zeros(20, 10, dtype=torch.float64)
    logit = torch.logit(frac)
    torch.testing.assert_close(refine_centres(code, logit), frac)
    code[:, 4] = 1.0
    out = with_centres(code, refine_centres(code, logit), PC_RANGE)
    torch.testing.assert_close(out[:, [0, 1]], pts[:, :2])
    z = denormalize_points(torch.sigmoid(logit[:, 2:3] + 1.0).expand(-1, 3), PC_RANGE)[:, 2]
    torch.testing.assert_close(out[:, 4], z)


def test_nms_free_postprocess_matches_bruteforce():
    g = torch.Generator().manual_seed(3)
    B, Q, C = 2, 40, 10
    logits = torch.randn(B, Q, C, generator=g) * 1.5
    code = encode(_random_boxes(B * Q, seed=4)).float().view(B, Q, 10)
    code[0, 5, 0] = 70.0  # the best-scoring query lies outside the post-centre range: it must go
    logits[0, 5] = 8.0
    rng = [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0]
    postprocess = PostProcess(BoxCoder3D(PC_RANGE, post_center_range=rng), "focal", max_detections=30,
                              score_threshold=0.3)
    # only the last decoder layer counts: an earlier one with other values must not change anything
    results = postprocess(SetPredictions(torch.stack([logits.flip(1), logits]), torch.stack([code, code])), {})
    for b in range(B):
        # Reference: every (query, class) pair sorted by score in numpy.
        probs = 1 / (1 + np.exp(-logits[b].double().numpy()))
        pairs = sorted(((probs[q, c], q, c) for q in range(Q) for c in range(C)), reverse=True)[:30]
        boxes = decode_boxes(code[b].double()).numpy()
        keep = [(s, q, c) for s, q, c in pairs
                if s > 0.3 and all(rng[i] <= boxes[q, i] <= rng[i + 3] for i in range(3))]
        out = results[b]
        assert out["boxes"].shape == (len(keep), 9) and out["boxes"].dtype == torch.float32
        np.testing.assert_allclose(out["scores"].numpy(), [s for s, _, _ in keep], rtol=1e-5)
        assert out["labels"].tolist() == [c for _, _, c in keep]
        np.testing.assert_allclose(out["boxes"].numpy(), boxes[[q for _, q, _ in keep]], rtol=1e-5, atol=1e-4)
    assert results[0]["scores"].max() < torch.sigmoid(torch.tensor(8.0)) - 1e-3  # query 5 was dropped
