"""Forward and train-step time per image of a 2D detector (default: Deformable DETR R50 at 800x1333).

    python tools/bench_detr2d.py --out bench_detr2d.json
    python tools/bench_detr2d.py --cfg detr_r50_coco --device cuda --batch 2 --opts model.head.with_box_refine=true

Random images and 10 random targets per image; prints and saves JSON. The first `--warmup` steps
(kernel selection, allocator growth) are not timed.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from bev3d.config import load_config
from bev3d.models import build_criterion, build_model, build_postprocess


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(B, H, W, device, num_classes, g):
    targets = []
    for _ in range(B):
        centre = torch.rand(10, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(10, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(1, num_classes, (10,), generator=g).to(device),
                        "boxes": torch.cat([centre, size], 1).to(device)})
    return {"img": torch.randn(B, 3, H, W, generator=g).to(device),
            "mask": torch.zeros(B, H, W, dtype=torch.bool, device=device), "targets": targets,
            "orig_size": [(H, W)] * B}


def _time(name, fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    for _ in range(iters):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        print(f"{name}: {times[-1]:.3f} s wall, {cpu_times[-1]:.3f} s CPU", file=sys.stderr, flush=True)
    return times, cpu_times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="deformable_detr_r50_coco")
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--size", default="800x1333", help="HEIGHTxWIDTH of the input")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--only", choices=["forward", "train"], help="time only the forward or the train step")
    p.add_argument("--out", default="bench_detr2d.json")
    args = p.parse_args()

    H, W = (int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    cfg = load_config(args.cfg, args.opts)
    torch.manual_seed(0)
    model, criterion, postprocess = build_model(cfg).to(device), build_criterion(cfg), build_postprocess(cfg)
    batch = _batch(args.batch, H, W, device, cfg.model.head.num_classes, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)

    def forward():
        with torch.no_grad():
            postprocess(model.eval()(batch), batch)

    def train_step():
        losses = criterion.weighted(criterion(model.train()(batch, batch["targets"]), batch["targets"]))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    runs = {}
    if args.only in (None, "forward"):
        runs["forward"] = _time("forward", forward, device, args.warmup, args.iters)
    if args.only in (None, "train"):
        runs["train_step"] = _time("train step", train_step, device, args.warmup, args.iters)
    result = {
        "config": args.cfg, "opts": args.opts, "input_hw": [H, W], "batch": args.batch, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "params_trainable_m": sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6,
    }
    for name, (wall, cpu) in runs.items():
        # CPU seconds (all threads) tell what the run cost when the machine is shared with other work.
        result[f"{name}_s_per_image"] = statistics.median(wall) / args.batch
        result[f"{name}_cpu_s_per_image"] = statistics.median(cpu) / args.batch
        result[f"{name}_runs_s"] = wall
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
