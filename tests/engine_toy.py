"""A tiny model, criterion and data set for the engine tests: they exercise the loop in milliseconds per step.

The data set draws "augmentation" noise from Python, NumPy and torch RNGs and the model has dropout, so
a resume that forgets any RNG state is not bitwise exact.
"""

import os
import random
import signal

import numpy as np
import torch
from torch import nn

from bev3d.config import Config


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n=8, noise=True, interrupt_at=None, nan_from=None):
        self.n = n
        self.noise = noise
        self.interrupt_at = interrupt_at  # send SIGINT to this process on the k-th __getitem__ call
        self.nan_from = nan_from  # targets become NaN from this many calls on
        self.calls = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        y = x.sum(0, keepdim=True) * 0.5 + 1.0
        if self.noise:
            x = x + 0.01 * torch.randn(4) + 0.01 * float(np.random.randn()) + 0.01 * random.random()
        if self.nan_from is not None and self.calls >= self.nan_from:
            y = y * float("nan")
        return {"x": x, "targets": y}


class ToyModel(nn.Module):
    def __init__(self, dropout=0.1):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.query_embed = nn.Parameter(torch.zeros(2, 16))
        self.norm = nn.LayerNorm(16)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(16, 1)
        self.activation_dtypes = set()  # what the first linear layer computed in (autocast shows here)

    def forward(self, batch, targets=None):
        features = self.backbone(batch["x"])
        self.activation_dtypes.add(features.dtype)
        h = self.norm(features + self.query_embed.sum(0))  # (B, 16)
        return self.head(self.dropout(h))  # (B, 1)


class ToyCriterion(nn.Module):
    """The engine's criterion contract: loss terms, their weights, and a logged-only entry."""

    weight_dict = {"loss_mse": 1.0}

    def forward(self, pred, targets):
        return {"loss_mse": ((pred.float() - targets) ** 2).mean(), "num_samples": torch.tensor(float(len(pred)))}

    def weighted(self, losses):
        return {k: self.weight_dict[k] * v for k, v in losses.items() if k in self.weight_dict}


def toy_config(work_dir, **train):
    cfg = Config()
    cfg.work_dir = str(work_dir)
    cfg.data.batch_size = 2
    cfg.data.num_workers = 0
    cfg.eval.interval = 0
    t = cfg.train
    t.max_epochs, t.lr, t.warmup_iters, t.log_interval, t.tensorboard, t.keep_last = 2, 1e-2, 2, 1, False, 10
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def ddp_worker(rank, world_size, port, work_dir, batch_size):
    """One torchrun-like process of a CPU (gloo) data-parallel toy run."""
    from bev3d.engine.distributed import cleanup, init_distributed
    from bev3d.engine.runtime import seed_everything
    from bev3d.engine.train import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = init_distributed()
    try:
        cfg = toy_config(work_dir, max_epochs=1)
        cfg.data.batch_size = batch_size
        seed_everything(cfg.train.seed)
        Trainer(cfg, ToyModel(dropout=0.0), ToyCriterion(), ToyDataset(noise=False), device=device).fit()
    finally:
        cleanup()
