"""AdamW with parameter groups and the per-iteration warm-up + cosine learning-rate schedule."""

import math

import torch
from torch import nn

_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def param_groups(model, lr, backbone_lr_mult, weight_decay):
    """Split trainable parameters into (backbone?, decay?) groups.

    Backbone parameters are those whose name starts with `backbone.`. Biases, 1-D parameters, norm
    layers and embeddings (nn.Embedding, or a bare parameter attribute named `*embed*`) get no weight decay:
    decaying them only shrinks scales/offsets the network needs, as in DETR and PETR's recipes.
    """
    groups = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            backbone = full.startswith("backbone.")
            decay = not (p.ndim <= 1 or isinstance(module, _NO_DECAY_MODULES) or "embed" in name)
            key = ("backbone" if backbone else "head") + ("" if decay else "_no_decay")
            group = groups.setdefault(key, {
                "name": key,
                "params": [],
                "lr": lr * (backbone_lr_mult if backbone else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            })
            group["params"].append(p)
    return [groups[k] for k in ("head", "head_no_decay", "backbone", "backbone_no_decay") if k in groups]


def build_optimizer(model, train_cfg):
    groups = param_groups(model, train_cfg.lr, train_cfg.backbone_lr_mult, train_cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def lr_factor(it, total_iters, warmup_iters, warmup_ratio, min_lr_ratio):
    """Multiplier of the base lr at optimizer step `it` (0-based): linear warm-up from `warmup_ratio`
    to 1 over `warmup_iters`, then cosine from 1 down to `min_lr_ratio` at `total_iters`."""
    if it < warmup_iters:
        return warmup_ratio + (1.0 - warmup_ratio) * it / warmup_iters
    span = max(1, total_iters - warmup_iters)
    progress = min(1.0, (it - warmup_iters) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets every group's lr from its `initial_lr` before each optimizer step. The state is one
    integer, so a checkpoint holds no callable."""

    def __init__(self, optimizer, total_iters, warmup_iters, warmup_ratio, min_lr_ratio):
        self.optimizer = optimizer
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.iter = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def _apply(self):
        f = lr_factor(self.iter, self.total_iters, self.warmup_iters, self.warmup_ratio, self.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f

    def step(self):
        self.iter += 1
        self._apply()

    def state_dict(self):
        return {"iter": self.iter}

    def load_state_dict(self, state):
        self.iter = int(state["iter"])
        self._apply()


def build_scheduler(optimizer, train_cfg, total_iters):
    return WarmupCosine(optimizer, total_iters, train_cfg.warmup_iters, train_cfg.warmup_ratio,
                        train_cfg.min_lr_ratio)
