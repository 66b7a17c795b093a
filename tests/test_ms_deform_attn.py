"""bev3d.ops.ms_deform_attn: kernels vs a float64 reference, gradients, bad input, CUDA compile check."""

import contextlib
import math
import os
import shutil
import subprocess
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from bev3d.ops import build, ms_deform_attn, ms_deform_attn_reference
from bev3d.ops import deform_attn

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
TINY_LEVELS = [(6, 4), (3, 2)]
THIN_LEVELS = [(1, 5), (4, 1), (2, 3)]  # H or W = 1


@pytest.fixture(scope="session")
def kernels():
    """Builds (or loads the cached) extension once per session; a failed build fails the tests."""
    if os.environ.get("BEV3D_NO_EXT", "") not in ("", "0"):
        pytest.skip("BEV3D_NO_EXT is set")
    reason = build.load_extension()
    assert reason is None, reason


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
    """Every torch.empty / at::empty (kernel outputs included) comes back filled with NaN."""
    prev = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.utils.deterministic.fill_uninitialized_memory = prev[1]


def run_with_grads(fn, inputs, grad_out_seed=1):
    value, shapes, starts, loc, weights = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(value, shapes, starts, loc, weights)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, loc, weights), g.to(out), allow_unused=True)
    return out, grads


def test_poisoning_fills_new_tensors_with_nan():
    with poisoned_outputs():
        assert torch.empty(8).isnan().all()


@pytest.mark.parametrize("levels", [TINY_LEVELS, THIN_LEVELS])
@pytest.mark.parametrize("channels", [1, 3, 33])
def test_reference_matches_naive_loops(levels, channels):
    inputs = make_inputs(levels, D=channels, seed=channels)
    assert rel_err(ms_deform_attn_reference(*inputs), naive_msda(*inputs)) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("levels,Q", [(TINY_LEVELS + [(13, 21)], 40), (THIN_LEVELS, 40), (TINY_LEVELS + [(13, 21)], 1)])
def test_cpu_kernel_matches_float64_reference(kernels, dtype, tol, levels, Q):
    inputs64 = make_inputs(levels, B=2, M=3, D=33, Q=Q, P=3, seed=7)
    out_ref, grads_ref = run_with_grads(ms_deform_attn_reference, inputs64)
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs64]
    with poisoned_outputs():
        out, grads = run_with_grads(lambda *a: ms_deform_attn(*a, backend="cpu"), inputs)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, out_ref) < tol
    for g, g_ref in zip(grads, grads_ref):
        assert not g.isnan().any() and rel_err(g, g_ref) < 10 * tol


def test_cpu_kernel_large_outputs(kernels):
    # Outputs of 4 MiB and more come from the kernel's pool of huge-page buffers, not from at::empty. A
    # recycled buffer still holds the previous call's numbers, so the later calls (unpoisoned) fail if
    # any element is left unwritten.
    for seed, poison in ((11, True), (12, False), (13, False)):
        inputs = make_inputs([(64, 64)], M=2, D=64, Q=4096, P=1, seed=seed)
        out_ref, grads_ref = run_with_grads(ms_deform_attn_reference, inputs)
        with poisoned_outputs() if poison else contextlib.nullcontext():
            out, grads = run_with_grads(lambda *a: ms_deform_attn(*a, backend="cpu"), inputs)
        assert out.nbytes >= 4 << 20 and grads[0].nbytes >= 4 << 20
        assert rel_err(out, out_ref) < 1e-10
        assert all(rel_err(g, g_ref) < 1e-10 for g, g_ref in zip(grads, grads_ref))
        del out, grads


@pytest.mark.parametrize("levels", [TINY_LEVELS, THIN_LEVELS])
@pytest.mark.parametrize("channels", [1, 3, 32, 33, 64])
def test_cpu_gradcheck(kernels, levels, channels):
    value, shapes, starts, loc, weights = make_inputs(levels, D=channels, seed=channels)
    fn = lambda v, lo, w: ms_deform_attn(v, shapes, starts, lo, w, backend="cpu")  # noqa: E731
    args = tuple(t.requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(fn, args, fast_mode=channels > 3)


def test_cpu_backward_is_deterministic(kernels):
    inputs = make_inputs(TINY_LEVELS, B=2, M=2, D=32, Q=64, P=4, dtype=torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            runs.append(run_with_grads(lambda *a: ms_deform_attn(*a, backend="cpu"), inputs)[1])
    finally:
        torch.set_num_threads(threads)
    for grads in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], grads))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_queries(kernels, backend):
    inputs = make_inputs(TINY_LEVELS, Q=0)
    out, (g_value, g_loc, g_w) = run_with_grads(lambda *a: ms_deform_attn(*a, backend=backend), inputs)
    assert out.shape == (1, 0, 2 * 3)
    assert g_loc.shape == (1, 0, 2, 2, 2, 2) and g_w.shape == (1, 0, 2, 2, 2)
    assert g_value is None or torch.equal(g_value, torch.zeros_like(g_value))


def test_non_contiguous_inputs(kernels):
    value, shapes, starts, loc, weights = make_inputs(TINY_LEVELS, B=2, D=8, Q=5, seed=5)
    # Same values, permuted memory: transposes of contiguous tensors of another layout.
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    weights_nc = weights.transpose(1, 4).contiguous().transpose(1, 4)
    shapes_nc = shapes.t().contiguous().t()
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or weights_nc.is_contiguous())
    expected = ms_deform_attn_reference(value, shapes, starts, loc, weights)
    for backend in ("reference", "cpu"):
        out = ms_deform_attn(value_nc, shapes_nc, starts, loc_nc, weights_nc, backend=backend)
        assert rel_err(out, expected) < 1e-12


def test_op_registration_passes_opcheck(kernels):
    value, shapes, starts, loc, weights = make_inputs(TINY_LEVELS, D=4)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    # test_aot_dispatch_dynamic is left out: it compiles, which takes tens of seconds.
    torch.library.opcheck(torch.ops.bev3d.ms_deform_attn.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_auto_falls_back_to_reference_and_warns_once(monkeypatch):
    monkeypatch.setenv("BEV3D_NO_EXT", "1")
    monkeypatch.setattr(deform_attn, "_warned_fallback", False)
    inputs = make_inputs(TINY_LEVELS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ms_deform_attn(*inputs) for _ in range(3)]
    assert len([w for w in caught if "ms_deform_attn" in str(w.message)]) == 1
    assert all(torch.equal(o, ms_deform_attn_reference(*inputs)) for o in outs)
    with pytest.raises(RuntimeError, match="BEV3D_NO_EXT"):
        ms_deform_attn(*inputs, backend="cpu")


def _bad_inputs():
    v, sh, st, loc, w = make_inputs(TINY_LEVELS)
    cases = {
        "value 3-d": ("value", (v[0], sh, st, loc, w)),
        "value int": ("value", (v.long(), sh, st, loc, w)),
        "shapes (L, 3)": ("spatial_shapes", (v, torch.ones(2, 3, dtype=torch.long), st, loc, w)),
        "shapes float": ("spatial_shapes", (v, sh.double(), st, loc, w)),
        "shapes vs S": ("spatial_shapes", (v, torch.tensor([[6, 4], [3, 3]]), st, loc, w)),
        "starts values": ("level_start_index", (v, sh, torch.tensor([0, 23]), loc, w)),
        "starts length": ("level_start_index", (v, sh, st[:1], loc, w)),
        "locations heads": ("sampling_locations", (v, sh, st, loc[:, :, :1], w)),
        "locations last dim": ("sampling_locations", (v, sh, st, torch.cat([loc, loc[..., :1]], -1), w)),
        "locations dtype": ("sampling_locations", (v, sh, st, loc.float(), w)),
        "weights points": ("attention_weights", (v, sh, st, loc, w[..., :1])),
        "weights dtype": ("attention_weights", (v, sh, st, loc, w.float())),
        "mixed devices": ("spatial_shapes", (v.to("meta"), sh, st, loc.to("meta"), w.to("meta"))),
    }
    return [pytest.param(name, args, id=case) for case, (name, args) in cases.items()]


@pytest.mark.parametrize("name,args", _bad_inputs())
def test_bad_input_raises_value_error_naming_the_argument(name, args):
    with pytest.raises(ValueError, match=name):
        ms_deform_attn(*args, backend="reference")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ms_deform_attn(*make_inputs(TINY_LEVELS), backend="triton")


def test_build_ops_command(kernels, capsys):
    assert build.main(Namespace(verbose=False)) == 0
    assert "ready" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    kernel = Path(build.CSRC) / "ms_deform_attn_cuda_kernel.cu"
    cmd = ["nvcc", "-c", str(kernel), "-o", str(tmp_path / "kernel.o"), "-std=c++17", "-O1",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.float16, 1e-2),
                                       (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("channels", [1, 3, 32, 33, 64, 256])
def test_cuda_kernel_matches_float64_reference(kernels, dtype, tol, channels):
    inputs64 = make_inputs(TINY_LEVELS + [(13, 21)] + THIN_LEVELS, B=2, M=3, D=channels, Q=37, P=3, seed=channels)
    out_ref, grads_ref = run_with_grads(ms_deform_attn_reference, inputs64)
    inputs = [t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in inputs64]
    with poisoned_outputs():
        out, grads = run_with_grads(lambda *a: ms_deform_attn(*a, backend="cuda"), inputs)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out.cpu(), out_ref) < tol
    for g, g_ref in zip(grads, grads_ref):
        assert not g.isnan().any() and rel_err(g.cpu(), g_ref) < 10 * tol


@needs_cuda
@pytest.mark.parametrize("levels", [TINY_LEVELS, THIN_LEVELS])
@pytest.mark.parametrize("channels", [1, 3, 32, 33, 64])
def test_cuda_gradcheck(kernels, levels, channels):
    value, shapes, starts, loc, weights = (t.cuda() for t in make_inputs(levels, D=channels, seed=channels))
    fn = lambda v, lo, w: ms_deform_attn(v, shapes, starts, lo, w, backend="cuda")  # noqa: E731
    args = tuple(t.requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(fn, args, fast_mode=channels > 3)


@needs_cuda
def test_cuda_empty_queries(kernels):
    inputs = [t.cuda() for t in make_inputs(TINY_LEVELS, Q=0)]
    out, (g_value, g_loc, _) = run_with_grads(lambda *a: ms_deform_attn(*a, backend="cuda"), inputs)
    assert out.shape == (1, 0, 6) and g_loc.shape[1] == 0
    assert g_value is None or not g_value.any()
