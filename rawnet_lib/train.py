"""Train RawNet2 with the reference recipe, on one process or one process per device.

One device or the CPU:
    python -m rawnet_lib.train --config demo
8 GPUs / NPUs on one machine:
    torchrun --standalone --nproc_per_node=8 -m rawnet_lib.train --config paper --data_path /data/DB
2 machines x 8 devices (the same on each; scripts/slurm_train.sh does it under Slurm):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=host0:29500 \\
        -m rawnet_lib.train --config paper --data_path /data/DB --nnodes 2
Any config field is a flag (`--epochs 3 --amp bf16`); `--config` takes a preset name or a YAML.
notebooks/train.ipynb starts the same command through `rawnet_lib.launch`.
"""
from __future__ import annotations

import math
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
from rawnet_lib import schedules
from rawnet_lib.augment import Augmenter, builtin_babble_dir
from rawnet_lib.checkpoint import init_from_checkpoint, resume_training
from rawnet_lib.check import DatasetError
from rawnet_lib.config import Config, ConfigError, cli_config, cli_parser
from rawnet_lib.data import CropDataset, UtteranceList, load_utterances, resolve_data_path
from rawnet_lib.embed import autocast, embed_files
from rawnet_lib.errors import run_cli
from rawnet_lib.metrics import eer as compute_eer
from rawnet_lib.losses import MarginLoss, build_loss
from rawnet_lib.model import build_model
from rawnet_lib.run import NonFiniteLossError, RunDir
from rawnet_lib.scoring import cosine_scores
from rawnet_lib.trials import read_trials

__all__ = ["train", "make_optimizer", "main"]


def make_optimizer(model: torch.nn.Module, cfg: Config, steps_per_epoch: int = 1) -> tuple[torch.optim.Optimizer, Any]:
    """The optim block's optimiser and per-iteration schedule (rawnet_lib/schedules.py; default the reference's)."""
    return schedules.make_optimizer(model, cfg, steps_per_epoch)


def train_epoch(model, loader, optimizer, scheduler, scaler, cfg: Config, rank: dist.RankInfo,
                epoch: int, run: RunDir, max_steps: int | None = None,
                criterion: MarginLoss | None = None) -> dict[str, float]:
    """One pass over the loader (or max_steps steps); returns loss, accuracy and throughput."""
    model.train()
    criterion = criterion or build_loss(cfg.loss)
    steps = min(len(loader), max_steps or len(loader))
    warmup = min(cfg.train.warmup_steps, steps // 2)  # short epochs still get a throughput figure
    bar = run.progress_bar(steps, f"epoch {epoch}")
    profiler = run.profiler() if cfg.train.profile and epoch == 1 else None
    totals = np.zeros(3)  # loss sum, correct, crops
    timed_crops, t_start = 0, None
    for step, (x, y) in enumerate(loader, start=1):
        if step > steps:
            break
        if step == warmup + 1:
            t_start = time.perf_counter()  # throughput excludes the warm-up steps
        x, y = x.to(rank.device, non_blocking=True), y.to(rank.device, non_blocking=True)
        # forward, backward, step (fp16: the scaler skips steps whose gradients overflow)
        with autocast(rank.device, cfg.train.amp):
            logits = model(x)
            loss = criterion(logits.float(), y, epoch)  # the head's loss (softmax: cross-entropy)
        if not torch.isfinite(loss) and cfg.train.amp != "fp16":
            raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch}, step {step} (rank {rank.rank}), "
                                     f"batch {_batch_keys(loader, step)}; the last good checkpoint is kept: "
                                     "check those files, lower lr, or try amp: off")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # keras decay: every iteration
        # bookkeeping and progress (this rank's running figures)
        totals += [loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)]
        if t_start is not None:
            timed_crops += len(y)
        if profiler is not None:
            profiler.step()
        loss_avg, acc = totals[0] / totals[2], totals[1] / totals[2]
        bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}", refresh=False)
        bar.update()
        run.step(epoch, step, steps, loss_avg, acc, scheduler.get_last_lr()[0])
    bar.close()
    if profiler is not None:
        profiler.stop()
    seconds = time.perf_counter() - t_start if t_start else float("nan")
    loss_sum, correct, crops, timed = dist.all_reduce_sum([*totals, timed_crops], rank.device)
    rate = timed / seconds
    return {"loss": loss_sum / crops, "accuracy": correct / crops, "crops": crops, "crops_per_s": rate,
            "crops_per_s_per_device": rate / rank.world_size,
            "audio_seconds_per_s": rate * cfg.model.n_samples / cfg.model.sample_rate}


def validate(model, cfg: Config, data_path: Path, rank: dist.RankInfo, run: RunDir, epoch: int) -> float:
    """Embed the validation files across all ranks; every rank scores the gathered embeddings
    (the same EER everywhere), rank 0's run folder keeps the scores."""
    trials = read_trials(run.val_trials)
    roots = [data_path / d for d in [*cfg.data.eval_dirs, cfg.data.val_from]]
    emb = embed_files(model, trials.files(), roots, cfg.model, cfg.evaluation, rank,
                      amp=cfg.train.amp, workers=cfg.data.num_workers, progress=not run.events)
    scores = cosine_scores(emb, trials)
    run.write_scores(epoch, scores, trials)
    return compute_eer(scores, trials.labels)


def train(cfg: Config) -> dict[str, Any]:
    """The whole run on this rank: data, model, epochs, validation, checkpoints."""
    rank = dist.setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed + rank.rank)
    np.random.seed(cfg.train.seed + rank.rank)
    random.seed(cfg.train.seed + rank.rank)
    try:
        dist.check_fast_path(cfg.model.fast, rank.device)
        if cfg.train.batch_size % rank.world_size:
            raise ConfigError(f"batch_size {cfg.train.batch_size} does not split evenly over "
                             f"{rank.world_size} processes; use a multiple of {rank.world_size}")
        # rank 0 builds the demo corpus and scans the tree once; the others then read its list
        data_path, utts = dist.main_first(rank, lambda: _training_data(cfg))
        if utts.bad and cfg.data.on_bad_audio == "stop":
            raise DatasetError(utts.bad_summary())  # before the run folder exists: fix the data, run again
        augment = dist.main_first(rank, lambda: Augmenter.from_config(  # rank 0 makes the built-in sets once
            cfg.augment, builtin_babble_dir(data_path, cfg.data.val_from), cfg.model.sample_rate))
        run = RunDir.create(cfg, rank, data_path)
        if utts.bad:
            run.log(0, f"skipping {len(utts.bad)} unusable training file(s):\n{utts.bad_summary()}")
        dataset = CropDataset(utts, cfg.model.n_samples, cfg.train.seed, cfg.model.sample_rate,
                              skip_bad=cfg.data.on_bad_audio == "skip", speed_perturb=cfg.data.speed_perturb,
                              augment=augment)
        speakers = dataset.speakers()
        sampler = DistributedSampler(dataset, rank.world_size, rank.rank, shuffle=True,
                                     seed=cfg.train.seed, drop_last=True)
        loader = DataLoader(dataset, cfg.train.batch_size // rank.world_size, sampler=sampler,
                            num_workers=cfg.data.num_workers, drop_last=True,
                            pin_memory=rank.device.type == "cuda")
        model = build_model(cfg, len(speakers)).to(rank.device)
        optimizer, scheduler = make_optimizer(model, cfg, len(loader))
        scaler = torch.amp.GradScaler(rank.device.type, enabled=cfg.train.amp == "fp16")
        state = resume_training(run.last_checkpoint(), model, optimizer, scheduler, scaler) if cfg.train.resume else None
        if cfg.train.init_from and state is None:  # fine-tuning: weights only, a fresh optimiser and schedule
            for note in init_from_checkpoint(cfg.train.init_from, model):
                run.log(0, note)
        # Batch-norm statistics stay per rank after the initial sync, as the reference's broadcast_buffers=False.
        net = DDP(model, forward_sync_buffers=False) if rank.distributed else model
        history = state["history"] if state else []
        best_eer = min([h["val_eer"] for h in history if not math.isnan(h["val_eer"])], default=math.inf)
        run.start(speakers=len(speakers), utterances=len(utts), hours=utts.seconds() / 3600)

        if cfg.train.mode == "performance":
            sampler.set_epoch(1)
            dataset.set_epoch(1)
            steps = cfg.train.perf_steps + cfg.train.warmup_steps
            stats = train_epoch(net, _repeat(loader, steps), optimizer, scheduler, scaler, cfg, rank, 1, run, steps)
            stats["fps_seed"] = _seed_fps(utts.frames.sum(), len(utts), stats, rank)
            return run.finish_performance(stats)

        for epoch in range(len(history) + 1, cfg.train.epochs + 1):
            sampler.set_epoch(epoch)  # a new order every epoch (the Ascend port forgot this)
            dataset.set_epoch(epoch)
            t0 = time.time()
            stats = train_epoch(net, loader, optimizer, scheduler, scaler, cfg, rank, epoch, run)
            stats["epoch_seconds"] = time.time() - t0
            stats["fps_seed"] = _seed_fps(utts.frames.sum(), len(utts), stats, rank)
            stats["val_eer"] = validate(net, cfg, data_path, rank, run, epoch)
            stats["epoch"] = epoch
            history.append(stats)
            best = stats["val_eer"] < best_eer
            best_eer = min(best_eer, stats["val_eer"])
            run.end_epoch(epoch, stats, history, model, optimizer, scheduler, scaler, speakers, best)
            dist.barrier()
        return run.summary(history)
    finally:
        dist.cleanup()


def _training_data(cfg: Config) -> tuple[Path, UtteranceList]:
    data_path = resolve_data_path(cfg.data)
    return data_path, load_utterances(data_path, cfg.data.train_dir)


def _batch_keys(loader: DataLoader, step: int) -> list[str]:
    """The utterances of a step's batch on this rank, for error messages (the order is seeded)."""
    sampler, dataset = getattr(loader, "sampler", None), getattr(loader, "dataset", None)
    if sampler is None or not isinstance(dataset, CropDataset):
        return []
    order, size = list(sampler), loader.batch_size
    return [dataset.utts.keys[i] for i in order[(step - 1) * size: step * size]]


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
    train(_parse_args(argv))  # rank 0 reports the result (an event for the launcher, else JSON)


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted: the run folder keeps the last finished epoch; continue with --resume true")
