"""Compile and load the ms_deform_attn kernels on first use (torch.utils.cpp_extension, cached).

The CPU variant builds csrc/ms_deform_attn_cpu.cpp only, because a CPU torch wheel has no CUDA
headers; the CUDA variant adds the kernel and its binding when a GPU and CUDA_HOME are present.
The build lands in $TORCH_EXTENSIONS_DIR or ~/.cache/bev3d/, keyed by the torch version, and
is reused by later processes. BEV3D_NO_EXT=1 disables the compiled kernels.
"""

import os
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("ms_deform_attn_cpu.cpp",)
CUDA_SOURCES = ("ms_deform_attn_cuda.cpp", "ms_deform_attn_cuda_kernel.cu")

_error = None  # why the build failed, once it has
_with_cuda = None  # set once loaded


def load_extension(verbose=False):
    """Build (first time) and load the kernels. Returns None on success, else the reason they are unavailable."""
    global _error, _with_cuda
    if os.environ.get("BEV3D_NO_EXT", "") not in ("", "0"):
        return "BEV3D_NO_EXT is set"
    if _with_cuda is not None or _error is not None:
        return _error
    try:
        with_cuda = _build_and_load(verbose)
    except Exception as exc:  # a compiler error, a missing toolchain, a linker error: all mean "no kernel"
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        _error = f"building the C++ extension failed ({type(exc).__name__}: {lines[-1] if lines else ''})"
        return _error
    from bev3d.ops.deform_attn import register_op_impls

    register_op_impls()
    _with_cuda = with_cuda
    return None


def unavailable_reason(device):
    """None when the compiled kernel for `device` ("cpu" or "cuda") is loaded, else why not."""
    reason = load_extension()
    if reason is None and device == "cuda" and not _with_cuda:
        reason = "the extension was built without CUDA (no GPU or no CUDA_HOME when it was built)"
    return reason


def build_directory():
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "bev3d")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return Path(root) / tag


def _build_and_load(verbose):
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    name = "bev3d_ops_cuda" if with_cuda else "bev3d_ops_cpu"
    build_dir = build_directory() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    return with_cuda


def main(args):
    """`bev3d build-ops`: compile the kernels ahead of time and report what was built."""
    reason = load_extension(verbose=getattr(args, "verbose", False))
    if reason is not None:
        print(f"bev3d build-ops: compiled kernels unavailable: {reason}. "
              f"Rerun with --verbose for the compiler output; ms_deform_attn will use the PyTorch reference.")
        return 1
    variant = "CPU + CUDA" if _with_cuda else "CPU only"
    print(f"bev3d build-ops: ms_deform_attn kernels ready ({variant}) in {build_directory()}")
    return 0
