"""The set loss of every head: Hungarian-matched class + box losses at every decoder layer, the two-stage
proposals and the denoising queries (whose targets are known without matching)."""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bev3d.models.core.matcher import CLASS_COSTS


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, num_boxes=None):
    """Focal loss (Lin et al. 2017) of logits against {0, 1} targets of the same shape.

    Elementwise when `num_boxes` is None, else summed and divided by `num_boxes` (the number of
    ground-truth boxes, so the loss does not scale with the number of queries). alpha < 0 disables
    the class balancing.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss if num_boxes is None else loss.sum() / num_boxes


def mean_across_ranks(count):
    """A loss normaliser (a float tensor) averaged over DDP ranks, at least 1: every rank divides by the same
    number, so gradients match single-process training."""
    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def num_boxes_across_ranks(labels, device):
    """Number of targets in `labels` (a list of per-image tensors) averaged over DDP ranks, at least 1."""
    return mean_across_ranks(torch.tensor(float(sum(len(t) for t in labels)), device=device))


def loss_term(name):
    """`d2.dn.loss_bbox` -> `loss_bbox`: the term a (prefixed) loss entry belongs to."""
    return name.rsplit(".", 1)[-1]


class SetCriterion(nn.Module):
    """SetPredictions + targets -> unweighted loss terms; `weighted` applies the weights.

    targets: per image {"labels" (T_i,) int64, "boxes" (T_i, box dims)}, boxes as the box coder encodes them.
    Terms: `loss_cls` and the coder's box terms (`loss_bbox`, 2D also `loss_giou`) for the last decoder layer,
    `d{i}.` for earlier layers (with aux_loss), `enc.` for two-stage proposals, `dn.` / `d{i}.dn.` for
    denoising queries, and the gradient-free `cardinality_error` (logged only: no weight).
    """

    def __init__(self, num_classes, matcher, coder, weight_dict, class_loss="focal", focal_alpha=0.25,
                 focal_gamma=2.0, no_object_weight=0.1, aux_loss=True):
        super().__init__()
        if class_loss not in CLASS_COSTS:
            raise ValueError(f"class_loss must be one of {CLASS_COSTS}, got {class_loss!r}")
        self.num_classes, self.matcher, self.coder = num_classes, matcher, coder
        self.weight_dict = dict(weight_dict)  # term -> weight, e.g. {"loss_cls": 2.0, "loss_bbox": 0.25}
        self.class_loss, self.focal_alpha, self.focal_gamma = class_loss, focal_alpha, focal_gamma
        self.no_object_weight, self.aux_loss = no_object_weight, aux_loss

    def forward(self, outputs, targets):
        device = outputs.logits.device
        labels = [t["labels"].to(device) for t in targets]
        boxes = [self.coder.encode(t["boxes"].to(device)) for t in targets]
        num_boxes = num_boxes_across_ranks(labels, device)
        L = outputs.logits.shape[0]
        losses = {}
        for layer in range(L) if self.aux_loss else [L - 1]:
            prefix = "" if layer == L - 1 else f"d{layer}."
            losses.update(self.matched_losses(outputs.logits[layer], outputs.boxes[layer], labels, boxes,
                                              num_boxes, prefix))
        if outputs.enc is not None:
            # two-stage proposals are class-agnostic (class 0 is objectness) unless they predict the classes
            enc_labels = labels if outputs.enc_classes else [torch.zeros_like(t) for t in labels]
            losses.update(self.matched_losses(outputs.enc.logits[-1], outputs.enc.boxes[-1], enc_labels, boxes,
                                              num_boxes, "enc."))
        if outputs.dn is not None:
            losses.update(self.denoising_losses(outputs.dn))
        losses["cardinality_error"] = self.cardinality(outputs.logits[-1], labels)
        return losses

    def weighted(self, losses):
        """The entries that enter the objective, multiplied by their term's weight (the rest are only logged)."""
        return {k: self.weight_dict[loss_term(k)] * v for k, v in losses.items() if loss_term(k) in self.weight_dict}

    def matched_losses(self, logits, boxes, labels, targets, num_boxes, prefix):
        """One layer: logits (B, Q, K), boxes (B, Q, D) against per-image labels and encoded targets."""
        device = logits.device
        indices = [(q.to(device), g.to(device)) for q, g in self.matcher(logits, boxes, labels, targets)]
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        matched_labels = torch.cat([t[g] for t, (_, g) in zip(labels, indices)])
        matched_targets = torch.cat([t[g] for t, (_, g) in zip(targets, indices)])
        return self.losses(logits, boxes, batch_idx, query_idx, matched_labels, matched_targets, num_boxes, prefix)

    def denoising_losses(self, dn):
        """The denoising queries' losses at every layer: positives are their own targets, the rest background."""
        q = dn.queries
        positive = q.valid & (q.labels < self.num_classes)  # (B, P)
        batch_idx, query_idx = positive.nonzero(as_tuple=True)
        labels = q.labels[batch_idx, query_idx]
        num_boxes = num_boxes_across_ranks([labels], dn.logits.device)
        targets = q.targets[batch_idx, query_idx]
        L = dn.logits.shape[0]
        losses = {}
        for layer in range(L) if self.aux_loss else [L - 1]:
            prefix = "dn." if layer == L - 1 else f"d{layer}.dn."
            losses.update(self.losses(dn.logits[layer], dn.boxes[layer], batch_idx, query_idx, labels, targets,
                                      num_boxes, prefix, q.valid))
        return losses

    def losses(self, logits, boxes, batch_idx, query_idx, labels, targets, num_boxes, prefix, valid=None):
        """Class loss over all queries (only where `valid` (B, Q), when given) and the coder's box losses of the
        queries (batch_idx, query_idx) against their `labels` and encoded `targets` (M, D)."""
        losses = {prefix + "loss_cls": self.classification(logits, batch_idx, query_idx, labels, num_boxes, valid)}
        for name, value in self.coder.losses(boxes[batch_idx, query_idx], targets, num_boxes).items():
            losses[prefix + name] = value
        return losses

    def classification(self, logits, batch_idx, query_idx, labels, num_boxes, valid):
        if self.class_loss == "focal":
            onehot = torch.zeros_like(logits)  # (B, Q, K): all background ...
            onehot[batch_idx, query_idx, labels] = 1.0  # ... except each assigned query's class
            if valid is None:
                return sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, num_boxes)
            loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma) * valid[..., None]
            return loss.sum() / num_boxes
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx, query_idx] = labels
        class_weight = logits.new_ones(self.num_classes + 1)
        class_weight[-1] = self.no_object_weight  # down-weights the many unmatched (no-object) queries
        if valid is None:
            return F.cross_entropy(logits.transpose(1, 2), classes, class_weight)
        ce = F.cross_entropy(logits.transpose(1, 2), classes, class_weight, reduction="none")  # (B, Q)
        return (ce * valid).sum() / (class_weight[classes] * valid).sum().clamp(min=1e-6)

    @torch.no_grad()
    def cardinality(self, logits, labels):
        """Mean |number of predicted objects - number of targets| per image of the last layer."""
        if self.class_loss == "focal":
            count = (logits.sigmoid().amax(-1) > 0.5).sum(1)
        else:
            count = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        expected = torch.tensor([len(t) for t in labels], device=logits.device)
        return (count.float() - expected.float()).abs().mean()
