"""`bev3d demo` (what `make demo` runs): synthetic rig -> train the tiny PETR -> `bev3d test` on mini_val ->
pictures of a validation sample -> a summary of where everything is."""

import time
from pathlib import Path

from bev3d.config import load_config

DEFAULT_ROOT = "data/synth"
# `bev3d demo` wall minutes with the shipped config on idle 2-core x86-64 machines, by what the CPU trains with
# (docs/benchmarks.md#demo: AVX512-BF16 and float32 (AVX2) measured with this config; AMX scaled from the measured
# runs of the previous config by the training-time ratio of the two configs on AVX512-BF16)
DEMO_MINUTES = {"AMX": 11.0, "AVX512-BF16": 11.5, "float32": 15.0}


def cpu_summary(features):
    """The CPU line the demo starts with, and the minutes the demo is expected to take on it."""
    tier = "AMX" if features["amx"] else "AVX512-BF16" if features["avx512_bf16"] else "float32"
    bf16 = (f"bf16 on {tier}" if tier != "float32" else
            "no AVX512-BF16 or AMX, so training runs in float32")
    minutes = DEMO_MINUTES[tier] * 2 / max(1, min(features["cores"], 2))
    return (f"{features['name']}, {features['cores']} cores usable, vector ISA {features['isa']}, {bf16}", minutes)


def _pictures(root, version, token, results, out_dir):
    try:
        from bev3d.vis import render_sample
    except ImportError as e:
        return f"skipped (visualization unavailable: {e})"
    try:
        render_sample(str(root), version, token, results=str(results), out_dir=str(out_dir))
    except ImportError as e:
        return f"skipped (visualization unavailable: {e})"
    return str(out_dir)


def main(args):
    from bev3d.data.synthetic import RIG_VERSION, stale_rig_version, write_synthetic_nuscenes
    from bev3d.engine.test import evaluate_checkpoint
    from bev3d.engine.train import train
    from bev3d.evaluation.nuscenes_eval import load_nuscenes, split_sample_tokens

    from bev3d.engine.runtime import cpu_features

    start = time.perf_counter()
    cpu, minutes = cpu_summary(cpu_features())
    print(f"[demo] CPU: {cpu}", flush=True)
    print(f"[demo] expected duration: about {minutes:.0f} min on an idle machine like this one (measured on 2-core "
          f"CPUs; other jobs on the cores slow it down); the training's progress bar gives this machine's ETA",
          flush=True)
    root = Path(args.data_root or DEFAULT_ROOT)
    cfg = load_config(args.cfg, [f"data.root={root}", f"work_dir={args.work_dir}"] + list(args.opts or []))
    stale = stale_rig_version(root)
    if stale is not None:
        print(f"[demo] {root} was written by synthetic rig version {stale}; rewriting it with version "
              f"{RIG_VERSION}", flush=True)
    if stale is not None or not (root / cfg.data.version / "sample.json").is_file():
        print(f"[demo] writing the synthetic rig to {root} (once; later runs reuse it)", flush=True)
        write_synthetic_nuscenes(root, verbose=True)
    synth_s = time.perf_counter() - start

    print(f"[demo] training {args.cfg} into {cfg.work_dir}", flush=True)
    work_dir = Path(train(cfg))
    train_s = time.perf_counter() - start - synth_s

    print(f"[demo] testing on {cfg.data.val_split}", flush=True)
    test_dir = work_dir / "test"
    metrics, stats = evaluate_checkpoint(cfg, work_dir / "latest.pth", test_dir)

    nusc = load_nuscenes(root, cfg.data.version)
    token = split_sample_tokens(nusc, cfg.data.val_split)[0]
    pictures = _pictures(root, cfg.data.version, token, test_dir / "results_nusc.json", work_dir / "vis")
    total_s = time.perf_counter() - start
    print(f"""
[demo] done in {total_s / 60:.1f} min (data {synth_s:.0f} s, training {train_s:.0f} s)
  mAP {metrics['mAP']:.4f}   NDS {metrics['NDS']:.4f}   on {cfg.data.val_split} ({stats['samples']} samples)
  dataset      {root}
  checkpoint   {work_dir / 'latest.pth'}
  config       {work_dir / 'config.yaml'}
  logs         {work_dir / 'log.jsonl'}, TensorBoard: tensorboard --logdir {work_dir / 'tb'}
  results      {test_dir / 'results_nusc.json'}
  metrics      {test_dir / 'metrics_summary.json'}
  pictures     {pictures}
""", flush=True)
    return 0
