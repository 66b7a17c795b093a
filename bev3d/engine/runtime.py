"""What every engine loop needs: seeds and RNG state, moving a batch to the device, AMP autocast."""

import contextlib
import os
import platform
import random

import numpy as np
import torch

from bev3d.engine.checkpoint import rng_state, set_rng_state
from bev3d.errors import Bev3dError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng():
    """Run a block (evaluation) without moving any RNG the training run depends on."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def to_device(obj, device):
    """Every tensor in a (nested) batch of dicts, lists and tuples moved to `device`; the rest as it is."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def autocast(device, amp):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def cpu_features():
    """{"name", "cores" (usable by this process), "isa" (torch's vector level), "avx512_bf16", "amx"}."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    probe = lambda n: bool(getattr(torch.cpu, n, lambda: False)())  # noqa: E731
    return {"name": name, "cores": cores, "isa": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": probe("_is_avx512_bf16_supported"), "amx": probe("_is_amx_tile_supported")}


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX. Without them the CPU's bf16 kernels convert to float32 and run slower than it."""
    features = cpu_features()
    return features["avx512_bf16"] or features["amx"]


def resolve_amp(amp, device, warn=print):
    """The autocast mode `train.amp` can have on `device` (with a warning where it falls back)."""
    if amp not in AMP_DTYPES:
        raise Bev3dError(f"Config key train.amp is {amp!r}; valid values: off, bf16, fp16.")
    if device.type == "cpu" and amp in ("fp16", "bf16") and not cpu_has_native_bf16():
        warn(f"train.amp={amp}: this CPU has no native bf16 (AVX512-BF16 or AMX), where autocast is slower than "
             f"float32; running in float32 (train.amp=off).")
        return "off"
    if amp == "fp16" and device.type == "cpu":
        warn("train.amp=fp16 needs a CUDA GPU; using bf16 autocast on the CPU instead.")
        return "bf16"
    return amp
