"""Inference over a split: model -> post-processor -> evaluator, on every rank; metrics on rank 0."""

import time

import torch
from torch.utils.data import DataLoader

from bev3d.engine import distributed as dist
from bev3d.engine.runtime import autocast, resolve_amp, to_device


def val_loader(cfg, dataset, streaming=False):
    """Each rank takes every world_size-th sample, without the padding DistributedSampler adds. A streaming model
    gets every world_size-th scene instead, one sample per batch in time order, marked where a scene starts."""
    from bev3d.data import collate_fn_for

    if streaming:
        from bev3d.data.streaming import StreamingDataset, scene_sequences, scenes_for_rank

        order = scenes_for_rank(scene_sequences(dataset), dist.get_rank(), dist.get_world_size())
        return DataLoader(StreamingDataset(dataset), batch_size=1, sampler=order, num_workers=cfg.data.num_workers,
                          collate_fn=collate_fn_for(cfg))
    indices = list(range(dist.get_rank(), len(dataset), dist.get_world_size()))
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=indices, num_workers=cfg.data.num_workers,
                      collate_fn=collate_fn_for(cfg))


@torch.no_grad()
def infer(model, postprocess, evaluator, loader, device, amp):
    """This rank's evaluator items for every batch of `loader`. A streaming model starts and ends with an empty
    memory (training continues from a fresh one after a periodic evaluation)."""
    model.eval()
    reset = getattr(model, "reset_memory", lambda: None)
    reset()
    items = []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            detections = postprocess(model(batch), batch)
        items += evaluator.process(batch, detections)
    reset()
    return items


def evaluate(cfg, model, postprocess, evaluator, dataset, out_dir, device, plots=False, quiet=False):
    """Inference on every rank, metrics on rank 0 -> (flat metrics, or None off rank 0; timing stats)."""
    amp = resolve_amp(cfg.train.amp, device, warn=lambda text: None)
    start = time.perf_counter()
    loader = val_loader(cfg, dataset, streaming=getattr(model, "streaming", False))
    local = infer(model, postprocess, evaluator, loader, device, amp)
    seconds = time.perf_counter() - start
    parts = dist.gather_to_main(local)
    stats = {"samples": len(dataset), "inference_s": seconds,
             "s_per_sample": seconds * dist.get_world_size() / max(len(dataset), 1)}
    if parts is None:
        return None, stats
    start = time.perf_counter()
    metrics = evaluator.evaluate([item for part in parts for item in part], out_dir, plots=plots, quiet=quiet)
    stats["eval_s"] = time.perf_counter() - start
    return metrics, stats


class PeriodicEvaluation:
    """`bev3d train`'s evaluation on the validation split: model -> flat metrics on rank 0 (None elsewhere).
    The data set and its evaluator are built on first use."""

    def __init__(self, cfg, device):
        from bev3d.evaluation.evaluators import evaluator_class
        from bev3d.models import build_postprocess

        self.cfg, self.device = cfg, device
        self.postprocess = build_postprocess(cfg)
        self.best_metric = evaluator_class(cfg).best_metric
        self.dataset = self.evaluator = None

    def __call__(self, model, out_dir):
        from bev3d.data import build_dataset
        from bev3d.evaluation.evaluators import build_evaluator

        if self.dataset is None:
            self.dataset = build_dataset(self.cfg, self.cfg.data.val_split)
            self.evaluator = build_evaluator(self.cfg, self.dataset)
        metrics, _ = evaluate(self.cfg, model, self.postprocess, self.evaluator, self.dataset, out_dir, self.device,
                              quiet=True)
        return metrics
