"""Train RawNet2 with the reference recipe, on one process or one process per device.

One device or the CPU:
    python -m rawnet_lib.train --config demo
8 GPUs / NPUs on one machine (`--devices 8` alone starts the same torchrun):
    torchrun --standalone --nproc_per_node=8 -m rawnet_lib.train --config paper --data_path /data/DB --batch_size 96
2 machines x 8 devices (the same on each; scripts/slurm_train.sh does it under Slurm):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=host0:29500 \\
        -m rawnet_lib.train --config paper --data_path /data/DB --batch_size 96
The global batch must split over the ranks (the paper's 100 does over 2 or 4; 96 over 8, 16, 32).
Any config field is a flag (`--epochs 3 --amp bf16`); `--config` takes a preset name or a YAML.
notebooks/train.ipynb starts the same command through `rawnet_lib.training.launch`.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from rawnet_lib import dist
from rawnet_lib.config import Config, ConfigError, cli_config, cli_parser
from rawnet_lib.dataset.augment import Augmenter, builtin_babble
from rawnet_lib.dataset.check import DatasetError
from rawnet_lib.dataset.loader import batch_keys, training_loader
from rawnet_lib.dataset.trials import read_trials
from rawnet_lib.dataset.utterances import CropDataset, UtteranceList, load_utterances, resolve_data_path
from rawnet_lib.errors import run_cli
from rawnet_lib.eval.embed import autocast, embed_files
from rawnet_lib.io import file_sha1
from rawnet_lib.models.checkpoint import CheckpointError, init_from_checkpoint, resume_training
from rawnet_lib.models.losses import MarginLoss, build_loss
from rawnet_lib.models.rawnet2 import build_model
from rawnet_lib.training import schedules
from rawnet_lib.training.launch import launch
from rawnet_lib.training.run import (LOG_EVERY, NonFiniteLossError, RunDir, best_epoch, check_validation, corpus_facts,
                                     data_changes, resolve_checkpoint, validation_roots)

__all__ = ["train", "train_epoch", "validate", "main"]

READ_SECONDS = 2.0  # the host reads the running figures at least this often (and every LOG_EVERY steps)


def train_epoch(model, loader, optimizer, scheduler, scaler, cfg: Config, rank: dist.RankInfo,
                epoch: int, run: RunDir, max_steps: int | None = None,
                criterion: MarginLoss | None = None) -> dict[str, float]:
    """One pass over the loader (or max_steps steps); returns loss, accuracy, throughput and the
    loader's figures (share of the time spent waiting for data, its own crops/s).

    No step waits for the device: `_EpochMeter` adds the loss, the correct count and the first
    non-finite step up in device tensors, which the host reads only when due (every LOG_EVERY
    steps or READ_SECONDS seconds, and at the last step).
    """
    model.train()
    criterion = criterion or build_loss(cfg.loss)
    steps = min(len(loader), max_steps or len(loader))
    warmup = min(cfg.train.warmup_steps, steps // 2)  # short epochs still get a throughput figure
    bar = run.progress_bar(steps, f"epoch {epoch}")
    profiler = run.profiler() if cfg.train.profile and epoch == 1 else None
    meter = _EpochMeter(rank.device)
    batches = iter(loader)
    for step in range(1, steps + 1):
        if step == warmup + 1:
            meter.start_timing()  # throughput excludes the warm-up steps
        t0 = time.perf_counter()
        x, y, make_seconds = next(batches)
        meter.batch(len(y), time.perf_counter() - t0, make_seconds)
        x, y = x.to(rank.device, non_blocking=True), y.to(rank.device, non_blocking=True)
        # forward, backward, step (fp16: the scaler skips steps whose gradients overflow)
        with autocast(rank.device, cfg.train.amp):
            logits = model(x)
            loss = criterion(logits.float(), y, epoch)  # the head's loss (softmax: cross-entropy)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # keras decay: every iteration
        meter.add(step, loss, logits, y)
        if profiler is not None:
            profiler.step()
        bar.update()
        if meter.due(step, steps):
            loss_avg, acc, bad = meter.read()
            if bad and cfg.train.amp != "fp16":
                raise _non_finite(loader, epoch, bad, step, rank)
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}", refresh=False)
            run.step(epoch, step, steps, loss_avg, acc, scheduler.get_last_lr()[0])
    bar.close()
    if profiler is not None:
        profiler.stop()
    figures, bad_ranks = meter.epoch_figures(rank, cfg)
    if bad_ranks and cfg.train.amp != "fp16":  # another rank's loss: no checkpoint of these weights either
        raise NonFiniteLossError(f"loss is not finite on {bad_ranks} other rank(s) at epoch {epoch}; their "
                                 "message names the step and batch; the last good checkpoint is kept")
    return {**figures, "lr": scheduler.get_last_lr()[0]}


class _EpochMeter:
    """An epoch's running figures. Loss sum, correct count and the first non-finite step stay in
    device tensors until `read`; the loader's waiting and making times are host clocks."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # finite loss sum, correct, finite crops
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # first non-finite step, 0: none
        self.read_values = [0.0, 0.0, 0.0, 0.0]  # the sums and first_bad at the last read
        self.crops, self.timed_crops, self.waited, self.made = 0, 0, 0.0, 0.0
        self.t_start: float | None = None
        self.last_read = time.monotonic()

    def start_timing(self) -> None:
        self.t_start = time.perf_counter()

    def batch(self, crops: int, waited: float, made: float) -> None:
        """A batch drawn after `waited` seconds; a worker spent `made` seconds making it."""
        self.crops += crops
        if self.t_start is not None:  # the loader's figures over the timed steps
            self.timed_crops, self.waited, self.made = self.timed_crops + crops, self.waited + waited, self.made + made

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """On the device: no host sync."""
        loss = loss.detach()
        finite = torch.isfinite(loss)
        self.first_bad = torch.where(~finite & (self.first_bad == 0), step, self.first_bad)
        self.sums += torch.stack([torch.where(finite, loss, 0.0).double() * len(y),
                                  (logits.argmax(1) == y).sum().double(), finite.double() * len(y)])

    def due(self, step: int, steps: int) -> bool:
        return step % LOG_EVERY == 0 or step == steps or time.monotonic() - self.last_read >= READ_SECONDS

    def read(self) -> tuple[float, float, int]:
        """(mean loss, accuracy, first non-finite step or 0): the one host read."""
        self.read_values = torch.cat([self.sums, self.first_bad.double()[None]]).tolist()
        self.last_read = time.monotonic()
        loss_sum, correct, finite_crops, bad = self.read_values
        return loss_sum / max(finite_crops, 1), correct / self.crops, int(bad)

    def epoch_figures(self, rank: dist.RankInfo, cfg: Config) -> tuple[dict[str, float], int]:
        """The figures of the epoch summed over ranks (from the last read: the last step reads),
        and how many ranks saw a non-finite loss."""
        loss_sum, correct, finite_crops, bad = self.read_values
        seconds = time.perf_counter() - self.t_start if self.t_start else float("nan")
        loss_sum, correct, finite_crops, crops, timed, waited, made, bad_ranks = dist.all_reduce_sum(
            [loss_sum, correct, finite_crops, self.crops, self.timed_crops, self.waited, self.made, float(bad > 0)],
            rank.device)
        rate = timed / seconds
        return {"loss": loss_sum / max(finite_crops, 1), "accuracy": correct / crops, "crops": crops,
                "crops_per_s": rate, "crops_per_s_per_device": rate / rank.world_size,
                "audio_seconds_per_s": rate * cfg.model.n_samples / cfg.model.sample_rate,
                "data_wait_share": waited / rank.world_size / seconds,
                "loader_crops_per_s": (timed * max(cfg.data.num_workers, 1) * rank.world_size / made
                                       if made else math.nan)}, round(bad_ranks)


def _non_finite(loader, epoch: int, first: int, step: int, rank: dist.RankInfo) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"loss is not finite at epoch {epoch}, step {first} (rank {rank.rank}; noticed at step {step}: steps "
        f"{first}-{step} are lost), batch {batch_keys(loader, first, first)}; the last good checkpoint is kept: "
        "check those files, lower lr, or try amp: off")


def validate(model, cfg: Config, data_path: Path, rank: dist.RankInfo, run: RunDir, epoch: int) -> float:
    """Embed the validation files across all ranks; rank 0 receives them, scores and keeps the
    scores; every rank gets its EER (the same "best" decision everywhere)."""
    roots = validation_roots(cfg, data_path)
    trials = read_trials(run.val_trials, roots)  # a line whose audio is gone: the list file and the line
    emb = embed_files(model, trials.files(), roots, cfg.model, cfg.evaluation, rank,
                      amp=cfg.train.amp, workers=cfg.data.num_workers, progress=not run.events)
    return dist.broadcast_from_main(run.score(epoch, emb, trials))


def train(cfg: Config) -> dict[str, Any]:
    """The whole run on this rank: data, model, epochs, validation, checkpoints."""
    rank = dist.setup(cfg.train.device)
    if rank.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every training crop has one shape: tune the kernels once
    torch.manual_seed(cfg.train.seed + rank.rank)
    np.random.seed(cfg.train.seed + rank.rank)
    random.seed(cfg.train.seed + rank.rank)
    try:
        cfg.train.devices, cfg.train.nnodes = dist.launched_as(cfg.train.devices, cfg.train.nnodes, rank)
        dist.check_fast_path(cfg.model.fast, rank.device)
        per_rank = dist.rank_batch(cfg.train.batch_size, rank.world_size)
        # rank 0 builds the demo corpus and scans the tree once; the others then read its list
        data_path, utts = dist.main_first(rank, lambda: _training_data(cfg, check_tree=rank.is_main))
        if utts.bad and cfg.data.on_bad_audio == "stop":
            raise DatasetError(utts.bad_summary())  # before the run folder exists: fix the data, run again
        dist.main_first(rank, lambda: check_validation(cfg, data_path))
        augment = dist.main_first(rank, lambda: Augmenter.from_config(  # rank 0 makes the built-in sets once
            cfg.augment, builtin_babble(utts, cfg.train.seed), cfg.model.sample_rate))
        dataset = CropDataset(utts, cfg.model.n_samples, cfg.train.seed, cfg.model.sample_rate,
                              skip_bad=cfg.data.on_bad_audio == "skip", speed_perturb=cfg.data.speed_perturb,
                              augment=augment)
        speakers = dataset.speakers()
        sampler = DistributedSampler(dataset, rank.world_size, rank.rank, shuffle=True,
                                     seed=cfg.train.seed, drop_last=True)
        loader = training_loader(dataset, sampler, per_rank, cfg.data.num_workers, rank.device)
        if len(loader) == 0:  # drop_last would leave no step at all (performance mode would wait forever)
            raise ConfigError(f"batch_size {cfg.train.batch_size} is more than the {len(dataset)} training crops "
                              f"of an epoch ({len(utts)} utterances in {data_path / cfg.data.train_dir}); "
                              f"use batch_size {len(sampler) * rank.world_size} or less, or more data")
        run = RunDir.create(cfg, rank, data_path)
        if utts.bad:
            run.log(0, f"skipping {len(utts.bad)} unusable training file(s):\n{utts.bad_summary()}")
        model = build_model(cfg, len(speakers)).to(rank.device)
        optimizer, scheduler = schedules.make_optimizer(model, cfg, len(loader))  # default: the reference's
        scaler = torch.amp.GradScaler(rank.device.type, enabled=cfg.train.amp == "fp16")
        utterances, hours = corpus_facts(utts, cfg.model.sample_rate)
        if cfg.train.resume and run.last_checkpoint() is not None:
            changes = data_changes(run.path, utterances, hours)
            if changes:  # the same speakers, other files: the epochs would no longer be the run's
                raise CheckpointError(f"{changes} ({data_path / cfg.data.train_dir}); resume with the data it trained "
                                      "on (data_path), or give the new data a run of its own (another name)")
        state = (resume_training(run.last_checkpoint(), model, optimizer, scheduler, scaler, speakers)
                 if cfg.train.resume else None)
        if state is not None:
            run.resumed(state)
        started_from = {}
        if cfg.train.init_from and state is None:  # fine-tuning: weights only, a fresh optimiser and schedule
            source = resolve_checkpoint(cfg.train.init_from).resolve()  # a run folder: its best model
            for note in init_from_checkpoint(source, model, speakers):
                run.log(0, note)
            # config.yaml keeps the path as given; run.json which file that was, wherever the run is read from
            started_from = {"init_from": str(source), "init_from_sha1": file_sha1(source)}
        # Batch-norm statistics stay per rank within an epoch, as the reference's broadcast_buffers=False,
        # and are averaged before validation (dist.average_buffers).
        net = DDP(model, forward_sync_buffers=False) if rank.distributed else model
        history = state["history"] if state else []
        run.start(speakers=len(speakers), utterances=utterances, hours=hours, **started_from)

        if cfg.train.mode == "performance":
            loader.sampler.set_epoch(1)
            steps = cfg.train.perf_steps + cfg.train.warmup_steps
            stats = train_epoch(net, _repeat(loader, steps), optimizer, scheduler, scaler, cfg, rank, 1, run, steps)
            stats["fps_seed"] = _seed_fps(utts.frames.sum(), len(utts), stats, rank)
            return run.finish_performance(stats)

        for epoch in range(len(history) + 1, cfg.train.epochs + 1):
            loader.sampler.set_epoch(epoch)  # a new order and new crops every epoch (the Ascend port forgot this)
            t0 = time.time()
            stats = train_epoch(net, loader, optimizer, scheduler, scaler, cfg, rank, epoch, run)
            stats["epoch_seconds"] = time.time() - t0
            stats["fps_seed"] = _seed_fps(utts.frames.sum(), len(utts), stats, rank)
            dist.average_buffers(model)
            stats["val_eer"] = validate(net, cfg, data_path, rank, run, epoch)
            stats["epoch"] = epoch
            history.append(stats)
            best = best_epoch(history).get("epoch") == epoch
            run.end_epoch(epoch, stats, history, model, optimizer, scheduler, scaler, speakers, best)
            dist.barrier()
        return run.summary(history)
    finally:
        dist.cleanup()


def _training_data(cfg: Config, check_tree: bool) -> tuple[Path, UtteranceList]:
    data_path = resolve_data_path(cfg.data)
    return data_path, load_utterances(data_path, cfg.data.train_dir, check_tree=check_tree,
                                        sample_rate=cfg.model.sample_rate)


def _repeat(loader: DataLoader, steps: int):
    """Batches of the loader, restarted as often as needed for `steps` steps (performance mode)."""
    class Repeat:
        def __len__(self) -> int:
            return steps

        def __iter__(self):
            while True:
                yield from loader
    return Repeat()


def _seed_fps(total_samples: int, n_utts: int, stats: dict[str, float], rank: dist.RankInfo) -> float:
    """The seed's "FPS": dataset audio samples / 1000 / epoch seconds, per device; from the
    measured rate, one crop standing for an average utterance."""
    epoch_seconds = n_utts / stats["crops_per_s"]
    return total_samples / 1000 / epoch_seconds / rank.world_size


def _parse_args(argv: list[str] | None) -> Config:
    return cli_config(cli_parser("python -m rawnet_lib.train", __doc__).parse_args(argv))


@record  # under torchrun, a failing rank's traceback is reported with its rank
def main(argv: list[str] | None = None) -> None:
    cfg = _parse_args(argv)
    if "RANK" not in os.environ and cfg.train.devices * cfg.train.nnodes > 1:
        result = launch(cfg, cwd=Path.cwd())  # --devices 8 from a shell: torchrun, as the notebook starts it
        if result:  # only the node of global rank 0 has one
            print(json.dumps(result), flush=True)
    else:
        train(cfg)  # rank 0 reports the result (an event for the launcher, else JSON)


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted: the run folder keeps the last finished epoch; continue with --resume true")
