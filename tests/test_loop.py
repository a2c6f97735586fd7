"""The training loop's bookkeeping: no host read between log points, non-finite losses caught by
step, fp16 overflow steps skipped, persistent loader workers that see the epoch, embeddings
gathered to rank 0 only, and the loader figures in history.json and TensorBoard."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from rawnet_lib import dist
from rawnet_lib import train as train_module
from rawnet_lib.config import load_config
from rawnet_lib.dataset.loader import training_loader
from rawnet_lib.dataset.utterances import CropDataset, load_utterances
from rawnet_lib.models.rawnet2 import build_model
from rawnet_lib.train import train_epoch
from rawnet_lib.training.run import NonFiniteLossError, NullRunDir
from rawnet_lib.training.schedules import make_optimizer

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
CPU = dist.single("cpu")


class _Batches:
    """A loader of fixed batches that notes the host-read count when each batch is drawn."""

    def __init__(self, batches: list, reads: dict[str, int]):
        self.batches, self.reads, self.seen = batches, reads, []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.seen.append(self.reads["n"])
            yield batch


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count tensor-to-host reads made by rawnet_lib code (torch's own CPU bookkeeping, such as
    Adam reading its step counter, is not a device read and is not counted)."""
    reads = {"n": 0}
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("rawnet_lib"):
                reads["n"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _setup(tmp_path: Path, steps: int, amp: str = "off", classes: int = 4):
    cfg = load_config("smoke", amp=amp, warmup_steps=1)
    torch.manual_seed(0)
    model = build_model(cfg, classes)
    optimizer, scheduler = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    gen = torch.Generator().manual_seed(0)
    batches = [(0.1 * torch.randn(4, cfg.model.n_samples, generator=gen), torch.randint(0, classes, (4,), generator=gen),
                0.01) for _ in range(steps)]
    run = NullRunDir(tmp_path, cfg, False, None)
    return cfg, model, optimizer, scheduler, scaler, batches, run


def test_a_step_between_log_points_reads_nothing_from_the_device(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, model, optimizer, scheduler, scaler, batches, run = _setup(tmp_path, steps=7)
    monkeypatch.setattr(train_module, "LOG_EVERY", 3)
    monkeypatch.setattr(train_module, "READ_SECONDS", math.inf)
    reads = _count_host_reads(monkeypatch)
    loader = _Batches(batches, reads)
    stats = train_epoch(model, loader, optimizer, scheduler, scaler, cfg, CPU, 1, run)
    per_step = np.diff([*loader.seen, reads["n"]])  # reads during step 1..7
    due = {3, 6, 7}  # every LOG_EVERY steps and the last
    assert all(per_step[s - 1] == 0 for s in range(1, 8) if s not in due), per_step
    assert all(per_step[s - 1] >= 1 for s in due), "the counter sees the reads at log points"
    assert stats["crops"] == 28 and 0 <= stats["accuracy"] <= 1 and math.isfinite(stats["loss"])
    assert 0 <= stats["data_wait_share"] <= 1 and stats["loader_crops_per_s"] == pytest.approx(4 / 0.01)


def _poison(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    real, calls = torch.nn.functional.cross_entropy, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == step else loss
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)


def test_a_non_finite_loss_is_named_by_its_step_at_the_next_read(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, model, optimizer, scheduler, scaler, batches, run = _setup(tmp_path, steps=6)
    monkeypatch.setattr(train_module, "LOG_EVERY", 4)
    monkeypatch.setattr(train_module, "READ_SECONDS", math.inf)
    _poison(monkeypatch, 2)
    loader = _Batches(batches, {"n": 0})
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2 \(rank 0; noticed at step 4: steps 2-4"):
        train_epoch(model, loader, optimizer, scheduler, scaler, cfg, CPU, 1, run)
    assert len(loader.seen) == 4, "stopped at the first read after the bad step"


def test_fp16_skips_an_overflow_step_and_keeps_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, model, optimizer, scheduler, scaler, batches, run = _setup(tmp_path, steps=4, amp="fp16")
    _poison(monkeypatch, 2)
    scale = scaler.get_scale()
    stats = train_epoch(model, _Batches(batches, {"n": 0}), optimizer, scheduler, scaler, cfg, CPU, 1, run)
    assert scaler.get_scale() < scale, "the scaler saw the overflow and backed off"
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN step was skipped"
    assert math.isfinite(stats["loss"]), "the epoch's loss leaves the skipped step out"


def _wav_tree(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"id{i % 3}" / "v" / f"{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(4000)).astype(np.float32), 16000, subtype="PCM_16")
    return root


def test_persistent_workers_crop_for_the_current_epoch(tmp_path: Path) -> None:
    _wav_tree(tmp_path / "db" / "train", 8)
    crops = CropDataset(load_utterances(tmp_path / "db", "train", progress=False), 1000, seed=7)
    sampler = DistributedSampler(crops, 1, 0, shuffle=False)
    loader = training_loader(crops, sampler, 4, workers=2, device=torch.device("cpu"))
    assert loader.persistent_workers
    for epoch in (1, 2, 3):
        loader.sampler.set_epoch(epoch)
        got = torch.cat([x for x, _, _ in loader])
        crops.set_epoch(epoch)  # what the main process would crop
        assert torch.equal(got, torch.stack([crops[i][0] for i in range(8)])), f"epoch {epoch}"


def _gather_rank(rank: int, world: int, store: str, n: int, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    info = dist.RankInfo(rank, world, torch.device("cpu"))
    full = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    rows = dist.gather_rows(full[dist.share(n, info)], n, info)
    eer = dist.broadcast_from_main(0.25 if rank == 0 else None)
    result = {"rows": None if rows is None else rows.tolist(), "eer": eer}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_rows_are_gathered_on_rank_0_only(tmp_path: Path) -> None:
    n = 7  # shares of 4 and 3 rows: the padding must not leak
    mp.spawn(_gather_rank, args=(2, str(tmp_path / "store"), n, str(tmp_path)), nprocs=2)
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert np.array_equal(main["rows"], np.arange(n * 3).reshape(n, 3))
    assert other["rows"] is None, "rank 1 receives nothing"
    assert main["eer"] == other["eer"] == 0.25


def _buffer_rank(rank: int, world: int, store: str, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    model.register_buffer("window", torch.full((2,), 0.1 * (rank + 1)))  # not a statistic: left alone
    bn = model[0]
    bn.running_mean.fill_(float(rank))
    bn.running_var.fill_(1.0 + 2 * rank)
    bn.num_batches_tracked.fill_(5)
    dist.average_buffers(model)
    result = {k.removeprefix("0."): v.tolist() for k, v in model.state_dict().items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_batch_norm_statistics_are_averaged_over_ranks(tmp_path: Path) -> None:
    mp.spawn(_buffer_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["window"] == pytest.approx([0.1] * 2) and other["window"] == pytest.approx([0.2] * 2)
    main.pop("window"), other.pop("window")
    assert main == other, "every rank holds the same statistics"
    assert main["running_mean"] == [0.5] * 3 and main["running_var"] == [2.0] * 3
    assert main["num_batches_tracked"] == 5 and main["weight"] == [1.0] * 3, "counters and weights untouched"


def test_history_and_tensorboard_hold_the_loader_figures(smoke_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    history = json.loads((smoke_run / "history.json").read_text())
    for h in history:
        assert 0 <= h["data_wait_share"] <= 1 and h["loader_crops_per_s"] > 0 and h["lr"] > 0
    assert "waiting for data" in (smoke_run / "log" / "eval_epoch1.txt").read_text()
    events = EventAccumulator(str(smoke_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/lr", "epoch/val_eer", "epoch/data_wait_share",
            "epoch/loader_crops_per_s", "epoch/crops_per_s"} <= tags
    eers = [e.value for e in events.Scalars("epoch/val_eer")]
    assert eers == pytest.approx([h["val_eer"] for h in history], rel=1e-6)  # float32 in the event file


def test_loader_plot_shows_both_rates_and_the_wait_share() -> None:
    from rawnet_lib.views.plots import loader_plot
    history = [{"epoch": e, "crops_per_s": 30.0, "loader_crops_per_s": 900.0 / e, "data_wait_share": 0.05 * e}
               for e in (1, 2, 3)]
    fig = loader_plot(history)
    rates, wait = fig.axes
    assert [len(line.get_xdata()) for line in rates.lines] == [3, 3]
    assert wait.lines[0].get_ydata() == pytest.approx([5, 10, 15])
    with pytest.raises(ValueError, match="loader_crops_per_s"):
        loader_plot([{"epoch": 1, "crops_per_s": 1.0}])


def test_validation_embedding_leaves_the_model_as_it_found_it(tmp_path: Path) -> None:
    """Validation runs between epochs: training must go on in train mode, with gradients, without autocast."""
    from rawnet_lib.eval.embed import embed_files
    root = _wav_tree(tmp_path / "db" / "eval", 3)
    cfg = load_config("smoke", amp="bf16")
    model = build_model(cfg, 3).train()
    keys = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.wav"))]
    emb = embed_files(model, keys, [root], cfg.model, cfg.evaluation, CPU, amp="bf16", workers=0, progress=False)
    assert sorted(emb) == keys and all(v.shape == (cfg.model.embedding_dim,) for v in emb.values())
    assert model.training and all(m.training for m in model.modules())
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
