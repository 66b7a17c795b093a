"""Transfer figures: a trained tiny model's nuScenes metrics on the rig it was trained on and on sets whose looks it
never saw (held-out style seeds, 800x450 images, the fixed look). Writes the held-out sets on first use, prints a
table and writes JSON.

    python tools/bench_transfer.py --cfg petr_tiny_synth --work-dir work_dirs/petr_tiny_synth \
        --data-dir data --out out/bench_transfer.json
"""

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

from bev3d.config import load_config
from bev3d.data.synthetic import write_synthetic_nuscenes
from bev3d.data.synthetic.writer import VERSION as RIG_VERSION_DIR
from bev3d.engine.runtime import cpu_features
from bev3d.engine.test import evaluate_checkpoint

# name -> the writer's arguments; only the two mini_val scenes are written (train_scenes=0)
EVAL_SETS = {
    "heldout_style": {"style_seed": 1000},
    "heldout_800x450": {"style_seed": 2000, "image_size": (800, 450)},
    "fixed_style": {"style": "fixed"},
}
KEYS = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")


def eval_set(data_dir, name):
    root = Path(data_dir) / f"synth_{name}"
    if not (root / RIG_VERSION_DIR / "sample.json").is_file():
        write_synthetic_nuscenes(root, train_scenes=0, **EVAL_SETS[name])
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True)
    p.add_argument("--work-dir", required=True, help="the training's work dir (its config.yaml and latest.pth)")
    p.add_argument("--train-root", default=None, help="the rig it was trained on (default: the config's data.root)")
    p.add_argument("--data-dir", default="data", help="where the held-out sets are written / found")
    p.add_argument("--sets", nargs="+", default=["train_rig", *EVAL_SETS])
    p.add_argument("--out", default=None)
    args = p.parse_args()

    work_dir = Path(args.work_dir)
    cfg_path = work_dir / "config.yaml" if (work_dir / "config.yaml").is_file() else args.cfg
    rows = {}
    for name in args.sets:
        root = (args.train_root or load_config(cfg_path).data.root) if name == "train_rig" else eval_set(
            args.data_dir, name)
        # the held-out sets are in the rig's format, whatever format the training config names
        split = [] if name == "train_rig" else [f"data.version={RIG_VERSION_DIR}", "data.train_split=mini_train",
                                               "data.val_split=mini_val"]
        cfg = load_config(cfg_path, [f"data.root={root}", "data.num_workers=0", *split])
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            metrics, _ = evaluate_checkpoint(cfg, work_dir / "latest.pth", work_dir / f"transfer_{name}")
        rows[name] = {"root": str(root), **{k: metrics[k] for k in KEYS}, "s": time.perf_counter() - start}
        print(f"{name:16s} " + "  ".join(f"{k} {rows[name][k]:.4f}" for k in KEYS), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cfg": args.cfg, "work_dir": str(work_dir), "cpu": cpu_features(),
                                              "sets": rows}, indent=1))


if __name__ == "__main__":
    main()
