"""Exported ONNX graphs in onnxruntime (CPU) against eager PyTorch: latency per sample and max difference.

    python tools/bench_export.py --threads 2 --out bench_export.json

Every tiny config, random weights, batch 1, raw outputs (logits and box codes); the 3D configs at --image-size
(default 128x352, the configs' own) on a synthetic batch of the rig's calibration, the 2D ones at their export
size (128x128) on random images. Both sides get --threads intra-op threads; median of --repeat runs after one
warm-up, on another sample than the one traced.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bev3d.config import load_config
from bev3d.engine.export import build_graph, check, export_onnx, synthetic_batch
from bev3d.ops import build

CONFIGS = ["petr_tiny_synth", "detr3d_tiny_synth", "detr_tiny_shapes", "deformable_detr_tiny_shapes",
           "conditional_detr_tiny_shapes", "anchor_detr_tiny_shapes", "efficient_detr_tiny_shapes",
           "sparse_rcnn_tiny_shapes", "dynamic_detr_tiny_shapes"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=CONFIGS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="3D configs: data.image_size (default: the config's)")
    p.add_argument("--out", default="bench_export.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "threads": args.threads, "repeat": args.repeat,
               "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
               # what eager ms_deform_attn runs on (the graph always has the GridSample reference)
               "eager_ms_deform_attn": build.unavailable_reason("cpu") or "compiled CPU kernel", "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            opts = [f"data.image_size={list(args.image_size)}"] if args.image_size and "synth" in name else []
            cfg = load_config(name, opts)
            torch.manual_seed(0)
            graph = build_graph(cfg)
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(graph, graph.inputs(synthetic_batch(cfg, 1, seed=0)), path)
            r = check(graph, path, graph.inputs(synthetic_batch(cfg, 1, seed=1)), args.threads, args.repeat)
            r.update(onnx_ms=r.pop("onnx_s") * 1e3, eager_ms=r.pop("eager_s") * 1e3,
                     input_shape=list(synthetic_batch(cfg, 1)["img"].shape), file_mb=path.stat().st_size / 2**20)
            results["configs"][name] = r
            print(f"{name:30s} onnxruntime {r['onnx_ms']:8.1f} ms  pytorch {r['eager_ms']:8.1f} ms  "
                  f"({r['eager_ms'] / r['onnx_ms']:.2f}x)  max diff {max(r['max_diff'].values()):.1e}  "
                  f"img {tuple(r['input_shape'])}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"eager ms_deform_attn: {results['eager_ms_deform_attn']}; saved {args.out}")


if __name__ == "__main__":
    main()
