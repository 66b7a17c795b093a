"""Benchmark bev3d.ops.ms_deform_attn backends (and the torch-ms-deform-attn peer where it runs on the device).

Prints a table and saves JSON with, per (shape, backend): median forward and forward+backward time,
peak memory (CUDA only; no allocator statistics exist for CPU tensors) and the max abs difference
from a float64 reference output. Backends take turns within each timing round.

    python tools/bench_ms_deform_attn.py --device cpu --threads 2 --out bench_cpu.json
    python tools/bench_ms_deform_attn.py --device cuda --shapes encoder,decoder900 --out bench_cuda.json
"""

import argparse
import importlib
import json
import platform
import statistics
import time

import torch

from bev3d.ops import ms_deform_attn, ms_deform_attn_reference

DETR_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
# 1408x512 input, strides 8..64, each of 6 cameras is its own block of 4 levels.
DETR3D_LEVELS = [(512 // s, 1408 // s) for s in (8, 16, 32, 64)] * 6
SHAPES = {
    # name: (B, levels, M, D, P, Q); Q=None means Q = S (encoder self-attention)
    "encoder": (2, DETR_LEVELS, 8, 32, 4, None),
    "decoder300": (2, DETR_LEVELS, 8, 32, 4, 300),
    "decoder900": (2, DETR_LEVELS, 8, 32, 4, 900),
    "detr3d": (1, DETR3D_LEVELS, 8, 32, 1, 900),
}
PROBE = (1, [(2, 3)], 1, 4, 1, 3)  # a tiny call that shows whether a backend runs on a device at all
DEFAULT_SHAPES = {"cpu": "decoder300,decoder900,detr3d", "cuda": ",".join(SHAPES)}


def make_inputs(shape, device, dtype, seed=0):
    """shape: (B, levels, M, D, P, Q) as in SHAPES."""
    B, levels, M, D, P, Q = shape
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(levels)
    Q = S if Q is None else Q
    value = torch.randn(B, S, M, D, generator=g)
    loc = torch.rand(B, Q, M, L, P, 2, generator=g) * 1.1 - 0.05  # a few points fall off the map
    weights = torch.rand(B, Q, M, L, P, generator=g).softmax(-1)
    return (value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device, dtype),
            weights.to(device, dtype))


def default_backends(device):
    """(backends to time on `device`, {backend: why it is left out}). The peer is timed only where a
    tiny call on the device works: a build without CUDA kernels would otherwise fail mid-run."""
    backends, skipped = ["reference", device], {}
    try:
        importlib.import_module("torch_ms_deform_attn")
    except ImportError:
        skipped["peer"] = "torch_ms_deform_attn is not installed"
        return backends, skipped
    value, shapes, starts, loc, weights = make_inputs(PROBE, device, torch.float32)
    try:
        out = backend_fn("peer")(value, shapes, starts, loc, weights)
        if out.shape != (1, 3, 4) or out.device != value.device:
            raise RuntimeError(f"returned shape {tuple(out.shape)} on {out.device}, expected (1, 3, 4) on {device}")
    except Exception as exc:  # whatever the peer raises means it cannot be timed here
        skipped["peer"] = f"torch_ms_deform_attn does not run on {device}: {type(exc).__name__}: {exc}"
        return backends, skipped
    return backends + ["peer"], skipped


def backend_fn(backend):
    if backend == "peer":
        return importlib.import_module("torch_ms_deform_attn").ms_deform_attn
    if backend == "reference":
        return ms_deform_attn_reference
    return lambda *args: ms_deform_attn(*args, backend=backend)


def timed(fn, device):
    """Wall time of fn() in ms."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def bench_shape(name, backends, device, dtype, repeat, warmup=1):
    """Rows for one shape. Backends take turns within each round, so load changes hit them alike."""
    value, shapes, starts, loc, weights = make_inputs(SHAPES[name], device, dtype)
    grads = [t.requires_grad_() for t in (value, loc, weights)]
    fns = {backend: backend_fn(backend) for backend in backends}
    with torch.no_grad():
        outs = {backend: fn(value, shapes, starts, loc, weights) for backend, fn in fns.items()}
        ref = ms_deform_attn_reference(value.double(), shapes, starts, loc.double(), weights.double())
    grad_out = torch.randn_like(ref).to(dtype)

    def forward(fn):
        with torch.no_grad():
            fn(value, shapes, starts, loc, weights)

    def forward_backward(fn):
        torch.autograd.grad(fn(value, shapes, starts, loc, weights), grads, grad_out)

    times = {backend: ([], []) for backend in backends}
    for i in range(warmup + repeat):
        for backend, fn in fns.items():
            t_fwd, t_fwd_bwd = timed(lambda: forward(fn), device), timed(lambda: forward_backward(fn), device)
            if i >= warmup:
                times[backend][0].append(t_fwd)
                times[backend][1].append(t_fwd_bwd)
    rows = []
    for backend, fn in fns.items():
        row = {"shape": name, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
               "forward_ms": statistics.median(times[backend][0]),
               "forward_backward_ms": statistics.median(times[backend][1]), "peak_mem_mb": None,
               "max_abs_err": (outs[backend].double() - ref).abs().max().item()}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward(fn)
            torch.cuda.synchronize()
            row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(row)
    return rows


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", help=f"comma list of {','.join(SHAPES)} (default: {DEFAULT_SHAPES})")
    parser.add_argument("--backends", help="comma list of reference,cpu,cuda,peer (default: all available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    shapes = (args.shapes or DEFAULT_SHAPES[args.device]).split(",")
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends, skipped = default_backends(args.device)
        for backend, why in skipped.items():
            print(f"not timing {backend}: {why}")
    repeat = args.repeat or (5 if args.device == "cpu" else 50)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{'shape':<11} {'backend':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MB':>8} {'max abs err':>11}")
    for name in shapes:
        for row in bench_shape(name, backends, args.device, dtype, repeat):
            rows.append(row)
            mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"
            print(f"{name:<11} {row['backend']:<10} {row['forward_ms']:9.2f} {row['forward_backward_ms']:11.2f} "
                  f"{mem:>8} {row['max_abs_err']:11.2e}", flush=True)
    for name in shapes:
        by = {r["backend"]: r for r in rows if r["shape"] == name}
        for other in ("reference", "peer"):
            if other in by and args.device in by and other != args.device:
                s = by[other]["forward_backward_ms"] / by[args.device]["forward_backward_ms"]
                print(f"{name}: {args.device} kernel fwd+bwd is {s:.1f}x faster than {other}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    report = {"device": args.device, "device_name": device_name, "threads": args.threads, "torch": torch.__version__,
              "repeat": repeat, "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
