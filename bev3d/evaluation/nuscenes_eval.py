"""`bev3d eval`: score a nuScenes results file with the devkit's own `DetectionEval`
(config `detection_cvpr_2019`), write its `metrics_summary.json` unchanged and print its table.

bev3d adds only checks in front of the devkit, which otherwise fails with bare assertions: the results
must hold exactly the split's sample tokens, every box must have the submission fields, and a side with
no box at all (no prediction, or a split without annotations) still yields the devkit's zero metrics
instead of its "Invalid box type: None" crash.
"""

import contextlib
import io
import json
import os
import time
from pathlib import Path

from bev3d.constants import CLASSES
from bev3d.errors import Bev3dError

# Camera-only submissions; see https://www.nuscenes.org/object-detection (results format).
RESULTS_META = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
BOX_FIELDS = ("sample_token", "translation", "size", "rotation", "velocity", "detection_name",
              "detection_score", "attribute_name")
MAX_BOXES_PER_SAMPLE = 500  # detection_cvpr_2019's max_boxes_per_sample
# The devkit's split -> version rule (nuscenes.eval.common.loaders.load_gt).
SPLIT_VERSION = {"mini_train": "mini", "mini_val": "mini", "train": "trainval", "val": "trainval",
                 "train_detect": "trainval", "train_track": "trainval", "test": "test"}
ERROR_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE",
               "attr_err": "mAAE"}

_NUSC_CACHE = {}


def load_nuscenes(data_root, version):
    """A `nuscenes.NuScenes` for (root, version), loaded once per process."""
    root = Path(data_root).resolve()
    key = (str(root), version)
    if key not in _NUSC_CACHE:
        if not (root / version).is_dir():
            raise Bev3dError(f"No nuScenes tables at {root / version}. Point --data-root at a nuScenes root "
                             f"holding {version}/ (for the synthetic set: `bev3d synth --out {data_root}`).")
        from nuscenes import NuScenes

        with contextlib.redirect_stdout(io.StringIO()):
            _NUSC_CACHE[key] = NuScenes(version=version, dataroot=str(root), verbose=False)
    return _NUSC_CACHE[key]


def split_sample_tokens(nusc, split):
    """Sample tokens of a predefined split, in table order (what the devkit evaluates)."""
    from nuscenes.utils.splits import create_splits_scenes

    version = nusc.version
    valid = [s for s, v in SPLIT_VERSION.items() if version.endswith(v)]
    if split not in SPLIT_VERSION or not version.endswith(SPLIT_VERSION[split]):
        raise Bev3dError(f"Split {split!r} cannot be evaluated on nuScenes {version}; valid splits for this "
                         f"version: {', '.join(valid)}.")
    names = set(create_splits_scenes()[split])
    tokens = [s["token"] for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in names]
    if not tokens:
        raise Bev3dError(f"The dataset at {nusc.dataroot} ({version}) has no scene of split {split!r}.")
    return tokens


def write_results(path, results, meta=None):
    """Write {sample_token: [box dicts]} as a submission file (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"meta": dict(meta or RESULTS_META), "results": results}))
    os.replace(tmp, path)
    return path


def read_results(path):
    path = Path(path)
    if not path.is_file():
        raise Bev3dError(f"Results file {path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Bev3dError(f"Results file {path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or "meta" not in data:
        raise Bev3dError(f"Results file {path} must be a JSON object with a `meta` block and a `results` "
                         f"mapping from sample token to a list of boxes (nuScenes submission format).")
    return data


def check_results(results, split_tokens, path, split):
    """Exactly the split's samples, each box with the submission fields and a detection class."""
    extra = [t for t in results if t not in set(split_tokens)]
    missing = [t for t in split_tokens if t not in results]
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} sample token(s) are not in split {split} (e.g. {extra[0]})")
        if missing:
            parts.append(f"{len(missing)} sample(s) of split {split} are missing (e.g. {missing[0]})")
        raise Bev3dError(f"Results file {path} does not match split {split} ({len(split_tokens)} samples): "
                         f"{' and '.join(parts)}. Every sample of the split must be present, with an empty "
                         f"list where nothing was detected; check --split, --version and --data-root.")
    for token, boxes in results.items():
        if not isinstance(boxes, list):
            raise Bev3dError(f"Results file {path}: results[{token!r}] must be a list of boxes.")
        if len(boxes) > MAX_BOXES_PER_SAMPLE:
            raise Bev3dError(f"Results file {path}: sample {token} has {len(boxes)} boxes; the nuScenes "
                             f"evaluation allows at most {MAX_BOXES_PER_SAMPLE} per sample (keep the top scores).")
        for box in boxes:
            absent = [f for f in BOX_FIELDS if f not in box]
            if absent:
                raise Bev3dError(f"Results file {path}: a box of sample {token} lacks {', '.join(absent)}.")
            if box["detection_name"] not in CLASSES:
                raise Bev3dError(f"Results file {path}: sample {token} has detection_name "
                                 f"{box['detection_name']!r}; valid names: {', '.join(CLASSES)}.")


def _count_gt(nusc, split_tokens):
    """Annotations of a detection class in these samples (what the devkit's load_gt keeps)."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    return sum(category_to_detection_name(nusc.get("sample_annotation", a)["category_name"]) is not None
               for t in split_tokens for a in nusc.get("sample", t)["anns"])


def load_eval_boxes(nusc, config, results_path, split):
    """(predictions, meta, ground truth) as the devkit's DetectionEval.__init__ loads them (EvalBoxes of
    DetectionBox with their ego distances, filtered by class range, LiDAR points and bike racks), except that a
    side holding no box is not filtered (the devkit's filter cannot tell the box type of an empty set)."""
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt, load_prediction
    from nuscenes.eval.detection.data_classes import DetectionBox

    pred, meta = load_prediction(str(results_path), config.max_boxes_per_sample, DetectionBox)
    sides = []
    for boxes in (pred, load_gt(nusc, split, DetectionBox)):
        boxes = add_center_dist(nusc, boxes)
        sides.append(filter_eval_boxes(nusc, boxes, config.class_range) if boxes.all else boxes)
    return sides[0], meta, sides[1]


def _evaluator_without_boxes(nusc, config, results_path, split, out_dir):
    """The devkit's DetectionEval, set up as its __init__ does but without filtering a side that holds no
    box; its evaluate() then scores AP 0, errors 1."""
    from nuscenes.eval.detection.evaluate import DetectionEval

    ev = DetectionEval.__new__(DetectionEval)
    ev.nusc, ev.cfg, ev.result_path, ev.eval_set, ev.verbose = nusc, config, str(results_path), split, False
    ev.output_dir = str(out_dir)
    ev.plot_dir = os.path.join(ev.output_dir, "plots")
    os.makedirs(ev.plot_dir, exist_ok=True)
    ev.pred_boxes, ev.meta, ev.gt_boxes = load_eval_boxes(nusc, config, results_path, split)
    ev.sample_tokens = ev.gt_boxes.sample_tokens
    return ev


def flat_metrics(summary):
    """metrics_summary.json -> flat scalars: mAP, NDS, mATE..mAAE, AP_<class>."""
    flat = {"mAP": summary["mean_ap"], "NDS": summary["nd_score"]}
    flat.update({ERROR_NAMES[k]: v for k, v in summary["tp_errors"].items()})
    flat.update({f"AP_{k}": v for k, v in summary["mean_dist_aps"].items()})
    return flat


def evaluate_results(results_path, data_root, version, split, out_dir=None, plots=False, quiet=False):
    """Score a results file with DetectionEval('detection_cvpr_2019'); returns its metrics summary dict
    (also written to OUT_DIR/metrics_summary.json). `quiet` silences the devkit's printed table."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    results_path = Path(results_path)
    out_dir = Path(out_dir) if out_dir else results_path.parent
    data = read_results(results_path)
    nusc = load_nuscenes(data_root, version)
    tokens = split_sample_tokens(nusc, split)
    check_results(data["results"], tokens, results_path, split)
    config = config_factory("detection_cvpr_2019")
    n_pred = sum(len(b) for b in data["results"].values())
    n_gt = _count_gt(nusc, tokens)
    notes = []
    if n_gt == 0:
        notes.append(f"Split {split} of {nusc.dataroot} has no annotated box of a detection class: "
                     f"every metric is 0 (AP 0, errors 1).")
    if n_pred == 0:
        notes.append(f"{results_path} holds no predicted box: every AP is 0 and every error 1.")
    sink = io.StringIO()
    quiet_ctx = (contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink)) if quiet else ()
    with contextlib.ExitStack() as stack:
        for ctx in quiet_ctx:
            stack.enter_context(ctx)
        for note in notes:
            print(note)
        if n_pred and n_gt:
            ev = DetectionEval(nusc, config, str(results_path), split, output_dir=str(out_dir), verbose=False)
        else:
            ev = _evaluator_without_boxes(nusc, config, results_path, split, out_dir)
            plots = False  # the devkit's curve plots need boxes on both sides
        summary = ev.main(plot_examples=0, render_curves=plots)
    return summary


def main(args):
    start = time.perf_counter()
    out_dir = Path(args.out) if args.out else Path(args.results).parent
    evaluate_results(args.results, args.data_root, args.version, args.split, out_dir, plots=args.plots)
    print(f"\nmetrics_summary.json written to {out_dir} ({time.perf_counter() - start:.1f} s)")
    return 0
