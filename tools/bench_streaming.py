"""Streaming inference cost: StreamPETR's forward per frame (memory carried from frame to frame) against the
single-frame PETR at the same image size, batch 1, eval mode, on a rig's validation frames in time order.

    python tools/bench_streaming.py --data-root data/synth --out out/bench_streaming.json

Both tiny configs are built (random weights: the cost does not depend on them) and timed interleaved, one
block of `--frames` consecutive frames each, `--rounds` times, so a machine that slows down slows both. Prints
the median and best milliseconds per frame and writes JSON.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bev3d.config import load_config
from bev3d.data import build_dataset, collate
from bev3d.data.streaming import StreamingDataset, scene_sequences
from bev3d.engine.runtime import cpu_features
from bev3d.models import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/synth")
    p.add_argument("--single", default="petr_tiny_synth")
    p.add_argument("--streaming", default="streampetr_tiny_synth")
    p.add_argument("--frames", type=int, default=4, help="consecutive frames per timed block")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    cfgs = {name: load_config(name, [f"data.root={args.data_root}"]) for name in (args.single, args.streaming)}
    if cfgs[args.single].data.image_size != cfgs[args.streaming].data.image_size:
        raise SystemExit(f"{args.single} and {args.streaming} have different data.image_size: not a comparison.")
    dataset = build_dataset(cfgs[args.streaming], "val")
    frames = scene_sequences(dataset)[0]
    need = args.frames * args.rounds
    if len(frames) < need:
        raise SystemExit(f"The first validation scene has {len(frames)} frames, fewer than --frames x --rounds "
                         f"({need}).")
    stream = StreamingDataset(dataset)
    batches = [collate([stream[(i, k == 0)]]) for k, i in enumerate(frames[:need])]
    torch.manual_seed(0)
    models = {name: build_model(cfg).eval() for name, cfg in cfgs.items()}
    ms = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(batches[0])
        for r in range(args.rounds):
            block = batches[r * args.frames:(r + 1) * args.frames]
            for name, model in models.items():
                for batch in block:
                    start = time.perf_counter()
                    model(batch)
                    ms[name].append(1e3 * (time.perf_counter() - start))
    rows = {name: {"median_ms": float(np.median(v)), "best_ms": float(np.min(v))} for name, v in ms.items()}
    ratio = rows[args.streaming]["median_ms"] / rows[args.single]["median_ms"]
    for name, row in rows.items():
        print(f"{name:24s} median {row['median_ms']:.1f} ms/frame  best {row['best_ms']:.1f}")
    print(f"streaming / single-frame (medians): {ratio:.3f}; threads {torch.get_num_threads()}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu": cpu_features(), "threads": torch.get_num_threads(),
                                              "image_size": cfgs[args.single].data.image_size, "rows": rows,
                                              "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
