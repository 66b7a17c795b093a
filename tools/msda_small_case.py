"""A few small bev3d.ops.ms_deform_attn calls, forward and backward, checked against the float64 reference.

The workload that tools/gpu_check.sh runs under compute-sanitizer: every dtype, D that vectorise and
D that do not, a value view 1 element off its allocation, Q = 0 (on the CPU kernel: float32/float64
only). Exits 1 on a mismatch.

    python tools/msda_small_case.py --device cuda
"""

import argparse
import sys

import torch

from bev3d.ops import ms_deform_attn, ms_deform_attn_reference

LEVELS = [(6, 4), (3, 2), (13, 21), (1, 5), (4, 1), (2, 3)]
# dtype, D, Q, elements by which value is offset from an aligned allocation
CASES = [(torch.float32, 33, 9, 0), (torch.float32, 32, 9, 0), (torch.float32, 32, 9, 1), (torch.bfloat16, 32, 9, 0),
         (torch.float16, 64, 9, 2), (torch.float64, 3, 9, 0), (torch.float32, 8, 0, 0)]
# One rounding to float16/bfloat16 (unit roundoff 2^-11, 2^-8) with a factor 2 of margin; float32 accumulation.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def make_inputs(dtype, D, Q, offset, device, B=2, M=3, P=3, seed=0):
    """Inputs as the op gets them (float32 locations for float16/bfloat16); points 1/4 px off the kinks."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(LEVELS)
    size = shapes.flip(1).double()  # (L, 2) as (W, H)
    k = torch.floor(torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * (size[:, None] + 3)) - 2
    f = 0.25 + 0.5 * torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64)
    loc = (k + f + 0.5) / size[:, None]
    weights = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64)
    value = torch.empty(B * S * M * D + offset, dtype=dtype, device=device)[offset:].view(B, S, M, D)
    value.copy_(torch.randn(B, S, M, D, generator=g, dtype=torch.float64))
    loc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    grad_out = torch.randn(B, Q, M * D, generator=g, dtype=torch.float64).to(device, dtype)
    return (value, shapes.to(device), starts.to(device), loc.to(device, loc_dtype), weights.to(device, dtype)), grad_out


def errors(backend, inputs, grad_out):
    """Relative errors of the output and the three gradients against the float64 reference."""
    def forward_backward(fn, tensors):
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [leaves[0], leaves[3], leaves[4]], grad_out.to(out.dtype))
        return [out, *grads]

    got = forward_backward(lambda *a: ms_deform_attn(*a, backend=backend), inputs)
    want = forward_backward(ms_deform_attn_reference, [t.cpu().double() if t.is_floating_point() else t.cpu()
                                                       for t in inputs])
    return [((g.cpu().double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() if w.numel() else 0.0
            for g, w in zip(got, want)], [g.dtype for g in got]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.device == "cuda" or c[0] in CPU_KERNEL_DTYPES]
    failed = 0
    for dtype, D, Q, offset in cases:
        inputs, grad_out = make_inputs(dtype, D, Q, offset, args.device)
        errs, dtypes = errors(args.device, inputs, grad_out)
        bad = [name for name, e, dt in zip(("out", "grad_value", "grad_loc", "grad_weights"), errs, dtypes)
               if not e < TOL[dt]]
        failed += bool(bad)
        print(f"{args.device} {str(dtype):<14} D={D:<3} Q={Q:<2} offset={offset}: rel. errors "
              f"{' '.join(f'{e:.1e}' for e in errs)}{'  FAILED: ' + ', '.join(bad) if bad else ''}", flush=True)
    print(f"{len(cases) - failed} of {len(cases)} cases match the float64 reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
