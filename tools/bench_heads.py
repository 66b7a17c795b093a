"""Benchmark the 3D detectors: parameters, forward latency and train-step time per sample, DETR3D's
two feature samplers (grid_sample vs ms_deform_attn) and PETR's ray-bias cross-attention (factored
LowRankBias vs the same bias as a dense mask).

    python tools/bench_heads.py                       # tiny configs on CPU + sampler comparison
    python tools/bench_heads.py --configs petr_r50_nus detr3d_r101_nus --device cuda --dtypes fp32 bf16

Inputs are random images on the synthetic rig's real nuScenes calibration (timings do not depend on
the pixel values). Prints a table and writes JSON (--out).
"""

import argparse
import json
import platform
import time

import numpy as np
import torch

from bev3d.config import load_config
from bev3d.constants import CAMERAS
from bev3d.data.per_camera import camera_targets
from bev3d.data.synthetic import RIG, scaled_intrinsics
from bev3d.geometry import intrinsics_4x4, transform_matrix
from bev3d.models import build_criterion, build_model
from bev3d.models.heads.detr3d_sampling import SAMPLERS, sample_multiview
from bev3d.models.heads.ray_bias import LowRankBias, LowRankBiasAttention


def rig_lidar2img(H, W):
    """(N_cam, 4, 4) lidar2img of the synthetic rig (ego frame as LiDAR) for H x W images."""
    mats = [intrinsics_4x4(scaled_intrinsics(cam, (W, H))) @ transform_matrix(RIG[cam][0], RIG[cam][1], inverse=True)
            for cam in CAMERAS]
    return torch.tensor(np.stack(mats), dtype=torch.float32)


def random_batch(cfg, batch_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = cfg.data.image_size
    div = cfg.data.pad_divisor
    Hp, Wp = -(-H // div) * div, -(-W // div) * div
    boxes = [torch.cat([torch.rand(10, 2, generator=g) * 60 - 30, torch.zeros(10, 1), torch.ones(10, 3) * 2,
                        torch.zeros(10, 3)], 1).to(device) for _ in range(batch_size)]
    lidar2img = rig_lidar2img(H, W)
    targets = [{"boxes": b, "labels": torch.arange(10, device=device)} for b in boxes]
    if cfg.model.head.camera_maps():  # what each camera sees, as the training set's CameraBoxes adds it
        for t in targets:
            seen = [camera_targets(t["boxes"].double().cpu().numpy(), lidar2img[n].double().numpy(),
                                   scaled_intrinsics(cam, (W, H)), (H, W)) for n, cam in enumerate(CAMERAS)]
            t["camera_boxes"] = [torch.from_numpy(rows).float().to(device) for rows, _ in seen]
            t["camera_labels"] = [t["labels"][torch.from_numpy(keep).to(device)] for _, keep in seen]
    return {"img": torch.randn(batch_size, len(CAMERAS), 3, Hp, Wp, generator=g).to(device),
            "lidar2img": lidar2img[None].repeat(batch_size, 1, 1, 1).to(device),
            "img_shape": [(H, W)] * batch_size, "pad_shape": (Hp, Wp), "targets": targets}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats, warmup=1):
    """Median wall seconds and median process CPU seconds of `fn` (CPU time is the steadier figure
    on a shared machine)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def bench_model(name, device, dtype, batch_size, repeats):
    cfg = load_config(name)
    torch.manual_seed(0)
    model, criterion = build_model(cfg).to(device), build_criterion(cfg)
    batch = random_batch(cfg, batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def forward():
        with torch.no_grad(), autocast:
            model(batch)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            targets = batch["targets"]
            loss = sum(criterion.weighted(criterion(model(batch, targets), targets)).values())
        loss.backward()
        opt.step()

    out = {"config": name, "device": device.type, "dtype": dtype, "batch_size": batch_size,
           "image_size": list(cfg.data.image_size),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = _time(forward, device, repeats)
    out["forward_ms_per_sample"], out["forward_cpu_ms_per_sample"] = 1e3 * wall / batch_size, 1e3 * cpu / batch_size
    if device.type == "cuda":
        out["forward_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    model.train()
    wall, cpu = _time(train_step, device, repeats)
    out["train_step_ms_per_sample"], out["train_step_cpu_ms_per_sample"] = 1e3 * wall / batch_size, 1e3 * cpu / batch_size
    if device.type == "cuda":
        out["train_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench_samplers(device, repeats):
    """DETR3D sampling forward+backward at the tiny and the full-size (1600x900, 4 levels) shapes."""
    shapes = {"tiny": dict(B=2, C=128, Q=150, pad=(128, 352), strides=(8, 16)),
              "r101_1600x900": dict(B=1, C=256, Q=900, pad=(928, 1600), strides=(8, 16, 32, 64))}
    results = []
    for tag, s in shapes.items():
        g = torch.Generator().manual_seed(0)
        N = len(CAMERAS)
        feats = [torch.randn(s["B"], N, s["C"], -(-s["pad"][0] // st), -(-s["pad"][1] // st), generator=g)
                 .to(device).requires_grad_() for st in s["strides"]]
        locations = torch.rand(s["B"], N, s["Q"], 2, generator=g).to(device)
        weights = torch.rand(s["B"], s["Q"], N, len(s["strides"]), generator=g).to(device).requires_grad_()
        for sampler in SAMPLERS:
            def step():
                sample_multiview(feats, locations, weights, sampler).sum().backward()
            wall, cpu = _time(step, device, repeats)
            results.append({"shape": tag, "sampler": sampler, "device": device.type, "fwd_bwd_ms": 1e3 * wall,
                            "fwd_bwd_cpu_ms": 1e3 * cpu})
    return results


def bench_ray_bias(device, repeats):
    """One cross-attention of the tiny PETR, forward+backward: 150 queries + 300 denoising copies over
    6 x 8 x 22 tokens, 128 channels, 4 heads, the ray bias (rank 3 per camera) factored or dense."""
    g = torch.Generator().manual_seed(0)
    B, Q, S, C, M, r = 2, 450, len(CAMERAS) * 8 * 22, 128, 4, 3 * len(CAMERAS)
    attn = LowRankBiasAttention(C, M).to(device)
    query = torch.randn(B, Q, C, generator=g).to(device).requires_grad_()
    memory = torch.randn(B, S, C, generator=g).to(device).requires_grad_()
    factors = (torch.randn(B, M, Q, r, generator=g).to(device).requires_grad_(),
               torch.randn(B, S, r, generator=g).to(device))
    results = []
    for form in ("factored", "dense"):
        def step():
            bias = LowRankBias(*factors)
            attn(query, memory, memory, attn_mask=bias if form == "factored" else bias.dense()).sum().backward()
        wall, cpu = _time(step, device, repeats)
        results.append({"ray_bias": form, "device": device.type, "fwd_bwd_ms": 1e3 * wall, "fwd_bwd_cpu_ms": 1e3 * cpu})
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=["petr_tiny_synth", "detr3d_tiny_synth"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-samplers", action="store_true", help="skip the sampler comparison")
    p.add_argument("--no-ray-bias", action="store_true", help="skip the ray-bias attention comparison")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="bench_heads.json")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"torch": torch.__version__, "host": platform.node(), "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "models": [], "samplers": [],
              "ray_bias": []}
    for name in args.configs:
        for dtype in args.dtypes:
            r = bench_model(name, device, dtype, args.batch_size, args.repeats)
            report["models"].append(r)
            mem = f"  peak {r['train_peak_mem_gb']:.2f} GB" if "train_peak_mem_gb" in r else ""
            print(f"{name:18s} {dtype:5s} {r['params_m']:6.2f} M params  forward {r['forward_ms_per_sample']:8.1f} "
                  f"ms/sample (cpu {r['forward_cpu_ms_per_sample']:.1f})  train step "
                  f"{r['train_step_ms_per_sample']:8.1f} ms/sample (cpu {r['train_step_cpu_ms_per_sample']:.1f}){mem}",
                  flush=True)
    if not args.no_samplers:
        for r in bench_samplers(device, args.repeats):
            report["samplers"].append(r)
            print(f"sampler {r['shape']:14s} {r['sampler']:15s} fwd+bwd {r['fwd_bwd_ms']:8.1f} ms "
                  f"(cpu {r['fwd_bwd_cpu_ms']:.1f})", flush=True)
    if not args.no_ray_bias:
        for r in bench_ray_bias(device, args.repeats):
            report["ray_bias"].append(r)
            print(f"PETR ray-bias cross-attention, {r['ray_bias']:8s} fwd+bwd {r['fwd_bwd_ms']:8.1f} ms "
                  f"(cpu {r['fwd_bwd_cpu_ms']:.1f})", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
