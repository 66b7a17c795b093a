"""Multi-scale deformable attention (Deformable DETR), with a pure-PyTorch reference.

Shapes: value (B, S, M, D), spatial_shapes (L, 2) as (H, W), level_start_index (L,),
sampling_locations (B, Q, M, L, P, 2) as normalised (x, y), attention_weights (B, Q, M, L, P)
-> output (B, Q, M*D). A location samples bilinearly with pixel centres at (i + 0.5) / W and
zeros outside the map, exactly like grid_sample(align_corners=False, padding_mode="zeros").

One dtype rule for every caller and backend (autocast included, where softmax hands over float32
weights next to a float16/bfloat16 value): the weights take value's dtype, the locations too, except
that float16/bfloat16 values take float32 locations (bf16 resolves only 1/256 of the map width near x = 1).
"""

import warnings

import torch
import torch.nn.functional as F

from bev3d.ops import build

BACKENDS = ("auto", "reference", "cpu", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": _FLOAT_DTYPES}

_MAX_SIDE = 1 << 27  # the CUDA kernel keeps H in an int beside a 4-bit corner mask

_warned_fallback = False


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   backend="auto"):
    """Multi-scale deformable attention -> (B, Q, M*D).

    backend: "auto" takes the compiled kernel for the tensors' device when it is available
    (else the reference, with one warning per process), "reference" is pure PyTorch, "cpu"/"cuda"
    insist on the compiled kernel and raise if it cannot be used. ONNX export always takes the
    reference: its GridSample is a standard ONNX operator, the kernels are not.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    args = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    device = value.device.type
    if backend == "reference" or torch.onnx.is_in_onnx_export():
        return _reference(*args)
    if backend == "auto":
        reason = _kernel_unavailable(device, value.dtype)
        if reason is not None:
            _warn_fallback_once(reason)
            return _reference(*args)
    else:
        if device != backend:
            raise ValueError(f"backend={backend!r} needs tensors on a {backend} device, got value on {value.device}")
        reason = _kernel_unavailable(device, value.dtype)
        if reason is not None:
            raise RuntimeError(f"ms_deform_attn backend={backend!r} is unavailable: {reason}")
    return torch.ops.bev3d.ms_deform_attn(*args)


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Pure-PyTorch multi-scale deformable attention (grid_sample based; autograd by PyTorch)."""
    return _reference(*_check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights))


def _reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    _check_levels(shapes, starts, S)  # read on the host anyway, also when the tensors live on a GPU
    grids = (2 * sampling_locations - 1).to(value.dtype)  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, ((H, W), start) in enumerate(zip(shapes, starts)):
        v = value[:, start:start + H * W].permute(0, 2, 3, 1).reshape(B * M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=-2).flatten(-2)  # (B*M, D, Q, L*P)
    attn = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    out = (sampled * attn).sum(-1).view(B, M * D, Q)
    return out.transpose(1, 2).contiguous()  # (B, Q, M*D)


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Validate shapes, dtypes and devices; return the five tensors contiguous, in the dtypes of the rule above."""
    named = dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                 sampling_locations=sampling_locations, attention_weights=attention_weights)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"value must have shape (B, S, M, D), got {tuple(value.shape)}")
    B, S, M, D = value.shape
    if value.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"value must be float16/bfloat16/float32/float64, got {value.dtype}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must have shape (L, 2) as (H, W), got {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if level_start_index.shape != (L,):
        raise ValueError(f"level_start_index must have shape (L,) = ({L},), got {tuple(level_start_index.shape)}")
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int64 (or int32), got {named[name].dtype}")
    loc_shape = tuple(sampling_locations.shape)
    if len(loc_shape) != 6 or loc_shape[0] != B or loc_shape[2] != M or loc_shape[3] != L or loc_shape[5] != 2:
        raise ValueError(f"sampling_locations must have shape (B, Q, M, L, P, 2) = ({B}, Q, {M}, {L}, P, 2), "
                         f"got {tuple(sampling_locations.shape)}")
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    if attention_weights.shape != (B, Q, M, L, P):
        raise ValueError(f"attention_weights must have shape (B, Q, M, L, P) = ({B}, {Q}, {M}, {L}, {P}), "
                         f"got {tuple(attention_weights.shape)}")
    for name in ("sampling_locations", "attention_weights"):
        if not named[name].is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (it is cast to value's dtype), "
                             f"got {named[name].dtype}")
    for name, t in named.items():
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}; put all inputs on one device")
    # Read on the host only where that is free: on a GPU it would synchronise every call (and break CUDA
    # graph capture), so the CUDA kernel checks the levels it reads on the device instead.
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_levels(spatial_shapes.tolist(), level_start_index.tolist(), S)
    loc_dtype = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    return (value.contiguous(), spatial_shapes.long().contiguous(), level_start_index.long().contiguous(),
            sampling_locations.to(loc_dtype).contiguous(), attention_weights.to(value.dtype).contiguous())


def _check_levels(shapes, starts, S):
    """shapes [[H, W], ...] and starts [int, ...] (host lists) against S; the kernels index value with them."""
    expected, total = [], 0
    for h, w in shapes:
        if not (1 <= h < _MAX_SIDE and 1 <= w < _MAX_SIDE):
            raise ValueError(f"spatial_shapes must hold (H, W) with 1 <= H, W < 2^27 per level, got {shapes}")
        expected.append(total)
        total += h * w
    if total != S:
        raise ValueError(f"spatial_shapes {shapes} cover sum(H*W) = {total} positions but value has S = {S} "
                         f"(value must have shape (B, sum(H*W), M, D))")
    if starts != expected:
        raise ValueError(f"level_start_index must be the exclusive cumulative sum of H*W, {expected}, got {starts}")


def _kernel_unavailable(device, dtype):
    """None when the compiled kernel can run on `device` with `dtype`, else the reason it cannot."""
    if device not in _KERNEL_DTYPES:
        return f"no compiled kernel for device type {device!r}"
    if dtype not in _KERNEL_DTYPES[device]:
        return f"the {device} kernel does not support {dtype}"
    return build.unavailable_reason(device)


def _warn_fallback_once(reason):
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"bev3d.ops.ms_deform_attn: using the slow PyTorch reference ({reason}). "
                      f"Run `bev3d build-ops --verbose` to see why the kernel is missing.", stacklevel=3)

