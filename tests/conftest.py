"""Shared fixtures. `synth_root`: a small synthetic nuScenes set (v1.0-mini format), built once per
parameter set and code version and cached on disk, so pytest-xdist workers and later runs reuse it."""

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import bev3d

# 2 mini_train + 2 mini_val scenes, 4 key frames each, small images: every class in both splits. The rig's
# original look (each class in its own colour), which the model tests' thresholds were set on.
SYNTH_PARAMS = {"seed": 0, "train_scenes": 2, "val_scenes": 2, "samples_per_scene": 4, "image_size": (480, 270),
                "style": "fixed"}
# The default look: one random style (and image size) per scene.
RANDOM_SYNTH_PARAMS = {"seed": 1, "train_scenes": 1, "val_scenes": 2, "samples_per_scene": 4, "style": "random",
                       "style_seed": 7}


def _code_hash():
    pkg = Path(bev3d.__file__).parent
    h = hashlib.sha1()
    for path in sorted((pkg / "data" / "synthetic").rglob("*.py")) + [pkg / "geometry.py", pkg / "constants.py"]:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def build_cached_synth(params=SYNTH_PARAMS):
    """Path of a synthetic set for `params`, written on first use (temp dir + atomic rename, file lock)."""
    from bev3d.data.synthetic import write_synthetic_nuscenes

    key = hashlib.sha1(json.dumps([params, _code_hash()], sort_keys=True).encode()).hexdigest()[:16]
    base = Path(os.environ.get("BEV3D_TEST_CACHE", Path(tempfile.gettempdir()) / "bev3d-test-synth"))
    root = base / key
    if (root / ".complete").exists():
        return root
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(dir=base, prefix=f"{key}.tmp"))
            try:
                write_synthetic_nuscenes(tmp, workers=1, **params)
                (tmp / ".complete").touch()
                shutil.rmtree(root, ignore_errors=True)
                os.replace(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return root


@pytest.fixture(scope="session")
def synth_root():
    """Root of the shared synthetic set (read-only: copy it before modifying anything)."""
    return build_cached_synth()


@pytest.fixture(scope="session")
def random_synth_root():
    """Root of a small random-style synthetic set (read-only)."""
    return build_cached_synth(RANDOM_SYNTH_PARAMS)
