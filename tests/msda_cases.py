"""Inputs, the float64 reference and tolerances shared by the ms_deform_attn tests (real and emulated kernels)."""

import contextlib
import math

import torch

from bev3d.ops import ms_deform_attn_reference

TINY_LEVELS = [(6, 4), (3, 2)]
THIN_LEVELS = [(1, 5), (4, 1), (2, 3)]  # H or W = 1
MIXED_LEVELS = TINY_LEVELS + [(13, 21)] + THIN_LEVELS

# Relative error allowed against the float64 reference evaluated on the inputs the kernel got: the
# accumulation dtype's error, and for float16/bfloat16 one final rounding to the dtype (unit roundoff
# 2^-11 and 2^-8), with a factor 2 of margin.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
HALF = (torch.float16, torch.bfloat16)


def make_inputs(levels, B=1, M=2, D=3, Q=2, P=2, dtype=torch.float64, device="cpu", seed=0):
    """Random inputs whose sampling points lie >= 1/4 px from the bilinear kinks and partly off the map."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    L = len(levels)
    value = torch.randn(B, int(areas.sum()), M, D, generator=g, dtype=torch.float64)
    size = shapes.flip(1).to(torch.float64)  # (L, 2) as (W, H), matching (x, y)
    # Pixel coordinate x*W - 0.5 = k + f: k in [-2, W] puts some points partly or fully outside,
    # f in [1/4, 3/4] keeps them 1/4 px away from the kinks of bilinear interpolation.
    k = torch.floor(torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (size[:, None] + 3)) - 2
    f = 0.25 + 0.5 * torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64)
    loc = (k + f + 0.5) / size[:, None]
    weights = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64)
    return (value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device, dtype),
            weights.to(device, dtype))


def kernel_inputs(inputs64, dtype, device="cpu"):
    """The inputs as a kernel in `dtype` gets them: value and weights rounded to dtype, locations in
    float32 for float16/bfloat16 (what the op computes with) and in dtype otherwise."""
    value, shapes, starts, loc, weights = inputs64
    loc_dtype = torch.float32 if dtype in HALF else dtype
    return (value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device, loc_dtype),
            weights.to(device, dtype))


def grad_output_like(out_shape, dtype, seed=1):
    return torch.randn(out_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def reference_with_grads(inputs, grad_out):
    """The float64 reference on exactly `inputs` (upcast, so their rounding is part of the reference)."""
    return run_with_grads(ms_deform_attn_reference, [t.cpu().double() if t.is_floating_point() else t.cpu()
                                                     for t in inputs], grad_out.cpu().double())


def naive_msda(value, shapes, starts, loc, weights):
    """Loop-by-loop bilinear sampling in float64, independent of grid_sample."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = torch.zeros(B, Q, M, D, dtype=torch.float64)
    for b, q, m, lvl, p in torch.cartesian_prod(*(torch.arange(n) for n in (B, Q, M, L, P))).tolist():
        H, W = shapes[lvl].tolist()
        x = loc[b, q, m, lvl, p, 0].item() * W - 0.5
        y = loc[b, q, m, lvl, p, 1].item() * H - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < H and 0 <= xx < W:
                bilinear = (1 - abs(x - xx)) * (1 - abs(y - yy))
                row = int(starts[lvl]) + yy * W + xx
                out[b, q, m] += weights[b, q, m, lvl, p].double() * bilinear * value[b, row, m].double()
    return out.reshape(B, Q, M * D)


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty / at::empty (kernel outputs included) comes back filled with NaN.

    warn_only: the CUDA backward (atomics) warns instead of raising under deterministic algorithms.
    """
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def run_with_grads(fn, inputs, grad_out=None, grad_out_seed=1):
    """fn(*inputs) and the grads of (value, locations, weights) for grad_out (random when None)."""
    value, shapes, starts, loc, weights = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(value, shapes, starts, loc, weights)
    if grad_out is None:
        grad_out = grad_output_like(out.shape, torch.float64, grad_out_seed)
    grads = torch.autograd.grad(out, (value, loc, weights), grad_out.to(out), allow_unused=True)
    return out, grads


def nonfinite_inputs(dtype=torch.float32, device="cpu"):
    """Inputs with 4 bad points: NaN, +inf and -inf coordinates, and a NaN weight of a point off the map."""
    value, shapes, starts, loc, weights = kernel_inputs(make_inputs(MIXED_LEVELS, B=1, M=2, D=3, Q=5, P=2, seed=9),
                                                        dtype)
    loc[0, 0, 0, 1, 0, 0] = float("nan")
    loc[0, 1, 1, 2, 1, 1] = float("inf")
    loc[0, 2, 0, 0, 1, 0] = -float("inf")
    loc[0, 3, 1, 4, 0] = torch.tensor([1.5, 0.5])  # off the map (level 4 is 4 x 1) ...
    weights[0, 3, 1, 4, 0] = float("nan")  # ... with a NaN weight: the reference's NaN * 0
    return [t.to(device) for t in (value, shapes, starts, loc, weights)]


def check_nonfinite_like_reference(out, grads, out_ref, grads_ref, tol):
    """NaN exactly where the reference has it, except that grid_sample's gradient w.r.t. a non-finite
    coordinate itself is 0 (the other coordinate's is NaN) where the kernels make both NaN."""
    for got, want in ((out, out_ref), (grads[2], grads_ref[2]), (grads[0], grads_ref[0])):
        assert torch.equal(got.cpu().isnan(), want.isnan())
        assert rel_err(got.cpu().nan_to_num(), want.nan_to_num()) < tol
    bad_points = grads_ref[1].isnan().any(-1)
    assert torch.equal(grads[1].cpu().isnan().all(-1), bad_points) and bad_points.sum() == 4
    assert rel_err(grads[1].cpu()[~bad_points], grads_ref[1][~bad_points]) < tol
