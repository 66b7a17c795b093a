"""`bev3d train`: the one training loop, for every model.

Per micro-batch: `losses = criterion(model(batch, targets), targets)` with `targets = batch["targets"]`;
the objective is the sum of the criterion's weighted terms (`criterion.weighted`), the other entries are
only logged. One iteration is one optimizer step (`train.accumulate` micro-batches).

Exact resume: the sampler permutation depends only on (seed, epoch), the DataLoader's worker seeds
come from a generator seeded the same way, and the checkpoint holds every rank's Python/NumPy/torch RNG
state, so 2 epochs straight equal 1 epoch + `--resume` bitwise on CPU (mid-epoch, e.g. after Ctrl-C,
exactly so with `data.num_workers: 0`; with workers, augmentation draws may differ after the resume).
A streaming model (`model.streaming`, StreamPETR) walks scenes in time order instead
(bev3d.data.streaming.StreamingBatchSampler, also a function of (seed, epoch) only), and every rank's memory
goes into the checkpoint, so its mid-epoch resume is exact as well.
"""

import contextlib
import itertools
import math
import signal
import threading
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from bev3d.config import cli_overrides, config_to_dict, dump_config, load_config
from bev3d.engine import distributed as dist
from bev3d.engine.checkpoint import CheckpointManager, latest_checkpoint, load_checkpoint, rng_state, set_rng_state
from bev3d.engine.logger import TrainLogger
from bev3d.engine.optim import build_optimizer, build_scheduler
from bev3d.engine.runtime import autocast, preserved_rng, resolve_amp, seed_everything, to_device
from bev3d.errors import Bev3dError

class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (after a mid-epoch resume)."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return self.num_samples - self.skip


def _worker_ignores_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C / SIGTERM to the main process, which stops at a step boundary and
    shuts them down; a worker dying on the signal would abort the step mid-way instead."""
    for s in _StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class _StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM (what torchrun and job schedulers send) only sets a flag, so
    the loop stops at the next step boundary and saves; a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Trainer:
    def __init__(self, cfg, model, criterion, train_set, collate_fn=None, evaluator=None, device=None):
        self.cfg = cfg
        tc = cfg.train
        self.device = device or torch.device("cpu")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.work_dir = Path(cfg.work_dir)
        self.amp = resolve_amp(tc.amp, self.device, warn=self._warn)
        if tc.accumulate < 1:
            raise Bev3dError(f"Config key train.accumulate must be >= 1, got {tc.accumulate}.")

        self.model = model.to(self.device)
        self.ddp_model = self.model
        if self.world_size > 1:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=tc.find_unused_parameters)
        self.criterion = criterion
        self.train_set = train_set
        self.collate_fn = collate_fn
        self.evaluator = evaluator
        self.batch_size = cfg.data.batch_size
        # a streaming model (StreamPETR) carries a memory from step to step: it gets scenes in time order
        self.streaming = getattr(model, "streaming", False)
        if self.streaming:
            self.sampler = streaming_sampler(cfg, train_set, self.world_size, self.rank)
            self.model.memory_groups = self.sampler.interleave  # each group of streams keeps its memory
            self.steps_per_epoch = self.sampler.steps // tc.accumulate
        else:
            self.sampler = ResumableSampler(train_set, self.world_size, self.rank, tc.seed)
            self.steps_per_epoch = self.sampler.num_samples // self.batch_size // tc.accumulate
        if self.steps_per_epoch == 0:
            raise Bev3dError(
                f"The training split has {len(train_set)} samples: too few for data.batch_size="
                f"{self.batch_size} x train.accumulate={tc.accumulate} x {self.world_size} processes. "
                f"Lower data.batch_size or train.accumulate.")
        self.total_iters = tc.max_iters if tc.max_iters > 0 else tc.max_epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc, self.total_iters)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.ckpts = CheckpointManager(self.work_dir, tc.keep_last, getattr(evaluator, "best_metric", None))
        self.epoch = 0  # completed epochs
        self.iter = 0  # completed optimizer steps
        self.iter_in_epoch = 0
        self.bad_steps = 0

    def _warn(self, text):
        if self.is_main:
            print(f"WARNING: {text}", flush=True)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, rng_states, memories=None):
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "epoch": self.epoch,
            "iter": self.iter,
            "iter_in_epoch": self.iter_in_epoch,
            "bad_steps": self.bad_steps,
            "world_size": self.world_size,
            "checkpoints": self.ckpts.state_dict(),
            "config": config_to_dict(self.cfg),
        }
        if memories is not None:
            state["stream_memory"] = memories  # every rank's memory: a mid-epoch resume continues the streams
        return state

    def save(self, name, metrics=None, collective=True):
        """Rank 0 writes; with `collective` every rank's RNG state goes into the file (all ranks must call)."""
        states = dist.gather_to_main(rng_state()) if collective else [rng_state()]
        memories = None
        if self.streaming:
            memory = self.model.memory_state()
            memories = dist.gather_to_main(memory) if collective else [memory]
        path = None
        if self.is_main:
            path = self.ckpts.save(self.state_dict(states, memories), name, metrics)
        if collective:
            dist.barrier()
        return path

    def resume(self, ckpt):
        path = latest_checkpoint(self.work_dir) if ckpt == "latest" else Path(ckpt)
        if path is None:
            raise Bev3dError(f"--resume: no checkpoint in {self.work_dir}. Give a checkpoint path or the work "
                             f"dir of the run to continue (--work-dir).")
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.ckpts.load_state_dict(state.get("checkpoints", {}))
        self.epoch, self.iter = state["epoch"], state["iter"]
        self.iter_in_epoch, self.bad_steps = state["iter_in_epoch"], state["bad_steps"]
        rngs = state["rng"]
        memories = state.get("stream_memory")
        if self.streaming:
            self.model.load_memory_state(memories[self.rank] if memories and len(memories) == self.world_size
                                         else None)
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        else:
            self._warn(f"{path} was written by {len(rngs)} processes, this run has {self.world_size}: "
                       f"random streams restart from train.seed, so the run is not bitwise reproducible.")
            seed_everything(self.cfg.train.seed + 1000 * self.iter + self.rank)
        if self.is_main:
            print(f"resumed from {path} at epoch {self.epoch}, iteration {self.iter}", flush=True)

    # ------------------------------------------------------------------ loop

    def _loader(self):
        tc = self.cfg.train
        generator = torch.Generator().manual_seed(tc.seed * 100003 + self.epoch * 1009 + self.rank)
        workers = self.cfg.data.num_workers
        if self.streaming:
            from bev3d.data.streaming import StreamingDataset

            self.sampler.set_epoch(self.epoch, skip=self.iter_in_epoch * tc.accumulate)
            order = dict(dataset=StreamingDataset(self.train_set), batch_sampler=self.sampler)
        else:
            self.sampler.set_epoch(self.epoch, skip=self.iter_in_epoch * self.batch_size * tc.accumulate)
            order = dict(dataset=self.train_set, batch_size=self.batch_size, sampler=self.sampler, drop_last=True)
        return DataLoader(**order, num_workers=workers, collate_fn=self.collate_fn, generator=generator,
                          worker_init_fn=_worker_ignores_stop_signals if workers > 0 else None,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=2 if workers > 0 else None)

    def fit(self, resume=None):
        tc = self.cfg.train
        if self.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / "config.yaml").write_text(dump_config(self.cfg))
        dist.barrier()
        if resume:
            self.resume(resume)
        else:
            seed_everything(tc.seed + self.rank)
        log = TrainLogger(self.work_dir, self.total_iters, tc.log_interval, self.is_main, self.iter,
                          tensorboard=tc.tensorboard)
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.print(f"training {type(self.model).__name__} ({n_params / 1e6:.2f}M trainable parameters) on "
                  f"{len(self.train_set)} samples: {self.steps_per_epoch} iterations/epoch, {self.total_iters} "
                  f"in all, {self.world_size} process(es) x batch {self.batch_size} x accumulate {tc.accumulate}, "
                  f"device {self.device}, amp {self.amp}; work dir {self.work_dir}")
        self.model.train()
        try:
            with _StopRequest() as stop:
                self._run(log, stop)
        finally:
            log.close()
        return self.work_dir

    def _run(self, log, stop):
        tc = self.cfg.train
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums, count = {}, 0
        while self.iter < self.total_iters:
            micro, window_bad, stop_seen = 0, False, False
            loader = iter(self._loader())
            while self.iter_in_epoch < self.steps_per_epoch and self.iter < self.total_iters:
                try:
                    batch = next(loader)
                except (RuntimeError, StopIteration):
                    if stop.requested:  # Ctrl-C also reached the DataLoader workers
                        self._interrupt(log, collective=False)
                    raise
                batch = to_device(batch, self.device)
                targets = batch["targets"]
                sync = (micro + 1) % tc.accumulate == 0
                no_sync = self.ddp_model.no_sync() if self.world_size > 1 and not sync else contextlib.nullcontext()
                with no_sync:
                    with autocast(self.device, self.amp):
                        losses = self.criterion(self.ddp_model(batch, targets), targets)
                    weighted = self.criterion.weighted(losses)
                    loss = sum(weighted.values())
                    if not torch.is_tensor(loss):
                        raise Bev3dError(f"{type(self.criterion).__name__} gave no weighted loss term (entries: "
                                         f"{sorted(losses)}, weights: {self.criterion.weight_dict}).")
                    bad, stop_flag = dist.all_reduce_max(
                        [float(not torch.isfinite(loss.detach()).item()), float(stop.requested)], self.device)
                    if not bad:
                        self.scaler.scale(loss / tc.accumulate).backward()
                window_bad |= bool(bad)
                stop_seen |= bool(stop_flag)
                if not bad:
                    for k, v in losses.items():  # the weighted value of every weighted term
                        sums[k] = sums.get(k, 0.0) + float(weighted.get(k, v).detach())
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                    count += 1
                micro += 1
                if not sync:
                    continue
                grad_norm = self._step(params, window_bad, log)
                window_bad = False
                if self.iter % tc.log_interval == 0 or self.iter == self.total_iters:
                    means = dist.reduce_mean({k: v / max(count, 1) for k, v in sums.items()}, self.device)
                    lr = self.optimizer.param_groups[0]["lr"]
                    log.step(self.iter, self.epoch + 1, means, lr, grad_norm, self.device)
                    sums, count = {}, 0
                if stop_seen:
                    self._interrupt(log)
            if self.iter_in_epoch == self.steps_per_epoch:
                self.epoch += 1
                self.iter_in_epoch = 0
                self._end_of_epoch(log)
            elif self.iter == self.total_iters:  # train.max_iters reached inside an epoch
                metrics = self._evaluate(log) if self.evaluator is not None else None
                self.save(f"iter_{self.iter}.pth", metrics)

    def _step(self, params, bad, log):
        tc = self.cfg.train
        grad_norm = float("nan")
        if not bad:
            self.scaler.unscale_(self.optimizer)
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            # With fp16 the scaler itself skips steps whose gradients overflowed.
            bad = not math.isfinite(grad_norm) and not self.scaler.is_enabled()
            if not bad:
                self.scaler.step(self.optimizer)
                self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.iter += 1
        self.iter_in_epoch += 1
        if not bad:
            self.bad_steps = 0
            return grad_norm
        self.bad_steps += 1
        log.warn(f"non-finite loss or gradient at iteration {self.iter} (epoch {self.epoch + 1}): step skipped "
                 f"({self.bad_steps}/{tc.max_bad_steps} in a row)")
        if self.bad_steps >= tc.max_bad_steps:
            path = self.save(f"iter_{self.iter}.pth")
            raise Bev3dError(
                f"Training stopped at iteration {self.iter} (epoch {self.epoch + 1}): the loss or gradient was "
                f"non-finite for {self.bad_steps} consecutive iterations (train.max_bad_steps). Checkpoint "
                f"saved to {path or self.work_dir}. Lower train.lr, keep train.grad_clip > 0, try train.amp=off, "
                f"or check the data for broken samples.")
        return grad_norm

    def _interrupt(self, log, collective=True):
        if self.iter_in_epoch == self.steps_per_epoch:  # stopped on an epoch's last step: resume at the next
            self.epoch, self.iter_in_epoch = self.epoch + 1, 0
        path = self.save(f"iter_{self.iter}.pth", collective=collective)
        log.print(f"interrupted at iteration {self.iter}: checkpoint saved to {path}; continue with --resume")
        raise KeyboardInterrupt

    def _evaluate(self, log):
        with preserved_rng():
            metrics = self.evaluator(self.model, self.work_dir / f"eval_epoch_{self.epoch}")
        self.model.train()
        metrics = dist.broadcast_from_main(metrics)
        log.evaluation(self.iter, self.epoch, metrics)
        return metrics

    def _end_of_epoch(self, log):
        ec, tc = self.cfg.eval, self.cfg.train
        last = self.iter == self.total_iters
        metrics = None
        if self.evaluator is not None and ec.interval > 0 and (self.epoch % ec.interval == 0 or last):
            metrics = self._evaluate(log)
        if self.epoch % max(tc.ckpt_interval, 1) == 0 or last:
            self.save(f"epoch_{self.epoch}.pth", metrics)


def streaming_sampler(cfg, train_set, world_size, rank):
    """The StreamingBatchSampler of a streaming model: train.stream_segments segments per scene."""
    from bev3d.data.streaming import StreamingBatchSampler, scene_sequences, split_segments

    segments, interleave = cfg.train.stream_segments, cfg.train.stream_interleave
    if segments < 1:
        raise Bev3dError(f"train.stream_segments must be >= 1 (segments per scene), got {segments}.")
    if interleave < 1:
        raise Bev3dError(f"train.stream_interleave must be >= 1 (groups of streams taken in turn), got {interleave}.")
    sampler = StreamingBatchSampler(split_segments(scene_sequences(train_set), segments), cfg.data.batch_size,
                                    world_size, rank, cfg.train.seed, interleave=interleave)
    if sampler.steps < cfg.train.accumulate:
        raise Bev3dError(f"The training split has {len(train_set)} samples: too few for {sampler.num_streams} "
                         f"streams (train.stream_interleave={interleave} x data.batch_size={cfg.data.batch_size} x "
                         f"{world_size} processes) x train.accumulate={cfg.train.accumulate}. Lower "
                         f"train.stream_interleave, data.batch_size or train.accumulate.")
    return sampler


# ----------------------------------------------------------------------------- CLI


def build_train_components(cfg, device):
    """Model, criterion, training set, collate function and periodic evaluation for a config."""
    from bev3d.data import build_dataset, collate_fn_for
    from bev3d.engine.inference import PeriodicEvaluation
    from bev3d.models import build_criterion, build_model

    evaluator = PeriodicEvaluation(cfg, device) if cfg.eval.interval > 0 else None
    seed_everything(cfg.train.seed)  # identical initial weights on every rank and every run
    model = build_model(cfg)
    train_set = build_dataset(cfg, cfg.data.train_split)
    return model, build_criterion(cfg), train_set, collate_fn_for(cfg), evaluator


def train(cfg, resume=None):
    """Train `cfg` (the config's model and data) under torchrun or in one process; returns the work dir."""
    device = dist.init_distributed()
    try:
        model, criterion, train_set, collate_fn, evaluator = build_train_components(cfg, device)
        trainer = Trainer(cfg, model, criterion, train_set, collate_fn, evaluator, device)
        return trainer.fit(resume=resume)
    finally:
        dist.cleanup()


def main(args):
    cfg = load_config(args.cfg, cli_overrides(args))
    train(cfg, resume=args.resume)
    return 0
