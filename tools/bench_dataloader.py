"""DataLoader throughput of the camera-rig pipeline, and dataset start-up times.

    python tools/bench_dataloader.py --data-root data/synth --out bench_dataloader.json

Measures samples/s of a torch DataLoader (default 2 workers, batch 1) running the train pipeline
(resize/crop/flip, BEV rotation, normalisation, padding) at each output size, after a warm-up, and
the first (devkit + index build) and second (index cache) start of NuScenesDataset, and the CPU
time per sample (which, unlike samples/s, does not depend on what else runs). Prints and writes JSON. Target: >= 25 samples/s at 704x256 from 1600x900 JPEGs.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from bev3d.config import Config
from bev3d.data import NuScenesDataset, build_dataset, collate


def _worker_init(_):
    cv2.setNumThreads(0)  # one decode thread per worker: the workers are the parallelism


def start_times(root, version, split):
    cache = Path(root) / ".bev3d_cache"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    NuScenesDataset(root, version, split)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    NuScenesDataset(root, version, split)
    return first, time.perf_counter() - t0


def throughput(cfg, workers, samples, warmup):
    dataset = build_dataset(cfg, "train")
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers, collate_fn=collate,
                        worker_init_fn=_worker_init, persistent_workers=workers > 0)
    n, t0 = 0, None
    while n < samples + warmup:
        for _ in loader:
            n += 1
            if n == warmup:
                t0 = time.perf_counter()
            if n == samples + warmup:
                break
    return samples / (time.perf_counter() - t0)


def cpu_cost(cfg, samples):
    """CPU seconds per sample of the pipeline in this process: load-independent, unlike samples/s."""
    cv2.setNumThreads(0)
    dataset = build_dataset(cfg, "train")
    dataset[0]
    t0 = time.process_time()
    for i in range(samples):
        dataset[i % len(dataset)]
    return (time.process_time() - t0) / samples


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/synth")
    p.add_argument("--version", default="v1.0-mini")
    p.add_argument("--split", default="mini_train")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=120)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--sizes", default="1408x512,704x256", help="comma-separated WxH output sizes")
    p.add_argument("--out", default="bench_dataloader.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    first, second = start_times(args.data_root, args.version, args.split)
    report = {"data_root": args.data_root, "workers": args.workers, "samples": args.samples,
              "dataset_first_start_s": round(first, 3), "dataset_second_start_s": round(second, 3), "sizes": {}}
    print(f"dataset start: first {first:.2f} s (devkit + index), second {second:.3f} s (index cache)")
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        cfg = Config()
        cfg.data.root, cfg.data.version, cfg.data.train_split = args.data_root, args.version, args.split
        cfg.data.image_size = [h, w]
        cfg.data.resize_range, cfg.data.flip = [0.94, 1.0], True
        cfg.data.rot_range, cfg.data.scale_range = [-0.3925, 0.3925], [0.95, 1.05]
        rate = throughput(cfg, args.workers, args.samples, args.warmup)
        cpu = cpu_cost(cfg, min(args.samples, 40))
        report["sizes"][size] = {"samples_per_s": round(rate, 2), "cpu_ms_per_sample": round(cpu * 1000, 1),
                                 "idle_estimate_samples_per_s": round(args.workers / cpu, 1)}
        print(f"{size}: {rate:.1f} samples/s ({args.workers} workers, 6 cameras per sample); "
              f"{cpu * 1000:.0f} CPU-ms per sample -> ~{args.workers / cpu:.0f} samples/s on {args.workers} idle cores")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
