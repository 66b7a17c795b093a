"""Comparing set predictions whose query order may differ between two implementations."""

import torch
from scipy.optimize import linear_sum_assignment


def assert_same_queries(logits, boxes, ref_logits, ref_boxes, atol=1e-5):
    """logits, boxes (B, Q, ...) against the reference's: queries that come in the rank order of a score (two-stage
    proposals, a StreamPETR memory's top-k) may swap ranks where two scores differ by less than rounding, so per image
    the rows are paired by a minimum-cost assignment (a permutation; scipy), then compared as they are."""
    logits, boxes, ref_logits, ref_boxes = (torch.as_tensor(t) for t in (logits, boxes, ref_logits, ref_boxes))
    for o, r in zip(torch.cat([logits, boxes], -1), torch.cat([ref_logits, ref_boxes], -1)):
        _, cols = linear_sum_assignment(torch.cdist(r.double(), o.double()).numpy())
        torch.testing.assert_close(o[torch.as_tensor(cols)], r, atol=atol, rtol=0)
