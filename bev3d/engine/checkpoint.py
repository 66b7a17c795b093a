"""Checkpoints: atomic writes, keep-last-k + best, and loading with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values (model, optimizer, scheduler, scaler, RNG
states, epoch/iter, config), so `torch.load(weights_only=True)` reads it without unpickling objects.
"""

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from bev3d.errors import Bev3dError

LATEST = "latest.pth"
BEST = "best.pth"
_NUMBERED = re.compile(r"^(epoch|iter)_(\d+)\.pth$")


def _write_atomic(path, write):
    """Run `write(file)` on a temporary file beside `path`, fsync it, then `os.replace` it into place:
    an interruption at any point leaves the previous file at `path` intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path, state):
    _write_atomic(path, lambda f: torch.save(state, f))


def _link_atomic(src, dst):
    """Make `dst` the same content as `src` (a hard link when the file system allows it)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise Bev3dError(f"Checkpoint {path} does not exist. Give a file written by `bev3d train` "
                         f"(e.g. WORK_DIR/{LATEST}).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise Bev3dError(f"Checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                         f"The file is damaged or not a bev3d checkpoint; resume from another checkpoint "
                         f"in {path.parent}.") from None


def latest_checkpoint(work_dir):
    """`latest.pth` of a work dir, or the newest numbered checkpoint, or None."""
    work_dir = Path(work_dir)
    if (work_dir / LATEST).is_file():
        return work_dir / LATEST
    numbered = [p for p in work_dir.glob("*.pth") if _NUMBERED.match(p.name)]
    return max(numbered, key=lambda p: p.stat().st_mtime) if numbered else None


class CheckpointManager:
    """Writes `epoch_N.pth` / `iter_N.pth`, points `latest.pth` (and `best.pth` by a metric) at it and
    keeps only the newest `keep_last` numbered files."""

    def __init__(self, work_dir, keep_last, best_metric=None):
        self.work_dir = Path(work_dir)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_value = None
        self.history = []  # numbered files written by this run, oldest first

    def save(self, state, name, metrics=None):
        path = self.work_dir / name
        save_checkpoint(path, state)
        _link_atomic(path, self.work_dir / LATEST)
        value = (metrics or {}).get(self.best_metric)
        if value is not None and (self.best_value is None or value > self.best_value):
            self.best_value = value
            _link_atomic(path, self.work_dir / BEST)
        self.history = [p for p in self.history if p != path] + [path]
        while self.keep_last > 0 and len(self.history) > self.keep_last:
            old = self.history.pop(0)
            if old.exists():
                old.unlink()
        return path

    def state_dict(self):
        return {"best_value": self.best_value, "history": [p.name for p in self.history]}

    def load_state_dict(self, state):
        self.best_value = state.get("best_value")
        self.history = [self.work_dir / n for n in state.get("history", [])]


# ----------------------------------------------------------------------------- RNG states


def rng_state():
    """Python, NumPy and torch (CPU + CUDA) generator states as plain values and tensors."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
