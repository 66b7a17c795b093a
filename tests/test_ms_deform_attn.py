"""bev3d.ops.ms_deform_attn: kernels vs a float64 reference, gradients, bad input, dtype rule, CUDA tests."""

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import types
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bev3d.ops import build, deform_attn, ms_deform_attn, ms_deform_attn_reference
from msda_cases import (HALF, MIXED_LEVELS, THIN_LEVELS, TINY_LEVELS, TOL, check_nonfinite_like_reference,
                        grad_output_like, kernel_inputs, make_inputs, naive_msda, nonfinite_inputs, poisoned_outputs,
                        reference_with_grads, rel_err, run_with_grads)

CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[1]


def needs_cuda(test):
    """Marks a test `cuda` (select with `pytest -m cuda`) and skips it without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="no CUDA GPU")(test))


@pytest.fixture(scope="session")
def kernels():
    """Builds (or loads the cached) extension once per session; a failed build fails the tests."""
    if os.environ.get("BEV3D_NO_EXT", "") not in ("", "0"):
        pytest.skip("BEV3D_NO_EXT is set")
    reason = build.load_extension()
    assert reason is None, reason


class RecordOps(TorchDispatchMode):
    """Records the ops dispatched inside it, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


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


def test_nonfinite_locations_and_weights_give_nan_like_the_reference(kernels):
    inputs = nonfinite_inputs(torch.float64)
    out, grads = run_with_grads(lambda *a: ms_deform_attn(*a, backend="cpu"), inputs)
    out_ref, grads_ref = run_with_grads(ms_deform_attn_reference, inputs)
    check_nonfinite_like_reference(out, grads, out_ref, grads_ref, 1e-10)


def test_weights_and_locations_take_value_dtype():
    # Under CUDA autocast softmax hands over float32 weights next to a bf16 value; bf16 locations
    # would lose most of their sub-pixel precision, so half values keep (or get) float32 locations.
    value, shapes, starts, loc, weights = make_inputs(TINY_LEVELS)
    cases = [(torch.bfloat16, torch.float64, torch.float32, torch.float32),
             (torch.float16, torch.float16, torch.float32, torch.float32),
             (torch.float32, torch.float64, torch.float64, torch.float32),
             (torch.float64, torch.float32, torch.float32, torch.float64)]
    for value_dtype, loc_dtype, weights_dtype, expected_loc in cases:
        args = deform_attn._check_inputs(value.to(value_dtype), shapes, starts, loc.to(loc_dtype),
                                         weights.to(weights_dtype))
        assert (args[3].dtype, args[4].dtype) == (expected_loc, value_dtype)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, loc.float(), weights.float(), backend="reference")
    assert out.dtype == torch.bfloat16


def test_msdeformattn_hands_float32_locations_to_the_op_under_autocast(monkeypatch):
    from bev3d.models.transformer import deformable_transformer

    seen = []

    def spy(value, spatial_shapes, level_start_index, locations, weights, backend="auto"):
        seen.append((value.dtype, locations.dtype))
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=backend)

    monkeypatch.setattr(deformable_transformer, "ms_deform_attn", spy)
    attn = deformable_transformer.MSDeformAttn(embed_dims=16, num_levels=2, num_heads=2, num_points=2,
                                               backend="reference")
    shapes = torch.tensor(TINY_LEVELS)
    starts = torch.tensor([0, 24])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 30, 16), shapes, starts)
    assert seen == [(torch.bfloat16, torch.float32)] and out.shape == (1, 3, 16)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_tolerance_is_met_by_a_kernel_exact_up_to_its_output_rounding(dtype):
    # The CUDA test compares with the reference on the inputs the kernel got (kernel_inputs: float32
    # locations); a kernel that only rounds its outputs to dtype must pass. Against the reference on
    # unrounded inputs, with bf16 locations, the rounding of the inputs alone exceeded the tolerance.
    inputs = kernel_inputs(make_inputs(MIXED_LEVELS, B=2, M=3, D=32, Q=37, P=3, seed=32), dtype)
    grad_out = grad_output_like((2, 37, 96), dtype)
    out_ref, (g_value, g_loc, g_weights) = reference_with_grads(inputs, grad_out)
    for exact, dt in ((out_ref, dtype), (g_value, dtype), (g_loc, torch.float32), (g_weights, dtype)):
        assert rel_err(exact.to(dt), exact) < TOL[dt]


def test_backward_skips_grad_value_when_value_needs_none(kernels):
    value, shapes, starts, loc, weights = make_inputs(TINY_LEVELS, B=2, D=8, Q=5, seed=5)
    grad_out = grad_output_like((2, 5, 16), torch.float64)
    skipped = torch.ops.bev3d.ms_deform_attn_backward(grad_out, value, shapes, starts, loc, weights, False)
    full = torch.ops.bev3d.ms_deform_attn_backward(grad_out, value, shapes, starts, loc, weights)
    assert skipped[0].numel() == 0 and torch.equal(skipped[1], full[1]) and torch.equal(skipped[2], full[2])
    loc, weights = loc.requires_grad_(), weights.requires_grad_()
    with RecordOps() as ops:
        grads = torch.autograd.grad(ms_deform_attn(value, shapes, starts, loc, weights, backend="cpu"),
                                    (loc, weights), grad_out)
    backward_args = [args for func, args in ops.calls if func is torch.ops.bev3d.ms_deform_attn_backward.default]
    assert len(backward_args) == 1 and backward_args[0][6] is False
    grads_ref = torch.autograd.grad(ms_deform_attn_reference(value, shapes, starts, loc, weights), (loc, weights),
                                    grad_out)
    assert all(rel_err(g, g_ref) < 1e-10 for g, g_ref in zip(grads, grads_ref))


def test_op_registration_passes_opcheck(kernels):
    value, shapes, starts, loc, weights = make_inputs(TINY_LEVELS, D=4)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    # test_aot_dispatch_dynamic is left out: it compiles, which takes tens of seconds.
    torch.library.opcheck(torch.ops.bev3d.ms_deform_attn.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_input_checks_read_no_tensor_values_off_the_cpu():
    # On a GPU, reading spatial_shapes on the host would synchronise every call and break CUDA graph
    # capture; the CUDA kernel checks the levels itself. Meta tensors hold no values at all.
    args = deform_attn._check_inputs(*[t.to("meta") for t in make_inputs(TINY_LEVELS)])
    assert all(t.device.type == "meta" for t in args)


@pytest.mark.parametrize("levels,starts,S,message", [
    ([(4, 4)], [0], 15, r"cover sum\(H\*W\) = 16 positions but value has S = 15"),
    ([(2, 3), (2, 2)], [0, 5], 10, "level 1 starts at 5, expected 6"),
    ([(2**27, 1)], [0], 2**27, r"is \(H, W\) = \(134217728, 1\); each side must be in \[1, 2\^27\)"),
], ids=["S short", "start", "H 2^27"])
def test_direct_op_calls_check_the_levels(kernels, levels, starts, S, message):
    # The Python wrapper checks these too, but not while torch.compile traces, and a direct call skips it.
    L = len(levels)
    value = torch.zeros(1, 1, 1, 4).expand(1, S, 1, 4)
    args = (value, torch.tensor(levels), torch.tensor(starts), torch.full((1, 1, 1, L, 1, 2), 0.99),
            torch.ones(1, 1, 1, L, 1))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bev3d.ms_deform_attn(*args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bev3d.ms_deform_attn_backward(torch.zeros(1, 1, 4), *args)


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
    huge = torch.zeros(1, 1, 1, 1, dtype=v.dtype).expand(1, 2**27, 2, 3)  # no memory behind it
    cases = {
        "value 3-d": ("value", (v[0], sh, st, loc, w)),
        "value int": ("value", (v.long(), sh, st, loc, w)),
        "shapes (L, 3)": ("spatial_shapes", (v, torch.ones(2, 3, dtype=torch.long), st, loc, w)),
        "shapes float": ("spatial_shapes", (v, sh.double(), st, loc, w)),
        "shapes vs S": ("spatial_shapes", (v, torch.tensor([[6, 4], [3, 3]]), st, loc, w)),
        "side 2^27": ("spatial_shapes", (huge, torch.tensor([[2**27, 1]]), st[:1], loc[:, :, :, :1], w[:, :, :, :1])),
        "starts values": ("level_start_index", (v, sh, torch.tensor([0, 23]), loc, w)),
        "starts length": ("level_start_index", (v, sh, st[:1], loc, w)),
        "locations heads": ("sampling_locations", (v, sh, st, loc[:, :, :1], w)),
        "locations last dim": ("sampling_locations", (v, sh, st, torch.cat([loc, loc[..., :1]], -1), w)),
        "locations int": ("sampling_locations", (v, sh, st, loc.long(), w)),
        "weights points": ("attention_weights", (v, sh, st, loc, w[..., :1])),
        "weights int": ("attention_weights", (v, sh, st, loc, w.long())),
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


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_ms_deform_attn", REPO / "tools" / "bench_ms_deform_attn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_times_the_peer_only_where_it_runs(monkeypatch):
    bench = _load_benchmark()
    peer = types.ModuleType("torch_ms_deform_attn")
    monkeypatch.setitem(sys.modules, "torch_ms_deform_attn", peer)

    def cpu_less_peer(value, *args):
        raise RuntimeError("ms_deform_attn: no kernel for device cpu")

    peer.ms_deform_attn = cpu_less_peer
    backends, skipped = bench.default_backends("cpu")
    assert "peer" not in backends and "no kernel for device cpu" in skipped["peer"]
    peer.ms_deform_attn = ms_deform_attn_reference
    assert bench.default_backends("cpu") == (["reference", "cpu", "peer"], {})
    monkeypatch.setitem(sys.modules, "torch_ms_deform_attn", None)  # not installed
    backends, skipped = bench.default_backends("cpu")
    assert backends == ["reference", "cpu"] and "not installed" in skipped["peer"]


def test_gpu_tests_carry_the_cuda_marker():
    # `pytest -m cuda` must select them (tools/gpu_check.sh does).
    tests = {name: f for name, f in globals().items() if name.startswith("test_cuda_")}
    unmarked = [name for name, f in tests.items() if "cuda" not in {m.name for m in getattr(f, "pytestmark", [])}]
    assert len(tests) >= 6 and not unmarked, unmarked


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_kernel_compiles_with_nvcc(tmp_path):
    kernel = Path(build.CSRC) / "ms_deform_attn_cuda_kernel.cu"
    cmd = ["nvcc", "-c", str(kernel), "-o", str(tmp_path / "kernel.o"), "-std=c++17", "-O1",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def cuda_inputs_and_reference(dtype, channels, Q=37):
    """Inputs on the GPU as the op gets them and the float64 reference (with grads) on exactly those."""
    inputs = kernel_inputs(make_inputs(MIXED_LEVELS, B=2, M=3, D=channels, Q=Q, P=3, seed=channels), dtype, "cuda")
    grad_out = grad_output_like((2, Q, 3 * channels), dtype).cuda()
    return inputs, grad_out, reference_with_grads(inputs, grad_out)


@needs_cuda
@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels", [1, 3, 32, 33, 64, 256])
def test_cuda_kernel_matches_float64_reference(kernels, dtype, channels):
    inputs, grad_out, (out_ref, grads_ref) = cuda_inputs_and_reference(dtype, channels)
    with poisoned_outputs():
        out, grads = run_with_grads(lambda *a: ms_deform_attn(*a, backend="cuda"), inputs, grad_out)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out.cpu(), out_ref) < TOL[dtype]
    # grad_value and grad_weights are rounded to dtype, grad_locations to the locations' dtype.
    for g, g_ref in zip(grads, grads_ref):
        assert not g.isnan().any() and rel_err(g.cpu(), g_ref) < TOL[g.dtype]


@needs_cuda
@pytest.mark.parametrize("levels", [TINY_LEVELS, THIN_LEVELS])
@pytest.mark.parametrize("channels", [1, 3, 32, 33, 64])
def test_cuda_gradcheck(kernels, levels, channels):
    value, shapes, starts, loc, weights = (t.cuda() for t in make_inputs(levels, D=channels, seed=channels))
    fn = lambda v, lo, w: ms_deform_attn(v, shapes, starts, lo, w, backend="cuda")  # noqa: E731
    args = tuple(t.requires_grad_() for t in (value, loc, weights))
    # grad_value comes from float64 atomics whose order varies: two backwards differ in the last bits.
    assert torch.autograd.gradcheck(fn, args, fast_mode=channels > 3, nondet_tol=1e-12)


@needs_cuda
def test_cuda_empty_queries(kernels):
    inputs = [t.cuda() for t in make_inputs(TINY_LEVELS, Q=0)]
    out, (g_value, g_loc, _) = run_with_grads(lambda *a: ms_deform_attn(*a, backend="cuda"), inputs)
    assert out.shape == (1, 0, 6) and g_loc.shape[1] == 0
    assert g_value is None or not g_value.any()


@needs_cuda
def test_cuda_nonfinite_locations_and_weights_give_nan_like_the_reference(kernels):
    inputs = nonfinite_inputs(torch.float32, "cuda")
    out, grads = run_with_grads(lambda *a: ms_deform_attn(*a, backend="cuda"), inputs)
    out_ref, grads_ref = reference_with_grads(inputs, grad_output_like(out.shape, torch.float64))
    check_nonfinite_like_reference(out, grads, out_ref, grads_ref, TOL[torch.float32])


@needs_cuda
def test_cuda_backward_alerts_nondeterminism_only_for_grad_value(kernels):
    value, shapes, starts, loc, weights = (t.cuda() for t in make_inputs(TINY_LEVELS, D=8, seed=2))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        loc.requires_grad_()
        out = ms_deform_attn(value.requires_grad_(), shapes, starts, loc, weights, backend="cuda")
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
            torch.autograd.grad(out.sum(), (value, loc))
        out = ms_deform_attn(value.detach(), shapes, starts, loc, weights, backend="cuda")
        torch.autograd.grad(out.sum(), loc)  # locations and weights need no atomics
    finally:
        torch.use_deterministic_algorithms(prev)


@needs_cuda
def test_cuda_backward_without_value_grad(kernels):
    inputs, grad_out, (_, grads_ref) = cuda_inputs_and_reference(torch.float32, 32)
    value, shapes, starts, loc, weights = inputs
    loc, weights = loc.requires_grad_(), weights.requires_grad_()
    grads = torch.autograd.grad(ms_deform_attn(value, shapes, starts, loc, weights, backend="cuda"), (loc, weights),
                                grad_out)
    assert rel_err(grads[0].cpu(), grads_ref[1]) < TOL[torch.float32]
    assert rel_err(grads[1].cpu(), grads_ref[2]) < TOL[torch.float32]


@needs_cuda
def test_cuda_calls_do_not_synchronise_and_capture_in_a_cuda_graph(kernels):
    inputs, grad_out, (out_ref, grads_ref) = cuda_inputs_and_reference(torch.float32, 32)
    value, shapes, starts, loc, weights = [t.requires_grad_(t.is_floating_point()) for t in inputs]
    torch.autograd.grad(ms_deform_attn(value, shapes, starts, loc, weights), (value, loc, weights), grad_out)  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ms_deform_attn(value, shapes, starts, loc, weights, backend="cuda")
        torch.autograd.grad(out, (value, loc, weights), grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    args = [t.detach() for t in (value, shapes, starts, loc, weights)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ms_deform_attn(*args, backend="cuda")
        grads = torch.ops.bev3d.ms_deform_attn_backward(grad_out, *args)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), out_ref) < TOL[torch.float32]
    assert all(rel_err(g.cpu(), g_ref) < TOL[torch.float32] for g, g_ref in zip(grads, grads_ref))


@needs_cuda
@pytest.mark.parametrize("amp_dtype", HALF, ids=str)
def test_cuda_autocast_callers_need_no_casts(kernels, amp_dtype):
    # softmax autocasts to float32 on CUDA: the weights reach the op as float32 next to a half value.
    from bev3d.models.heads.detr3d_sampling import sample_multiview
    from bev3d.models.transformer.deformable_transformer import MSDeformAttn

    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dims=32, num_levels=2, num_heads=2, num_points=2, backend="cuda").cuda()
    query, ref_points = torch.randn(2, 5, 32).cuda(), torch.rand(2, 5, 2, 2).cuda()
    value = torch.randn(2, 30, 32).cuda()
    shapes, starts = torch.tensor(TINY_LEVELS).cuda(), torch.tensor([0, 24]).cuda()
    expected = attn(query, ref_points, value, shapes, starts)
    with torch.autocast("cuda", dtype=amp_dtype):
        out = attn(query, ref_points, value, shapes, starts)
    out.float().sum().backward()
    # Loose: the projections around the op run in amp_dtype as well.
    assert out.dtype == amp_dtype and rel_err(out.float().cpu(), expected.cpu()) < 10 * TOL[amp_dtype]
    feats = [torch.randn(1, 2, 8, 8, 12).cuda(), torch.randn(1, 2, 8, 4, 6).cuda()]
    locations, weights = torch.rand(1, 2, 7, 2).cuda(), torch.rand(1, 7, 2, 2).cuda()
    expected = sample_multiview(feats, locations, weights)
    with torch.autocast("cuda", dtype=amp_dtype):
        out = sample_multiview([f.to(amp_dtype) for f in feats], locations, weights)
    assert rel_err(out.float().cpu(), expected.cpu()) < 2 * TOL[amp_dtype]
