"""Convergence of the DETR family on the synthetic shapes set: COCO AP on held-out images after N steps.

    python tools/bench_convergence_2d.py --steps 400 800 1600 --seeds 0 1 --out bench_convergence_2d.json \
        --plot docs/img/convergence_2d.png

Every tiny config trains with the same budget: `bev3d synth --kind shapes2d` images (seed 0, --num-images
training images, a quarter of that for validation, 128x128), the config's batch size, AdamW at the config's lr
with its warm-up and then a constant lr (so that the AP at 400 steps is that of the same run as at 1600), the
config's gradient clip, flip augmentation. At each step count in --steps every model is evaluated with COCOeval
on the validation images. The runs advance together (all to 400, then all to 800, ...) and the JSON is written
after every evaluation, so a stopped benchmark still compares every model at the steps it reached. Prints a
table and, with --plot, writes a PNG of AP against steps (mean over seeds, one line per model).

A run depends only on its model and seed (each keeps its own random streams), so the work can be split: an --out
file that exists with the same steps and --num-images keeps the (model, seed) runs this call does not redo.
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bev3d.config import load_config
from bev3d.data.coco import build_coco_dataset, collate
from bev3d.data.shapes2d import write_shapes2d
from bev3d.engine.optim import WarmupCosine, build_optimizer
from bev3d.evaluation.coco_eval import CocoEvaluator
from bev3d.models import build_criterion, build_model, build_postprocess

MODELS = {  # label -> config
    "DETR": "detr_tiny_shapes",
    "Conditional DETR": "conditional_detr_tiny_shapes",
    "Anchor DETR": "anchor_detr_tiny_shapes",
    "DN-DETR (Deformable)": "dn_deformable_detr_tiny_shapes",
    "Efficient DETR": "efficient_detr_tiny_shapes",
    "Deformable DETR": "deformable_detr_tiny_shapes",
    "Sparse R-CNN": "sparse_rcnn_tiny_shapes",
    "Dynamic DETR": "dynamic_detr_tiny_shapes",
}


def evaluate(model, postprocess, loader, ann_file):
    model.eval()
    evaluator = CocoEvaluator(ann_file)
    with torch.no_grad():
        for batch in loader:
            evaluator.update(batch["image_id"], postprocess(model(batch), batch))
    model.train()
    stats = evaluator.summarize()
    return {"AP": round(stats["AP"], 4), "AP50": round(stats["AP50"], 4)}


class Run:
    """One model of `config` trained with `seed`; `advance(step)` trains it up to `step` and evaluates it."""

    def __init__(self, config, root, seed, total_steps):
        cfg = load_config(config, [f"data.root={root}", f"train.seed={seed}"])
        torch.manual_seed(seed)
        random.seed(seed)
        self.config, self.seed, self.grad_clip = config, seed, cfg.train.grad_clip
        self.model, self.criterion = build_model(cfg).train(), build_criterion(cfg)
        self.postprocess = build_postprocess(cfg)
        train_set = build_coco_dataset(cfg.data, cfg.data.train_split, train=True)
        self.val_set = build_coco_dataset(cfg.data, cfg.data.val_split, train=False)
        pad = cfg.data.pad_divisor
        self.train_loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                                       collate_fn=lambda items: collate(items, pad),
                                       generator=torch.Generator().manual_seed(seed))
        self.val_loader = DataLoader(self.val_set, batch_size=8, collate_fn=lambda items: collate(items, pad))
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.schedule = WarmupCosine(self.optimizer, total_steps, cfg.train.warmup_iters, cfg.train.warmup_ratio,
                                     min_lr_ratio=1.0)
        self.batches = iter(())
        self.step, self.train_seconds, self.results = 0, 0.0, {}
        self.rng_state = torch.get_rng_state(), random.getstate()  # runs interleave: each keeps its own streams

    def _next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.train_loader)
            return next(self.batches)

    def advance(self, until):
        torch.set_rng_state(self.rng_state[0])
        random.setstate(self.rng_state[1])
        while self.step < until:
            batch = self._next_batch()
            start = time.perf_counter()
            losses = self.criterion.weighted(self.criterion(self.model(batch, batch["targets"]), batch["targets"]))
            self.optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            self.train_seconds += time.perf_counter() - start
            self.step += 1
        self.results[until] = evaluate(self.model, self.postprocess, self.val_loader, self.val_set.ann_file)
        self.rng_state = torch.get_rng_state(), random.getstate()
        r = self.results[until]
        print(f"  {self.config} seed {self.seed} step {until}: AP {r['AP']:.3f} AP50 {r['AP50']:.3f} "
              f"({self.train_seconds / self.step:.3f} s/step)", flush=True)


def mean_ap(runs, step):
    values = [r[step]["AP"] for r in runs.values() if step in r]
    return sum(values) / len(values) if values else None


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    for label, entry in report["models"].items():
        steps = [s for s in report["steps"] if mean_ap(entry["runs"], s) is not None]
        if steps:
            ax.plot(steps, [mean_ap(entry["runs"], s) for s in steps], marker="o", label=label)
    ax.set_xlabel("training steps (batch 4)")
    ax.set_ylabel(f"COCO AP, held-out shapes (mean of seeds {', '.join(map(str, report['seeds']))})")
    ax.set_xticks(report["steps"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: the lines fill the plot
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def merge_previous(report, previous, path):
    """Keep the runs of `previous` (an earlier --out) that this call does not redo."""
    if previous["steps"] != report["steps"] or previous["num_images"] != report["num_images"]:
        raise SystemExit(f"{path} holds steps {previous['steps']} on {previous['num_images']} images, this call "
                         f"{report['steps']} on {report['num_images']}: pass another --out.")
    models = {}
    for label, entry in previous["models"].items():  # JSON keys are strings: back to the ints they were
        runs = {int(seed): {int(step): r for step, r in steps.items()} for seed, steps in entry["runs"].items()}
        seconds = {int(seed): t for seed, t in entry["seconds_per_step"].items()}
        models[label] = {"config": entry["config"], "runs": runs, "seconds_per_step": seconds}
    for label, entry in report["models"].items():
        models.setdefault(label, entry)
        for seed in report["seeds"]:
            models[label]["runs"].pop(seed, None)
            models[label]["seconds_per_step"].pop(seed, None)
    seeds = sorted({seed for entry in models.values() for seed in entry["runs"]} | set(report["seeds"]))
    return {**report, "seeds": seeds, "models": {label: models[label] for label in MODELS if label in models}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", nargs="+", type=int, default=[400, 800, 1600])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--num-images", type=int, default=64, help="training images (a quarter of that for validation)")
    p.add_argument("--data-root", default=None, help="an existing shapes2d set (default: write one to a temp dir)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_convergence_2d.json")
    p.add_argument("--plot", default=None, help="PNG of AP against steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = sorted(set(args.steps))
    root = args.data_root or write_shapes2d(Path(tempfile.mkdtemp(prefix="shapes2d_")), seed=0,
                                            num_images=args.num_images)
    report = {"steps": steps, "seeds": args.seeds, "num_images": args.num_images, "threads": args.threads,
              "models": {label: {"config": MODELS[label], "runs": {}, "seconds_per_step": {}} for label in args.models}}
    if Path(args.out).exists():
        report = merge_previous(report, json.loads(Path(args.out).read_text()), args.out)
    # all runs advance together, step count by step count: a stopped benchmark still compares every model
    runs = [(label, seed, Run(MODELS[label], root, seed, steps[-1])) for seed in args.seeds for label in args.models]
    for step in steps:
        for label, seed, run in runs:
            run.advance(step)
            entry = report["models"][label]
            entry["runs"][seed] = run.results
            entry["seconds_per_step"][seed] = round(run.train_seconds / run.step, 4)
            Path(args.out).write_text(json.dumps(report, indent=1))
        if args.plot:
            plot(report, args.plot)
    print(f"\n{'model':24s}" + "".join(f"{f'AP@{s}':>10s}" for s in steps) + f"{'s/step':>9s}")
    for label, entry in report["models"].items():
        seconds = sum(entry["seconds_per_step"].values()) / len(entry["seconds_per_step"])
        print(f"{label:24s}" + "".join(f"{mean_ap(entry['runs'], s):10.3f}" for s in steps) + f"{seconds:9.3f}")
    print(f"(mean over seeds {report['seeds']}; JSON in {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
