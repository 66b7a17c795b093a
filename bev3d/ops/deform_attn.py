"""Multi-scale deformable attention (Deformable DETR), with a pure-PyTorch reference.

Shapes: value (B, S, M, D), spatial_shapes (L, 2) as (H, W), level_start_index (L,),
sampling_locations (B, Q, M, L, P, 2) as normalised (x, y), attention_weights (B, Q, M, L, P)
-> output (B, Q, M*D). A location samples bilinearly with pixel centres at (i + 0.5) / W and
zeros outside the map, exactly like grid_sample(align_corners=False, padding_mode="zeros").
"""

import warnings

import torch
import torch.nn.functional as F

from bev3d.ops import build

BACKENDS = ("auto", "reference", "cpu", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": _FLOAT_DTYPES}

_warned_fallback = False


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   backend="auto"):
    """Multi-scale deformable attention -> (B, Q, M*D).

    backend: "auto" takes the compiled kernel for the tensors' device when it is available
    (else the reference, with one warning per process), "reference" is pure PyTorch, "cpu"/"cuda"
    insist on the compiled kernel and raise if it cannot be used.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    args = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    device = value.device.type
    if backend == "reference":
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
    """Validate shapes, dtypes and devices; return the five tensors made contiguous."""
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
    if attention_weights.dtype != value.dtype:
        raise ValueError(f"attention_weights must have value's dtype {value.dtype}, got {attention_weights.dtype}")
    low_precision = value.dtype in (torch.float16, torch.bfloat16)
    if sampling_locations.dtype != value.dtype and not (low_precision and sampling_locations.dtype == torch.float32):
        raise ValueError(f"sampling_locations must have value's dtype {value.dtype} (or float32 when value is "
                         f"float16/bfloat16), got {sampling_locations.dtype}")
    for name, t in named.items():
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}; put all inputs on one device")
    if not torch.compiler.is_compiling():
        _check_levels(spatial_shapes, level_start_index, S)
    return (value.contiguous(), spatial_shapes.long().contiguous(), level_start_index.long().contiguous(),
            sampling_locations.contiguous(), attention_weights.contiguous())


def _check_levels(spatial_shapes, level_start_index, S):
    # Needs the values on the host: the kernels index value with them, so a mismatch would read out of bounds.
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    expected, total = [], 0
    for h, w in shapes:
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes must hold positive (H, W) per level, got {shapes}")
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


def register_op_impls():
    """Fake (meta) and autograd implementations of the compiled bev3d::ms_deform_attn op.

    Called once, right after the compiled library defined the op schema.
    """
    @torch.library.register_fake("bev3d::ms_deform_attn")
    def _fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, _, M, D = value.shape
        return value.new_empty((B, sampling_locations.shape[1], M * D))

    @torch.library.register_fake("bev3d::ms_deform_attn_backward")
    def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.bev3d.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return grad_value, None, None, grad_loc, grad_attn

    torch.library.register_autograd("bev3d::ms_deform_attn", backward, setup_context=setup_context)
