"""`bev3d test`: inference on the validation split -> `results_nusc.json` (nuScenes submission format,
global frame, every sample of the split) -> the devkit's metrics. Also the periodic evaluators of
`bev3d train` (nuScenes; COCO box AP for the 2D detectors)."""

import functools
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bev3d.config import load_config
from bev3d.engine import distributed as dist
from bev3d.engine.checkpoint import load_checkpoint
from bev3d.engine.train import autocast, config_overrides, resolve_amp, to_device
from bev3d.errors import Bev3dError
from bev3d.evaluation.nuscenes_eval import (MAX_BOXES_PER_SAMPLE, evaluate_results, flat_metrics, load_nuscenes,
                                            split_sample_tokens, write_results)


def collate_fn_for(cfg):
    if cfg.data.type == "coco":
        from bev3d.data import coco

        return functools.partial(coco.collate, pad_divisor=cfg.data.pad_divisor)
    from bev3d.data import collate

    return collate


def val_loader(cfg, dataset):
    """Each rank takes every world_size-th sample, without the padding DistributedSampler adds."""
    indices = list(range(dist.get_rank(), len(dataset), dist.get_world_size()))
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=indices, num_workers=cfg.data.num_workers,
                      collate_fn=collate_fn_for(cfg))


@torch.no_grad()
def predict(model, loader, device, amp, score_thr):
    """{sample_token: [devkit result dicts]} for this rank's samples."""
    from bev3d.data import boxes_to_nuscenes

    model.eval()
    results = {}
    for batch in loader:
        with autocast(device, amp):
            outputs = model(to_device(batch, device))
        for info, out in zip(batch["infos"], outputs):
            scores = out["scores"].float()
            keep = torch.nonzero(scores >= score_thr).flatten()
            keep = keep[scores[keep].argsort(descending=True)][:MAX_BOXES_PER_SAMPLE]
            results[info["sample_token"]] = boxes_to_nuscenes(
                out["boxes"][keep].float().cpu().numpy(), scores[keep].cpu().numpy(),
                out["labels"][keep].cpu().numpy(), info)
    return results


def run_test(cfg, model, dataset, out_dir, device, plots=False, quiet=False):
    """Inference + evaluation; returns (metrics summary, stats) on rank 0 and (None, stats) elsewhere."""
    out_dir = Path(out_dir)
    amp = resolve_amp(cfg.train.amp, device, warn=lambda text: None)
    start = time.perf_counter()
    local = predict(model, val_loader(cfg, dataset), device, amp, cfg.eval.score_thr)
    seconds = time.perf_counter() - start
    parts = dist.gather_to_main(local)
    stats = {"samples": len(dataset), "inference_s": seconds,
             "s_per_sample": seconds * dist.get_world_size() / max(len(dataset), 1)}
    if parts is None:
        return None, stats
    results = {k: v for part in parts for k, v in part.items()}
    nusc = load_nuscenes(cfg.data.root, cfg.data.version)
    missing = [t for t in split_sample_tokens(nusc, cfg.data.val_split) if t not in results]
    if missing and cfg.data.skip_bad_samples:  # skipped samples are scored as "nothing detected"
        print(f"WARNING: {len(missing)} sample(s) of {cfg.data.val_split} were skipped and count as empty.")
        results.update({t: [] for t in missing})
    path = write_results(out_dir / "results_nusc.json", results)
    start = time.perf_counter()
    summary = evaluate_results(path, cfg.data.root, cfg.data.version, cfg.data.val_split, out_dir, plots=plots,
                               quiet=quiet)
    stats["eval_s"] = time.perf_counter() - start
    return summary, stats


class _Evaluator:
    """Periodic evaluation for `bev3d train`: model -> flat metrics on rank 0 (None elsewhere)."""

    best_metric = None

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.device = device
        self.dataset = None

    def __call__(self, model, out_dir):
        from bev3d.data import build_dataset

        if self.dataset is None:
            self.dataset = build_dataset(self.cfg, self.cfg.data.val_split)
        return self.evaluate(model, Path(out_dir))


class NuScenesEvaluator(_Evaluator):
    best_metric = "NDS"

    def evaluate(self, model, out_dir):
        summary, _ = run_test(self.cfg, model, self.dataset, out_dir, self.device, quiet=True)
        return flat_metrics(summary) if summary is not None else None


class CocoBoxEvaluator(_Evaluator):
    """COCO box AP (pycocotools) of a 2D detector whose eval output holds boxes in original-image pixels."""

    best_metric = "AP"

    @torch.no_grad()
    def evaluate(self, model, out_dir):
        from bev3d.evaluation.coco_eval import CocoEvaluator

        model.eval()
        amp = resolve_amp(self.cfg.train.amp, self.device, warn=lambda text: None)
        local = []
        for batch in val_loader(self.cfg, self.dataset):
            with autocast(self.device, amp):
                outputs = model(to_device(batch, self.device))
            local.append((batch["image_id"], [{k: v.float().cpu() for k, v in o.items()} for o in outputs]))
        parts = dist.gather_to_main(local)
        if parts is None:
            return None
        evaluator = CocoEvaluator(self.dataset.ann_file)
        for part in parts:
            for image_ids, detections in part:
                evaluator.update(image_ids, detections)
        metrics = evaluator.summarize()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "coco_metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


EVALUATORS = {"nuscenes": NuScenesEvaluator, "coco": CocoBoxEvaluator}


def build_evaluator(cfg, device):
    if cfg.data.type not in EVALUATORS:
        raise Bev3dError(f"Config key data.type is {cfg.data.type!r}; valid: {', '.join(EVALUATORS)}.")
    return EVALUATORS[cfg.data.type](cfg, device)


def load_weights(model, ckpt_path):
    state = load_checkpoint(ckpt_path)
    weights = state["model"] if "model" in state else state
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise Bev3dError(f"Checkpoint {ckpt_path} does not fit the model of this config: "
                         f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}. "
                         f"Use the config the checkpoint was trained with.") from None
    return state


def evaluate_checkpoint(cfg, ckpt, out_dir=None, plots=False):
    """Evaluate checkpoint `ckpt` of config `cfg`; returns (metrics summary or None off rank 0, stats)."""
    from bev3d.data import build_dataset
    from bev3d.models import build_model

    device = dist.init_distributed()
    try:
        model = build_model(cfg).to(device)
        load_weights(model, ckpt)
        out_dir = Path(out_dir) if out_dir else Path(cfg.work_dir) / "test"
        if cfg.data.type != "nuscenes":
            metrics = build_evaluator(cfg, device)(model, out_dir)
            if metrics is not None:
                print("\n".join(f"{k:10s} {v:.4f}" for k, v in metrics.items()))
                print(f"metrics written to {out_dir / 'coco_metrics.json'}")
            return metrics, {}
        dataset = build_dataset(cfg, cfg.data.val_split)
        summary, stats = run_test(cfg, model, dataset, out_dir, device, plots=plots)
        if dist.is_main_process():
            print(f"\n{stats['samples']} samples, inference {stats['s_per_sample'] * 1000:.1f} ms/sample "
                  f"({dist.get_world_size()} process(es)), evaluation {stats['eval_s']:.1f} s; "
                  f"results and metrics_summary.json in {out_dir}")
        return summary, stats
    finally:
        dist.cleanup()


def main(args):
    cfg = load_config(args.cfg, config_overrides(args))
    evaluate_checkpoint(cfg, args.ckpt, args.out, plots=args.plots)
    return 0
