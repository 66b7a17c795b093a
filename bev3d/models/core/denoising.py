"""Query denoising (DN-DETR; StreamPETR's DN for PETR): noisy ground-truth copies as extra training queries.

`groups` noisy copies of every ground-truth box join a head's object queries. A copy starts from its box
moved by up to `box_noise` half box extents along each axis (the box coder's `jitter` knows the box kind).
Copies that land close to their box (a shift of norm <= `positive_radius` half extents) must predict the box
and its class; the others must predict background. Their targets are known by construction, so they need
no matching: from the first step the decoder learns to read an object's features near its reference,
a signal Hungarian matching gives to only a handful of queries per step. The copies see the object queries
but not the reverse, and groups do not see each other, so nothing leaks from the ground truth into the
matched predictions. A head puts the P copies in front of its queries and splits its outputs with
`bev3d.models.core.predictions.split_denoising`; `SetCriterion` scores them.
"""

from dataclasses import dataclass

import torch

POSITIVE_RADIUS = 0.75  # StreamPETR's split (with noise 1.0): norm of the shift, in half box extents


@dataclass
class DenoisingQueries:
    reference: torch.Tensor  # (B, P, R) noisy boxes in the coder's reference form (3D: centres as pc_range fractions)
    input_labels: torch.Tensor  # (B, P) label a head may embed: the box's class, flipped at random by label_noise
    labels: torch.Tensor  # (B, P) class to predict; num_classes means background (and marks padding)
    targets: torch.Tensor  # (B, P, D) encoded box to predict (used where the label is a class)
    valid: torch.Tensor  # (B, P) False at padding slots of samples with fewer boxes than the batch's most
    attn_mask: torch.Tensor  # (P + Q, P + Q) bool, True where a query may attend to another

    @property
    def num_queries(self):
        return self.reference.shape[1]


class QueryDenoising:
    """targets -> DenoisingQueries for a head with `num_queries` object queries (None when no image has a box)."""

    def __init__(self, num_classes, coder, groups, box_noise=1.0, label_noise=0.0, positive_radius=POSITIVE_RADIUS):
        self.num_classes, self.coder, self.groups = num_classes, coder, groups
        self.box_noise, self.label_noise, self.positive_radius = box_noise, label_noise, positive_radius

    def __call__(self, targets, num_queries, device):
        """targets: per image {"labels" (N_i,), "boxes" (N_i, box dims)}."""
        n_max = max(len(t["labels"]) for t in targets)
        if n_max == 0:
            return None
        B, G, C = len(targets), self.groups, self.num_classes
        P = G * n_max  # slot g * n_max + j: copy g of box j
        reference = torch.zeros(B, G, n_max, self.coder.reference_size)
        labels = torch.full((B, G, n_max), C, dtype=torch.long)
        input_labels = torch.full((B, G, n_max), C, dtype=torch.long)
        encoded = torch.zeros(B, G, n_max, self.coder.code_size)
        valid = torch.zeros(B, G, n_max, dtype=torch.bool)
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                continue
            boxes = t["boxes"].detach().float().cpu()
            classes = t["labels"].cpu().long()
            reference[b, :, :n], shift = self.coder.jitter(boxes, G, self.box_noise)  # (G, n, R), (G, n)
            labels[b, :, :n] = torch.where(shift <= self.positive_radius, classes[None], C)
            input_labels[b, :, :n] = self._noisy_labels(classes, G)
            encoded[b, :, :n] = self.coder.encode(boxes)[None]
            valid[b, :, :n] = True
        group = torch.arange(P) // n_max
        allowed = torch.ones(P + num_queries, P + num_queries, dtype=torch.bool)
        allowed[P:, :P] = False  # object queries never see the noisy ground truth
        allowed[:P, :P] = group[:, None] == group[None, :]  # each group only sees itself
        return DenoisingQueries(reference.view(B, P, -1).to(device), input_labels.view(B, P).to(device),
                                labels.view(B, P).to(device), encoded.view(B, P, -1).to(device),
                                valid.view(B, P).to(device), allowed.to(device))

    def _noisy_labels(self, classes, groups):
        """(n,) classes -> (G, n) copies, each replaced by a uniformly drawn class with probability label_noise."""
        labels = classes[None].expand(groups, -1).clone()
        if self.label_noise > 0:
            flip = torch.rand(labels.shape) < self.label_noise
            labels[flip] = torch.randint(0, self.num_classes, (int(flip.sum()),))
        return labels
