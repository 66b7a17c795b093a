"""Training log: a console line every N iterations, a tqdm bar on a terminal, TensorBoard scalars and a
JSONL file (`log.jsonl`, one record per logged iteration or evaluation). Only rank 0 logs."""

import json
import re
import resource
import sys
import time
from pathlib import Path

import torch

_AUX = re.compile(r"d\d+\.")


def memory_mb(device):
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process' peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _format_eta(seconds):
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class TrainLogger:
    def __init__(self, work_dir, total_iters, log_interval, enabled, start_iter=0, tensorboard=True):
        self.enabled = enabled
        self.total_iters = total_iters
        self.log_interval = max(1, log_interval)
        self.window_start = (time.perf_counter(), start_iter)
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        work_dir = Path(work_dir)
        self.jsonl = open(work_dir / "log.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work_dir / "tb"))
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, dynamic_ncols=True, leave=False)

    def print(self, text, err=False):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr if err else sys.stdout)
        else:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)

    def warn(self, text):
        self.print(f"WARNING: {text}", err=True)

    def _record(self, record):
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def step(self, it, epoch, losses, lr, grad_norm, device):
        """Called after optimizer step `it` (1-based); `losses` are already averaged over ranks."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        if it % self.log_interval and it != self.total_iters:
            return
        now = time.perf_counter()
        t0, it0 = self.window_start
        its = (it - it0) / max(now - t0, 1e-9)
        self.window_start = (now, it)
        eta = (self.total_iters - it) / max(its, 1e-9)
        mem = memory_mb(device)
        record = {"mode": "train", "iter": it, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                  "it_per_s": its, "memory_mb": mem, **losses}
        self._record(record)
        if self.tb is not None:
            for k, v in losses.items():
                self.tb.add_scalar(f"train/{k}", v, it)
            self.tb.add_scalar("train/lr", lr, it)
            self.tb.add_scalar("train/grad_norm", grad_norm, it)
            self.tb.add_scalar("train/it_per_s", its, it)
        # the console shows the last decoder layer's terms (aux-layer `d<i>.` terms go to the files only)
        loss_text = "  ".join(f"{k} {v:.4f}" for k, v in losses.items() if not _AUX.match(k))
        self.print(f"epoch {epoch} iter {it}/{self.total_iters}  {loss_text}  lr {lr:.3e}  "
                   f"grad_norm {grad_norm:.3f}  {its:.2f} it/s  eta {_format_eta(eta)}  mem {mem:.0f}M")

    def evaluation(self, it, epoch, metrics):
        if not self.enabled:
            return
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._record({"mode": "eval", "iter": it, "epoch": epoch, **scalars})
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"eval/{k}", v, it)
        shown = {k: v for k, v in scalars.items() if not k.startswith("AP_")}  # per-class APs: files only
        self.print(f"epoch {epoch} iter {it} eval: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
