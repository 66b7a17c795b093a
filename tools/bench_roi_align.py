"""Multi-level RoIAlign, forward and forward + backward: the pure-PyTorch path against torchvision's kernel.

    python tools/bench_roi_align.py --threads 2 --out bench_roi_align.json

Shapes are those of the Sparse R-CNN / Dynamic DETR configs: `tiny` (shapes set, 128x128, 64 channels, P2-P5,
batch 4, 30 boxes) and `r50` (800x1344, 256 channels, P2-P5, batch 2, 100 or 300 boxes), 7x7 bins, 2x2 samples,
aligned; median of `--repeat` runs after one warm-up. Without an importable torchvision only "torch" runs.
"""

import argparse
import json
import platform
import statistics
import time

import torch

from bev3d.ops.roi_align import multiscale_roi_align
from bev3d.ops.torchvision_ops import torchvision_op

SHAPES = {  # name: (batch, channels, image H, W, boxes per image)
    "tiny": (4, 64, 128, 128, 30),
    "r50_100": (2, 256, 800, 1344, 100),
    "r50_300": (2, 256, 800, 1344, 300),
}


def _inputs(B, C, H, W, N, g, memory_format):
    strides = [4, 8, 16, 32]
    feats = [torch.randn(B, C, H // s, W // s, generator=g).contiguous(memory_format=memory_format)
             .requires_grad_(True) for s in strides]
    centre = torch.rand(B, N, 2, generator=g) * torch.tensor([W, H])
    size = torch.rand(B, N, 2, generator=g) * torch.tensor([W, H]) * 0.5 + 4
    return feats, strides, torch.cat([centre - size / 2, centre + size / 2], -1)


def _time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    # the models run their backbone and FPN channels-last, so that the pure path reads the maps without a copy
    p.add_argument("--memory-format", default="channels_last", choices=["channels_last", "contiguous"])
    p.add_argument("--out", default="bench_roi_align.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backends = ["torch"] + (["torchvision"] if torchvision_op("roi_align") is not None else [])
    memory_format = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[args.memory_format]
    results = {"torch": torch.__version__, "threads": args.threads, "memory_format": args.memory_format,
               "machine": platform.processor() or platform.machine(), "shapes": {}}
    for name in args.shapes:
        feats, strides, boxes = _inputs(*SHAPES[name], torch.Generator().manual_seed(0), memory_format)
        row = {}
        for backend in backends:
            def forward():
                with torch.no_grad():
                    multiscale_roi_align(feats, strides, boxes, 7, 2, True, backend=backend)

            def train():
                out = multiscale_roi_align(feats, strides, boxes, 7, 2, True, backend=backend)
                out.sum().backward()

            forward(), train()  # warm-up
            row[backend] = {"forward_ms": _time(forward, args.repeat), "forward_backward_ms": _time(train, args.repeat)}
            print(f"{name:8s} {backend:12s} forward {row[backend]['forward_ms']:8.1f} ms   forward+backward "
                  f"{row[backend]['forward_backward_ms']:8.1f} ms", flush=True)
        results["shapes"][name] = row
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
