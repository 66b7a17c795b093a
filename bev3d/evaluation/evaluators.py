"""Evaluators: a model's detections on a split -> metrics (nuScenes through the devkit, COCO box AP).

The engine's inference loop (bev3d.engine.inference) calls `process(batch, detections)` on every rank and
hands all ranks' items to `evaluate(items, out_dir)` on rank 0, which returns flat metrics
(`best_metric` names the one that picks best.pth).
"""

import json
from pathlib import Path

import torch

from bev3d.errors import Bev3dError
from bev3d.evaluation.nuscenes_eval import (MAX_BOXES_PER_SAMPLE, evaluate_results, flat_metrics, load_nuscenes,
                                            split_sample_tokens, write_results)


class NuScenesEvaluator:
    """Detections (LiDAR frame) -> `results_nusc.json` (global frame, every sample of the split) -> the devkit's
    DetectionEval -> `metrics_summary.json` and flat metrics (mAP, NDS, mATE, ..., AP_<class>)."""

    best_metric = "NDS"

    def __init__(self, cfg, dataset=None):
        self.data, self.score_thr = cfg.data, cfg.eval.score_thr

    def process(self, batch, detections):
        from bev3d.data import boxes_to_nuscenes

        items = []
        for info, out in zip(batch["infos"], detections):
            scores = out["scores"].float()
            keep = torch.nonzero(scores >= self.score_thr).flatten()
            keep = keep[scores[keep].argsort(descending=True)][:MAX_BOXES_PER_SAMPLE]
            items.append((info["sample_token"], boxes_to_nuscenes(
                out["boxes"][keep].float().cpu().numpy(), scores[keep].cpu().numpy(),
                out["labels"][keep].cpu().numpy(), info)))
        return items

    def evaluate(self, items, out_dir, plots=False, quiet=False):
        d = self.data
        results = dict(items)
        nusc = load_nuscenes(d.root, d.version)
        missing = [t for t in split_sample_tokens(nusc, d.val_split) if t not in results]
        if missing and d.skip_bad_samples:  # skipped samples are scored as "nothing detected"
            print(f"WARNING: {len(missing)} sample(s) of {d.val_split} were skipped and count as empty.")
            results.update({t: [] for t in missing})
        path = write_results(Path(out_dir) / "results_nusc.json", results)
        summary = evaluate_results(path, d.root, d.version, d.val_split, out_dir, plots=plots, quiet=quiet)
        return flat_metrics(summary)


class CocoBoxEvaluator:
    """COCO box AP (pycocotools) of detections with boxes in original-image pixels -> `coco_metrics.json`."""

    best_metric = "AP"

    def __init__(self, cfg, dataset):
        self.ann_file = dataset.ann_file

    def process(self, batch, detections):
        return [(image_id, {k: v.float().cpu() for k, v in det.items()})
                for image_id, det in zip(batch["image_id"], detections)]

    def evaluate(self, items, out_dir, plots=False, quiet=False):
        from bev3d.evaluation.coco_eval import CocoEvaluator

        evaluator = CocoEvaluator(self.ann_file)
        evaluator.update([i for i, _ in items], [d for _, d in items])
        metrics = evaluator.summarize()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "coco_metrics.json").write_text(json.dumps(metrics, indent=2))
        if not quiet:
            print("\n".join(f"{k:10s} {v:.4f}" for k, v in metrics.items()))
        return metrics


EVALUATORS = {"nuscenes": NuScenesEvaluator, "coco": CocoBoxEvaluator}


def evaluator_class(cfg):
    """The evaluator class of `cfg.data.type` (its `best_metric` is known before any data is read)."""
    if cfg.data.type not in EVALUATORS:
        raise Bev3dError(f"Config key data.type is {cfg.data.type!r}; valid: {', '.join(EVALUATORS)}.")
    return EVALUATORS[cfg.data.type]


def build_evaluator(cfg, dataset):
    """The evaluator of `cfg.data.type` for `dataset` (the split being evaluated)."""
    return evaluator_class(cfg)(cfg, dataset)
