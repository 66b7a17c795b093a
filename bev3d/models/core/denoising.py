"""Query denoising for PETR (DN-DETR, as StreamPETR trains PETR).

In training, `groups` noisy copies of every ground-truth box join the object queries: each copy is a
query whose reference point is the box centre moved by up to `noise` half box extents along each
axis. Copies that land close to their box (a shift of norm <= `POSITIVE_RADIUS` half extents) must
predict the box and its class; the others must predict background. They need no matching, so from
the first step the decoder learns to read an object's features from near its reference point: Hungarian-matched
queries alone give that signal to a handful of queries per step, which makes a from-scratch PETR
slow to converge. The copies see the object queries but not the reverse, and groups do not see
each other, so nothing leaks from the ground truth into the matched predictions. Inference is
unchanged.
"""

from dataclasses import dataclass

import torch

from bev3d.models.heads.box_coder import encode, normalize_points

POSITIVE_RADIUS = 0.75  # StreamPETR's split (with noise 1.0): norm of the shift, in half box extents


@dataclass
class DenoisingQueries:
    reference: torch.Tensor  # (B, P, 3) noisy box centres, fractions of pc_range
    labels: torch.Tensor  # (B, P) class to predict; num_classes means background
    targets: torch.Tensor  # (B, P, 10) encoded box to predict (used where the label is a class)
    valid: torch.Tensor  # (B, P) False at padding slots of samples with fewer boxes than the batch's most
    attn_mask: torch.Tensor  # (P + Q, P + Q) bool, True where a query may attend to another

    @property
    def num_queries(self):
        return self.reference.shape[1]


class QueryDenoising:
    def __init__(self, num_classes, pc_range, groups, noise):
        self.num_classes, self.pc_range, self.groups, self.noise = num_classes, list(pc_range), groups, noise

    def __call__(self, gt_boxes, gt_labels, num_queries, device):
        """Per-sample gt_boxes (N_i, 9) and gt_labels (N_i,) -> DenoisingQueries, or None without any box."""
        n_max = max(len(labels) for labels in gt_labels)
        if n_max == 0:
            return None
        B, G, C = len(gt_boxes), self.groups, self.num_classes
        P = G * n_max  # slot g * n_max + j: copy g of box j
        reference = torch.zeros(B, G, n_max, 3)
        labels = torch.full((B, G, n_max), C, dtype=torch.long)
        targets = torch.zeros(B, G, n_max, 10)
        valid = torch.zeros(B, G, n_max, dtype=torch.bool)
        for b, (boxes, classes) in enumerate(zip(gt_boxes, gt_labels)):
            n = len(classes)
            if n == 0:
                continue
            boxes = boxes.detach().float().cpu()
            # half extents along x, y, z as if the yaw were 0: the noise scale, not a box
            half = torch.stack([boxes[:, 4], boxes[:, 3], boxes[:, 5]], -1) / 2  # (n, 3) l, w, h
            shift = (torch.rand(G, n, 3) * 2 - 1) * self.noise  # in half extents
            centres = boxes[None, :, :3] + shift * half
            reference[b, :, :n] = normalize_points(centres, self.pc_range).clamp(0, 1)
            positive = shift.norm(dim=-1) <= POSITIVE_RADIUS
            labels[b, :, :n] = torch.where(positive, classes.cpu().long()[None], C)
            targets[b, :, :n] = encode(boxes)[None]
            valid[b, :, :n] = True
        group = torch.arange(P) // n_max
        allowed = torch.ones(P + num_queries, P + num_queries, dtype=torch.bool)
        allowed[P:, :P] = False  # object queries never see the noisy ground truth
        allowed[:P, :P] = group[:, None] == group[None, :]  # each group only sees itself
        return DenoisingQueries(reference.view(B, P, 3).to(device), labels.view(B, P).to(device),
                                targets.view(B, P, 10).to(device), valid.view(B, P).to(device),
                                allowed.to(device))
