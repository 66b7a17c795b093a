"""torchvision's kernels where torchvision imports: the CUDA paths of DCNv2 (models/backbones/dcn.py) and RoIAlign
(ops/roi_align.py), whose own pure-PyTorch paths serve everywhere else."""

import functools

import torch

from bev3d.errors import Bev3dError

BACKENDS = ("auto", "torchvision", "torch")


@functools.cache
def torchvision_op(name):
    """torchvision.ops.<name>, or None where torchvision does not import."""
    try:
        import torchvision.ops
    except Exception:  # a torchvision built for another torch fails with RuntimeError or OSError, not ImportError
        return None
    return getattr(torchvision.ops, name)


def check_backend(backend, what):
    """Raise Bev3dError for a `backend` that is not one of BACKENDS; `what` names the operation."""
    if backend not in BACKENDS:
        raise Bev3dError(f"{what} backend must be one of {BACKENDS}, got {backend!r}.")


def torchvision_backend(name, backend, what):
    """torchvision's op `name` for `backend` ("auto": where it imports, else None; "torchvision": an error where it
    does not; "torch": None)."""
    check_backend(backend, what)
    op = torchvision_op(name) if backend != "torch" else None
    if backend == "torchvision" and op is None:
        raise Bev3dError(f"{what} backend 'torchvision' needs torchvision built for this torch ({torch.__version__}); "
                         f"install the matching pair or use backend 'torch'.")
    return op
