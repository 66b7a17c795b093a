"""The CUDA kernels, executed without a GPU: csrc/ms_deform_attn_cuda_kernel.cu compiled unmodified as host
C++20 against the shim in csrc/emu (tests/msda_emulator.py), run under AddressSanitizer and UBSan and
compared with the float64 reference on the inputs the kernel got. Shuffles abort unless all 32 lanes take
part with a full mask; the "sm90" build takes the float2/float4 atomics. Marked slow; `make test` runs it.
"""

import pytest
import torch

import msda_emulator
from msda_cases import (MIXED_LEVELS, TOL, check_nonfinite_like_reference, grad_output_like, kernel_inputs,
                        make_inputs, nonfinite_inputs, reference_with_grads, rel_err)

pytestmark = pytest.mark.slow

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# The plain build runs the launcher's own grid, the sm90 build one block, whose 8 warps then loop
# over all warp items in the grid-stride loops.
GRID = {"plain": 0, "sm90": 1}
ARCHS = list(GRID)


@pytest.fixture(scope="module")
def emulator():
    compiler, reason = msda_emulator.find_compiler()
    if compiler is None:
        pytest.skip(reason)
    return msda_emulator.build(compiler)


def run_case(exe, inputs, grad_out, tmp_path, **options):
    result = msda_emulator.run(exe, msda_emulator.Case(*inputs, grad_out, **options), tmp_path)
    assert isinstance(result, msda_emulator.Result), f"the emulated kernel failed:\n{result.stderr[-6000:]}"
    return result


def check_against_reference(emulator, arch, inputs64, dtype, tmp_path, **options):
    """Runs forward and backward and compares every output with the float64 reference."""
    inputs = kernel_inputs(inputs64, dtype)
    B, Q, M, D = inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2], inputs[0].shape[3]
    grad_out = grad_output_like((B, Q, M * D), dtype)
    result = run_case(emulator[arch], inputs, grad_out, tmp_path, grid_blocks=GRID[arch], **options)
    out_ref, (g_value, g_loc, g_weights) = reference_with_grads(inputs, grad_out)
    acc = inputs[3].dtype  # locations arrive in the accumulation dtype
    checks = [("out", result.out, out_ref, TOL[dtype]), ("grad_locations", result.grad_locations, g_loc, TOL[acc]),
              ("grad_weights", result.grad_weights, g_weights, TOL[dtype])]
    if options.get("compute_grad_value", True):
        checks.append(("grad_value", result.grad_value, g_value, TOL[acc]))
    for name, got, want, tol in checks:
        assert not got.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert rel_err(got, want) < tol, f"{name}: rel. error {rel_err(got, want):.2e} >= {tol:.0e}"
    return result


def vector_atomics(result):
    return result.backward_stats["float2_atomics"] + result.backward_stats["float4_atomics"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [1, 3, 32, 33, 64, 260])
def test_kernels_match_float64_reference(emulator, arch, dtype, channels, tmp_path):
    # Six levels, among them H = 1 and W = 1 levels; D = 260 takes several channel tiles of a warp.
    inputs64 = make_inputs(MIXED_LEVELS, B=2, M=3, D=channels, Q=4, P=3, seed=channels)
    result = check_against_reference(emulator, arch, inputs64, dtype, tmp_path)
    # Channels come in vectors of 16 bytes at most (4 float32 of grad_value), so D % 4 == 0 vectorises.
    if arch == "sm90" and dtype != torch.float64 and channels % 4 == 0:
        assert vector_atomics(result) > 0 and result.backward_stats["scalar_atomics"] == 0
    else:
        assert vector_atomics(result) == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_than_32_points(emulator, arch, dtype, tmp_path):
    # L * P = 42 points: a warp prepares them in two rounds of 32.
    check_against_reference(emulator, arch, make_inputs(MIXED_LEVELS, B=1, M=2, D=32, Q=3, P=7, seed=4), dtype,
                            tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,value_offset,grad_out_offset,sm90_atomic", [
    (torch.float32, 1, 0, None),  # 4-byte aligned value: scalar loads and atomics
    (torch.float32, 2, 0, "float2_atomics"),  # 8-byte aligned: 2-channel vectors
    (torch.float16, 2, 0, "float2_atomics"),
    (torch.bfloat16, 0, 4, "float4_atomics"),  # only grad_output is a view; 8-byte aligned
    (torch.float64, 1, 1, None),
], ids=["f32+1", "f32+2", "f16+2", "bf16-grad+4", "f64+1"])
def test_misaligned_views(emulator, arch, dtype, value_offset, grad_out_offset, sm90_atomic, tmp_path):
    inputs64 = make_inputs(MIXED_LEVELS, B=1, M=2, D=32, Q=3, P=2, seed=6)
    result = check_against_reference(emulator, arch, inputs64, dtype, tmp_path, value_offset=value_offset,
                                     grad_output_offset=grad_out_offset)
    if arch == "sm90" and sm90_atomic:
        assert result.backward_stats[sm90_atomic] > 0
    else:
        assert vector_atomics(result) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_queries(emulator, arch, tmp_path):
    inputs = kernel_inputs(make_inputs(MIXED_LEVELS, B=2, M=3, D=8, Q=0, P=2), torch.float32)
    result = run_case(emulator[arch], inputs, grad_output_like((2, 0, 24), torch.float32), tmp_path)
    assert result.out.shape == (2, 0, 24) and result.grad_locations.shape[1] == 0
    assert not result.grad_value.any()
    assert result.forward_stats["meetings"] == result.backward_stats["meetings"] == 0  # nothing launched


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_one_of_everything(emulator, arch, dtype, tmp_path):
    check_against_reference(emulator, arch, make_inputs([(3, 5)], B=1, M=1, D=1, Q=1, P=1, seed=2), dtype, tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_without_grad_value_writes_no_atomics(emulator, arch, tmp_path):
    result = check_against_reference(emulator, arch, make_inputs(MIXED_LEVELS, B=1, M=2, D=32, Q=3, P=2, seed=8),
                                     torch.float32, tmp_path, compute_grad_value=False)
    assert result.grad_value.numel() == 0
    assert result.backward_stats["scalar_atomics"] == vector_atomics(result) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_nonfinite_locations_and_weights_give_nan_like_the_reference(emulator, arch, tmp_path):
    inputs = nonfinite_inputs()
    grad_out = grad_output_like((1, 5, 6), torch.float32)
    result = run_case(emulator[arch], inputs, grad_out, tmp_path)
    out_ref, grads_ref = reference_with_grads(inputs, grad_out)
    grads = (result.grad_value, result.grad_locations, result.grad_weights)
    check_nonfinite_like_reference(result.out, grads, out_ref, grads_ref, TOL[torch.float32])


@pytest.mark.parametrize("levels,starts,S", [
    ([(4, 4)], [0], 15),  # value is one row shorter than the levels
    ([(2, 3), (2, 2)], [0, 5], 10),  # level 1 starts inside level 0
    ([(2, 3), (2, 2)], [0, 6], 11),  # level 1 ends before S
    ([(2**27, 1)], [0], 2**27),  # H too large for the shuffled (H << 4 | corner mask) word
], ids=["S short", "start inside", "S long", "H 2^27"])
def test_level_table_is_checked_on_the_device(emulator, levels, starts, S, tmp_path):
    L = len(levels)
    value = torch.zeros(1, 1, 1, 4).expand(1, S, 1, 4)
    inputs = (value, torch.tensor(levels), torch.tensor(starts), torch.full((1, 1, 1, L, 1, 2), 0.99),
              torch.ones(1, 1, 1, L, 1))
    # A buffer of one row: with the level check missing, AddressSanitizer would report the reads instead.
    case = msda_emulator.Case(*inputs, torch.ones(1, 1, 4), value_missing_rows=S - 1)
    result = msda_emulator.run(emulator["plain"], case, tmp_path)
    assert not isinstance(result, msda_emulator.Result)
    assert "spatial_shapes/level_start_index do not match value" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_out_of_bounds_read_is_caught(emulator, arch, tmp_path):
    # The sizes are consistent, but value's buffer lacks its last row, which location 0.99 reads.
    value, shapes, starts, loc, weights = kernel_inputs(make_inputs([(4, 4)], B=1, M=1, D=4, Q=1, P=1), torch.float32)
    case = msda_emulator.Case(value, shapes, starts, torch.full_like(loc, 0.99), weights, torch.ones(1, 1, 4),
                              value_missing_rows=1)
    result = msda_emulator.run(emulator[arch], case, tmp_path)
    assert not isinstance(result, msda_emulator.Result)
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr, result.stderr[-3000:]
    assert "ms_deform_attn_cuda_kernel.cu" in result.stderr


@pytest.mark.parametrize("name,message", [
    ("divergent", "divergent lanes"),
    ("partial-mask", "with mask 0x0000ffff"),
    ("misaligned-atomic", "not 16-byte aligned"),
])
def test_rule_breaking_kernels_abort(emulator, name, message):
    result = msda_emulator.run_tool(emulator["sm90"], "selftest", name)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]


def test_half_conversions_match_torch(emulator, tmp_path):
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.996, 65520.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25,
                            2.0**-14, 2.0**-14 - 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8,
                            3.4e38, float("inf"), -float("inf"), float("nan")])
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 18,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    x = torch.cat([special, -special, bits.view(torch.float32)])
    (tmp_path / "in.bin").write_bytes(x.numpy().tobytes())
    result = msda_emulator.run_tool(emulator["plain"], "convert", tmp_path / "in.bin", tmp_path / "out.bin")
    assert result.returncode == 0, result.stderr
    data, n = (tmp_path / "out.bin").read_bytes(), x.numel()
    half_bits, bf16_bits = (torch.frombuffer(bytearray(data[k * 2 * n:(k + 1) * 2 * n]), dtype=torch.int16)
                            for k in (0, 1))
    half_back, bf16_back = (torch.frombuffer(bytearray(data[4 * n + k * 4 * n:4 * n + (k + 1) * 4 * n]),
                                             dtype=torch.float32) for k in (0, 1))
    nan = x.isnan()  # NaN payloads may differ; NaN must stay NaN
    for got_bits, back, dtype in ((half_bits, half_back, torch.float16), (bf16_bits, bf16_back, torch.bfloat16)):
        expected = x.to(dtype)
        assert torch.equal(got_bits[~nan], expected.view(torch.int16)[~nan])
        assert torch.equal(back[~nan], expected.float()[~nan]) and back[nan].isnan().all()
