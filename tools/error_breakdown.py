"""Where a detector's centre error is: per class, the BEV offset of each matched detection from its box split
into the part along the line of sight from the ego (radial; + means placed too far) and the part across it, with
the radial error also by range and by the box's heading against the line of sight (end-on: a car seen from behind
or ahead; side-on: seen from the side).

Ground truth and detections are loaded and filtered as the devkit's DetectionEval loads them; detections are
matched as its true positives are (highest score first, the nearest unmatched box of the class in the sample within
--max-dist, the devkit's 2 m for the TP errors), so the offsets are those whose length the devkit's mATE averages
(over the recall range, where this tool takes every match).

    python tools/error_breakdown.py --results W/test/results_nusc.json --data-root data/synth \
        --version v1.0-mini --split mini_val --out errors.json
"""

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

from bev3d.errors import Bev3dError
from bev3d.evaluation.nuscenes_eval import (check_results, load_eval_boxes, load_nuscenes, read_results,
                                            split_sample_tokens)

NEAR_RANGE = 20.0  # m: the range split of the radial error
ALONG, ACROSS = 0.7, 0.3  # |cos(heading - line of sight)| above / below which a box is seen end-on / side-on


def match_offsets(pred_boxes, gt_boxes, max_dist=2.0):
    """EvalBoxes of DetectionBox -> {class: (n, 4) array of [radial, tangential, range, |cos(heading - line of
    sight)|]} for every ground-truth box matched by a detection of its class (devkit TP matching)."""
    from nuscenes.eval.common.utils import center_distance, quaternion_yaw
    from pyquaternion import Quaternion

    rows = {}
    for token in gt_boxes.sample_tokens:
        gts = gt_boxes[token]
        taken = [False] * len(gts)
        for pred in sorted(pred_boxes[token], key=lambda b: -b.detection_score):  # [] for a sample without any
            best, best_dist = None, max_dist
            for i, gt in enumerate(gts):
                if taken[i] or gt.detection_name != pred.detection_name:
                    continue
                dist = center_distance(gt, pred)  # the devkit's matching distance
                if dist < best_dist:
                    best, best_dist = i, dist
            if best is None:
                continue
            taken[best] = True
            gt = gts[best]
            sight = np.asarray(gt.ego_translation[:2], dtype=np.float64)  # ego -> box centre, global axes
            rng = float(np.linalg.norm(sight))
            u = sight / max(rng, 1e-6)
            offset = np.asarray(pred.translation[:2], dtype=np.float64) - np.asarray(gt.translation[:2])
            yaw = quaternion_yaw(Quaternion(gt.rotation))
            end_on = abs(math.cos(yaw - math.atan2(u[1], u[0])))
            rows.setdefault(gt.detection_name, []).append(
                [offset @ u, u[0] * offset[1] - u[1] * offset[0], rng, end_on])
    return {name: np.array(r) for name, r in rows.items()}


def summarise(offsets):
    """{class: offsets array} -> {class: figures} (means and medians in metres; None where a group is empty)."""
    def mean(x):
        return float(x.mean()) if len(x) else None

    def median(x):
        return float(np.median(x)) if len(x) else None

    out = {}
    for name, r in sorted(offsets.items()):
        radial, tangential, rng, end_on = r.T
        out[name] = {"matched": len(r), "radial_mean": mean(radial), "radial_median": median(radial),
                     "radial_abs_mean": mean(np.abs(radial)), "tangential_abs_mean": mean(np.abs(tangential)),
                     "radial_mean_near": mean(radial[rng < NEAR_RANGE]),
                     "radial_mean_far": mean(radial[rng >= NEAR_RANGE]),
                     "end_on": int((end_on > ALONG).sum()), "radial_median_end_on": median(radial[end_on > ALONG]),
                     "side_on": int((end_on < ACROSS).sum()),
                     "radial_median_side_on": median(radial[end_on < ACROSS])}
    return out


def error_breakdown(results, data_root, version, split, max_dist=2.0):
    """A results file of `split` -> summarise's figures per class (classes without a match are absent)."""
    from nuscenes.eval.common.config import config_factory

    data = read_results(results)
    nusc = load_nuscenes(data_root, version)
    check_results(data["results"], split_sample_tokens(nusc, split), results, split)
    with contextlib.redirect_stderr(io.StringIO()):  # the devkit's progress bars
        pred, _, gt = load_eval_boxes(nusc, config_factory("detection_cvpr_2019"), results, split)
    return summarise(match_offsets(pred, gt, max_dist))


def _fmt(v):
    return "-" if v is None else f"{v:+.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="a nuScenes results file (bev3d test writes results_nusc.json)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--version", default="v1.0-mini")
    p.add_argument("--split", default="mini_val")
    p.add_argument("--max-dist", type=float, default=2.0, help="match radius in metres (the devkit's TP radius)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    try:
        figures = error_breakdown(Path(args.results), args.data_root, args.version, args.split, args.max_dist)
    except Bev3dError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'class':22s} {'matched':>7s} {'radial':>7s} {'median':>7s} {'|radial|':>8s} {'|across|':>8s} "
          f"{'<20 m':>6s} {'>=20 m':>6s} {'end-on':>12s} {'side-on':>12s}")
    for name, f in figures.items():
        print(f"{name:22s} {f['matched']:7d} {_fmt(f['radial_mean']):>7s} {_fmt(f['radial_median']):>7s} "
              f"{f['radial_abs_mean']:8.2f} {f['tangential_abs_mean']:8.2f} {_fmt(f['radial_mean_near']):>6s} "
              f"{_fmt(f['radial_mean_far']):>6s} {f['end_on']:4d} {_fmt(f['radial_median_end_on']):>7s} "
              f"{f['side_on']:4d} {_fmt(f['radial_median_side_on']):>7s}")
    if not figures:
        print("no detection matched a ground-truth box")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"results": str(args.results), "split": args.split,
                                              "max_dist": args.max_dist, "classes": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
