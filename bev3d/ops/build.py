"""Compile and load the ms_deform_attn kernels on first use (torch.utils.cpp_extension, cached).

The CPU variant builds csrc/ms_deform_attn_cpu.cpp only, because a CPU torch wheel has no CUDA
headers; the CUDA variant adds the kernel and its binding when a GPU and CUDA_HOME are present,
and the CPU variant is the fallback when that build fails.
The build lands in $TORCH_EXTENSIONS_DIR or ~/.cache/bev3d/, keyed by the Python and torch versions
and the CPU's ISA level (see _isa), and is reused by later processes. BEV3D_NO_EXT=1 disables the
compiled kernels.
"""

import os
import platform
import sys
from pathlib import Path

import torch

from bev3d.ops import _library

# bev3d/csrc links to the top-level csrc/ so that installed wheels carry the kernel sources too.
CSRC = Path(__file__).resolve().parents[1] / "csrc"
CPU_SOURCES = ("ms_deform_attn_cpu.cpp",)
CUDA_SOURCES = ("ms_deform_attn_cuda.cpp", "ms_deform_attn_cuda_kernel.cu")

_error = None  # why the build failed, once it has
_with_cuda = None  # set once loaded
_cuda_error = None  # why the loaded extension has no CUDA kernel


def load_extension(verbose=False):
    """Build (first time) and load the kernels. Returns None on success, else the reason they are unavailable."""
    global _error, _with_cuda
    if _disabled():
        return "BEV3D_NO_EXT is set"
    if _with_cuda is not None or _error is not None:
        return _error
    try:
        with_cuda = _build_and_load(verbose)
    except Exception as exc:  # a compiler error, a missing toolchain, a linker error: all mean "no kernel"
        _error = f"building the C++ extension failed ({_last_line(exc)})"
        return _error
    _library.register_op_impls()
    _with_cuda = with_cuda
    return None


def _disabled():
    return os.environ.get("BEV3D_NO_EXT", "") not in ("", "0")


def unavailable_reason(device):
    """None when the compiled kernel for `device` ("cpu" or "cuda") is loaded, else why not."""
    reason = load_extension()
    if reason is None and device == "cuda" and not _with_cuda:
        reason = _cuda_error
    return reason


def build_directory():
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "bev3d")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    isa = _isa()
    return Path(root) / (f"{tag}_{isa}" if isa else tag)


def _isa():
    """"x86-64-v3" (AVX2 + FMA) when this CPU has it, else None for the compiler's baseline.

    The kernels' inner loops are 32-channel multiply-adds: AVX2 + FMA makes them about 1.3x faster than
    the SSE2 baseline. The level is part of the build directory, so a cache shared between machines
    never hands an AVX2 build to a CPU without AVX2.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return "x86-64-v3" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else None


def _build_and_load(verbose):
    """Load the CUDA variant when it can be built, else the CPU one; returns whether CUDA is in."""
    global _cuda_error
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        _cuda_error = "no CUDA GPU when the extension was built"
    elif cpp_extension.CUDA_HOME is None:
        _cuda_error = "no CUDA toolkit (CUDA_HOME) when the extension was built"
    else:
        try:
            _load("bev3d_ops_cuda", CPU_SOURCES + CUDA_SOURCES, verbose)
            return True
        except Exception as exc:  # keep the CPU kernel even when nvcc fails
            _cuda_error = f"building the CUDA kernel failed ({_last_line(exc)})"
    _load("bev3d_ops_cpu", CPU_SOURCES, verbose)
    return False


def _load(name, sources, verbose):
    from torch.utils import cpp_extension

    build_dir = build_directory() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=["-O3", "-fopenmp"] + ([f"-march={_isa()}"] if _isa() else []),
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        build_directory=str(build_dir),
        with_cuda=name.endswith("cuda"),
        is_python_module=False,
        verbose=verbose,
    )


def _last_line(exc):
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def main(args):
    """`bev3d build-ops`: compile the kernels ahead of time and report what was built."""
    if _disabled():
        print("bev3d build-ops: nothing to do, BEV3D_NO_EXT is set (ms_deform_attn uses the PyTorch reference).")
        return 0
    reason = load_extension(verbose=getattr(args, "verbose", False))
    if reason is not None:
        print(f"bev3d build-ops: compiled kernels unavailable: {reason}. "
              f"Rerun with --verbose for the compiler output; ms_deform_attn will use the PyTorch reference.")
        return 1
    variant = "CPU + CUDA" if _with_cuda else f"CPU only: {_cuda_error}"
    print(f"bev3d build-ops: ms_deform_attn kernels ready ({variant}) in {build_directory()}")
    return 0
