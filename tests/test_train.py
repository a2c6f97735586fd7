"""Training: the seed's output layout, 1 and 2 processes, resume equality, modes, refusals."""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import rawnet_lib.train as train_module
from rawnet_lib.config import ConfigError, load_config
from rawnet_lib.dataset.trials import TrialList, read_trials
from rawnet_lib.dist import RankInfo
from rawnet_lib.errors import WorkbookError
from rawnet_lib.io import file_sha1
from rawnet_lib.models.checkpoint import load_checkpoint_model, read_checkpoint
from rawnet_lib.models.rawnet2 import build_model
from rawnet_lib.train import train
from rawnet_lib.training.launch import launch, launch_command
from rawnet_lib.training.run import NullRunDir, RunDir, RunExistsError, check_run_dir, run_path, run_state
from rawnet_lib.training.schedules import make_optimizer


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "models" / "last.pt")["model"]


def assert_seed_layout(run: Path, epochs: int) -> None:
    """Every file of the seed's layout is there and in its format."""
    assert (run / "models" / "best_opt_eval.pt").is_file()
    ta = sorted(p.name for p in (run / "models").glob("TA_*.pt"))
    assert len(ta) == epochs and all(re.fullmatch(r"TA_\d+_\d\.\d{4}\.pt", n) for n in ta)
    eers = (run / "eers.txt").read_text().splitlines()
    assert [int(re.fullmatch(r"epoch:(\d+), TA_eval_eer:(\d\.\d+)", line).group(1)) for line in eers] == \
        list(range(1, epochs + 1))
    n_trials = len(read_trials(run / "val_trial.txt"))
    for epoch in range(1, epochs + 1):
        lines = (run / "results" / f"eval_epoch{epoch}.txt").read_text().splitlines()
        assert len(lines) == n_trials
        score, target = lines[0].split()
        assert -1.0 <= float(score) <= 1.0 and target in ("0", "1")
        assert "loss" in (run / "log" / f"eval_epoch{epoch}.txt").read_text()
    params = dict(line.split(":\t", 1) for line in (run / "f_params.txt").read_text().splitlines())
    assert params["n_samples"] == "6561" and params["batch_size"] == "8"
    assert (run / "prof").is_dir()
    best = read_checkpoint(run / "models" / "best_opt_eval.pt")
    assert {"model", "optimizer", "config", "speakers", "epoch", "val_eer"} <= set(best)
    assert not list(run.rglob("*.tmp")), "no temporary file may be left behind"


def test_single_process_run_writes_the_seed_layout(smoke_run: Path) -> None:
    assert_seed_layout(smoke_run, epochs=2)
    history = json.loads((smoke_run / "history.json").read_text())
    assert all(h["crops_per_s"] > 0 and 0 <= h["val_eer"] <= 1 for h in history)


def test_resume_ends_with_the_same_weights(smoke_run: Path, tiny_db: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted after epoch 1 and resumed == the uninterrupted 2-epoch smoke run; a kill in the first
    epoch or in the epochs that extend a finished run leaves a run that resume: true continues."""
    cfg = dict(data_path=str(tiny_db), out_dir=str(tmp_path), name="fixture")
    train(load_config("smoke", epochs=1, **cfg))
    resumed = run_path(load_config("smoke", **cfg))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:  # killed in its first epoch: resume: true starts it from the beginning
        patch.setattr(train_module, "train_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            train(load_config("smoke", epochs=1, **{**cfg, "name": "first"}))
    assert run_state(run_path(load_config("smoke", **{**cfg, "name": "first"}))) == "new"
    assert train(load_config("smoke", epochs=1, resume=True, **{**cfg, "name": "first"}))["epochs"] == 1
    with monkeypatch.context() as patch:  # a finished run extended, then killed in its new epoch: not finished
        patch.setattr(train_module, "train_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            train(load_config("smoke", epochs=2, resume=True, **cfg))
    assert run_state(resumed) == "started"
    train(load_config("smoke", epochs=2, resume=True, **cfg))
    sessions = json.loads((resumed / "run.json").read_text())
    assert len(sessions["earlier"]) == 2 and sessions["earlier"][0]["git_commit"] == sessions["git_commit"]
    reference = _weights(smoke_run)
    for key, value in _weights(resumed).items():
        assert torch.equal(value, reference[key]), key
    assert (resumed / "eers.txt").read_text() == (smoke_run / "eers.txt").read_text()


@pytest.mark.slow
def test_the_modern_recipe_resumes_bit_identically_with_loader_workers(tiny_db: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """AAM, built-in augmentation, speed perturbation and the cosine schedule, with 2 loader
    workers: stopped after epoch 1 and resumed, a run ends with the weights of one never stopped
    (every crop's noise, room and speed are drawn from (seed, epoch, index), not from a worker)."""
    recipe = {"loss": {"head": "aam", "margin": 0.2, "scale": 30, "margin_schedule": [1, 2]},
              "augment": {"enabled": True}, "data": {"speed_perturb": [0.9, 1.0, 1.1]},
              "optim": {"lr_decay": "cosine", "warmup_epochs": 0.5}}
    recipe["augment"]["sets_dir"] = str(tmp_path / "sets")
    cfg = dict(data_path=str(tiny_db), out_dir=str(tmp_path), num_workers=2, epochs=2)
    train(load_config("smoke", recipe, name="straight", **cfg))
    real, calls = train_module.train_epoch, []

    def stopped_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_epoch", stopped_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            train(load_config("smoke", recipe, name="resumed", **cfg))
    train(load_config("smoke", recipe, name="resumed", resume=True, **cfg))
    straight, resumed = (tmp_path / "train_1P" / "DNNS" / name for name in ("straight", "resumed"))
    reference = _weights(straight)
    for key, value in _weights(resumed).items():
        assert torch.equal(value, reference[key]), key
    assert (resumed / "eers.txt").read_text() == (straight / "eers.txt").read_text()


@pytest.mark.slow
def test_a_resume_on_other_files_of_the_same_speakers_is_refused(tiny_db: Path, tmp_path: Path) -> None:
    """The speakers check misses a file added or removed; the run's own record of its corpus does not."""
    data = tmp_path / "db"
    shutil.copytree(tiny_db, data)
    cfg = dict(data_path=str(data), out_dir=str(tmp_path / "runs"), name="r")
    train(load_config("smoke", epochs=1, **cfg))
    spare = sorted((data / "VoxCeleb2" / "wav").rglob("*.wav"))[-1]
    spare.unlink()  # its speaker keeps other files
    with pytest.raises(WorkbookError, match=r"r trained on (\d+) utterances .*, but its training data now holds "
                                            r"\d+ .*VoxCeleb2/wav\); resume with the data it trained on"):
        train(load_config("smoke", epochs=2, resume=True, **cfg))
    assert json.loads((run_path(load_config("smoke", **cfg)) / "history.json").read_text())[-1]["epoch"] == 1


def test_a_refused_resume_leaves_a_finished_run_finished(smoke_run: Path, tiny_db: Path, tmp_path: Path) -> None:
    run = tmp_path / "train_1P" / "DNNS" / "fixture"
    shutil.copytree(smoke_run, run)
    (run / "models" / "last.pt").write_bytes(b"PK not a checkpoint")
    with pytest.raises(WorkbookError, match=r"last.pt is not a readable .*copy models/best_opt_eval.pt"):
        train(load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), name="fixture", epochs=3,
                          resume=True))
    assert run_state(run) == "finished"


def test_existing_run_is_never_overwritten(smoke_run: Path, tiny_db: Path) -> None:
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(smoke_run.parents[2]), name="fixture")
    before = (smoke_run / "eers.txt").read_text()
    with pytest.raises(RunExistsError, match="resume: true"):
        train(cfg)
    assert (smoke_run / "eers.txt").read_text() == before


def test_a_validation_list_the_data_cannot_hold_stops_before_the_run_folder(tiny_db: Path, tmp_path: Path) -> None:
    """val_pairs beyond what the held-out utterances give: the option's name and its range, and no
    run folder left behind (a folder with a config would be taken for an interrupted run)."""
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), val_pairs=100000)
    with pytest.raises(ConfigError, match=r"val_pairs=100000, but the \d+ validation utterances of \S+/VoxCeleb1/"
                                          r"dev_wav give 2 to \d+ balanced pairs; set data\.val_pairs \(--val_pairs\)"):
        train(cfg)
    assert not run_path(cfg).exists()


def test_validation_that_could_not_run_stops_before_the_first_epoch(tiny_db: Path, tmp_path: Path) -> None:
    """Test-time crops that do not fit the model, or a data set's validation list naming audio
    that is gone, used to fail after a whole epoch, with no checkpoint kept."""
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), eval_hop=10**6)
    with pytest.raises(ConfigError, match=r"eval_hop=1000000 must be in 1\.\.n_samples"):
        train(cfg)
    assert not run_path(cfg).exists()
    listed = tmp_path / "my_val.txt"
    key = read_trials(tiny_db / "VoxCeleb1" / "veri_test.txt").files()[0]
    listed.write_text(f"1 {key} {key.split('/')[0]}/gone/00001.wav\n0 {key} id99999/gone/00002.wav\n")
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), val_trials=str(listed))
    with pytest.raises(WorkbookError, match=r"(?s)my_val\.txt is not usable.*file not on disk: 2 line.*"
                                            r"gone/00001\.wav not found"):
        train(cfg)
    assert not run_path(cfg).exists()


def test_overwrite_makes_the_validation_list_again_or_keeps_the_old_run(tiny_db: Path, tmp_path: Path) -> None:
    """overwrite removes the folder that holds the run's own validation list: the list is made anew
    (with the new val_pairs), and one that cannot be made stops before the old run is removed."""
    main = RankInfo(0, 1, torch.device("cpu"))
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), val_pairs=20)
    run = RunDir.create(cfg, main, tiny_db)
    assert len(read_trials(run.val_trials).labels) == 20
    marker = run.path / "models" / "last.pt"
    marker.touch()
    bad = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), val_pairs=100000, overwrite=True)
    with pytest.raises(ConfigError, match=r"val_pairs=100000"):
        RunDir.create(bad, main, tiny_db)
    assert marker.is_file() and len(read_trials(run.val_trials).labels) == 20
    again = RunDir.create(load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), val_pairs=30,
                                      overwrite=True), main, tiny_db)
    assert not marker.exists() and len(read_trials(again.val_trials).labels) == 30


def _started_run(cfg) -> Path:
    """A run folder as an interrupted run leaves it: its config and a last.pt (check_run_dir reads no more)."""
    run = run_path(cfg)
    (run / "models").mkdir(parents=True)
    (run / "models" / "last.pt").touch()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run


def test_resume_refuses_another_recipe(tmp_path: Path) -> None:
    """A resume with other settings than the run's would continue it as another recipe and rewrite its
    config.yaml; only where and how it runs may change, and its length unless the schedule spans it."""
    keras = load_config("smoke", out_dir=str(tmp_path / "old"), name="keras", epochs=2, data_path="/data/a")
    _started_run(keras)
    (tmp_path / "old").rename(tmp_path / "moved")  # the folder travelled: its config.yaml names the old out_dir
    again = dict(out_dir=str(tmp_path / "moved"), name="keras", resume=True)
    run = run_path(load_config("smoke", **again))
    with pytest.raises(RunExistsError, match=r"trained with other settings \(lr_decay: 'keras' -> 'cosine'; "
                                             r"seed: 1234 -> 7; head: 'softmax' -> 'aam'\)") as refused:
        check_run_dir(load_config("smoke", lr_decay="cosine", seed=7, head="aam", data_path="/data/a", **again))
    fix = re.search(r"`--config (\S+) --out_dir (\S+) --name (\S+) --resume true`", str(refused.value))
    assert check_run_dir(load_config(fix[1], out_dir=fix[2], name=fix[3], resume=True)) == run  # the message's fix
    shutil.copytree(run, run.parent / "copy")  # the folder is the run: a copy resumes as itself, by its message
    with pytest.raises(RunExistsError, match="other settings") as refused:
        check_run_dir(load_config("smoke", lr_decay="cosine", data_path="/data/a", **{**again, "name": "copy"}))
    fix = re.search(r"`--config (\S+) --out_dir (\S+) --name (\S+) --resume true`", str(refused.value))
    assert check_run_dir(load_config(fix[1], out_dir=fix[2], name=fix[3], resume=True)) == run.parent / "copy"
    with pytest.raises(RunExistsError, match=r"data_path: '/data/a' -> ''"):  # the built-in corpus instead
        check_run_dir(load_config("smoke", **again))
    assert check_run_dir(load_config("smoke", epochs=5, num_workers=2, amp="bf16", data_path="/data/b", eval_hop=99,
                                     fast=True, init_from="gone.pt", **again)) == run
    with pytest.raises(RunExistsError, match=r"train_2P/DNNS/keras holds no run; .*train_1P/DNNS/keras does"):
        check_run_dir(load_config("smoke", devices=2, **again))  # would start afresh under train_2P
    cosine = load_config("smoke", out_dir=str(tmp_path), name="cosine", epochs=2, lr_decay="cosine")
    _started_run(cosine)
    with pytest.raises(RunExistsError, match=r"epochs: 2 -> 4"):
        check_run_dir(load_config("smoke", out_dir=str(tmp_path), name="cosine", epochs=4, lr_decay="cosine",
                                  resume=True))


def test_fine_tuning_starts_from_the_checkpoint_and_records_which(smoke_run: Path, tiny_db: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """init_from through train(), as the large-margin fine-tuning command runs it: longer crops and
    a larger AAM margin, from a run folder (its best model). Every weight but the layer norm's (its
    size is the crop length) starts as the checkpoint's, the log says what was re-initialised, and
    run.json records the file resolved with its sha1, since config.yaml keeps the relative path as
    given (it means nothing from elsewhere)."""
    source = smoke_run / "models" / "best_opt_eval.pt"
    start: dict[str, torch.Tensor] = {}
    loader = train_module.init_from_checkpoint

    def remember(path: Path, model: torch.nn.Module, speakers: list[str]) -> list[str]:
        notes = loader(path, model, speakers)
        start.update({k: v.clone() for k, v in model.state_dict().items()})
        return notes
    monkeypatch.setattr(train_module, "init_from_checkpoint", remember)
    monkeypatch.chdir(smoke_run.parent)
    relative = smoke_run.name  # a run folder: its best model
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), name="ft", epochs=1, n_samples=8000,
                      head="aam", margin=0.5, init_from=relative)
    train(cfg)
    run = run_path(cfg)
    trained, _ = load_checkpoint_model(source)
    for name, value in trained.state_dict().items():
        if not name.startswith("ln."):
            assert torch.equal(start[name], value), name
    assert torch.equal(start["ln.gamma"].flatten(), torch.ones(8000)) and not start["ln.beta"].any()
    assert "ln re-initialised (gamma 1, beta 0) for (8000,) (checkpoint (6561,))" in (run / "log" / "eval_epoch0.txt"
                                                                                       ).read_text()
    facts = json.loads((run / "run.json").read_text())
    assert facts["init_from"] == str(source.resolve()) and facts["init_from_sha1"] == file_sha1(source)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["init_from"] == relative


@pytest.mark.slow
def test_two_gloo_processes_through_the_launcher(tiny_db: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), name="ddp", devices=2, epochs=1)
    summary = launch(cfg)
    run = run_path(cfg)
    assert run.parent.parent.name == "train_2P" and summary["epochs"] == 1
    assert_seed_layout(run, epochs=1)


@pytest.mark.slow
def test_a_resumed_two_process_run_validates_as_one_never_stopped(tiny_db: Path, tmp_path: Path) -> None:
    """Batch-norm statistics are averaged over ranks before validation, so `last.pt` holds what every
    rank validated with; before, a resumed rank 1 validated with rank 0's statistics."""
    cfg = dict(data_path=str(tiny_db), out_dir=str(tmp_path), devices=2)
    launch(load_config("smoke", name="whole", epochs=2, **cfg))
    launch(load_config("smoke", name="resumed", epochs=1, **cfg))
    launch(load_config("smoke", name="resumed", epochs=2, resume=True, **cfg))
    whole, resumed = (run_path(load_config("smoke", name=n, **cfg)) for n in ("whole", "resumed"))
    for key, value in _weights(resumed).items():
        assert torch.equal(value, _weights(whole)[key]), key
    scores = [(run / "results" / "eval_epoch2.txt").read_text() for run in (whole, resumed)]
    assert scores[0] == scores[1]


@pytest.mark.slow
def test_performance_mode_reports_throughput_only(tiny_db: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), mode="performance",
                      perf_steps=4, warmup_steps=1, amp="bf16", profile=True)
    summary = train(cfg)
    assert summary["crops_per_s"] > 0 and summary["fps_seed"] > 0 and summary["amp"] == "bf16"
    run = run_path(cfg)
    assert json.loads((run / "performance.json").read_text())["crops_per_s"] == summary["crops_per_s"]
    assert not list((run / "models").iterdir()), "performance mode writes no checkpoints"
    assert list((run / "prof").glob("*.pt.trace.json")), "profile: true leaves a torch.profiler trace"


def test_launch_commands_use_torchrun_rendezvous() -> None:
    single = launch_command(load_config("smoke"), Path("c.yaml"))
    assert single[1:4] == ["-m", "rawnet_lib.train", "--config"]
    eight = launch_command(load_config("smoke", devices=8), Path("c.yaml"))
    assert "torch.distributed.run" in eight and "--standalone" in eight and "--nproc_per_node=8" in eight
    nodes = launch_command(load_config("smoke", devices=8, nnodes=2, node_rank=1, master_addr="h0"), Path("c.yaml"))
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=h0:29500", "--rdzv_conf=is_host=0"} <= set(nodes)


def test_batch_must_split_over_ranks(tiny_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    with pytest.raises(ValueError, match="multiple of 3"):
        train(cfg)


@pytest.mark.parametrize("mode", ["full", "performance"])
def test_a_batch_larger_than_the_data_is_a_clear_error(tiny_db: Path, tmp_path: Path, mode: str) -> None:
    """Seen on a GPU: the paper's batch of 100 on the tiny corpus left no step, and performance
    mode restarted its empty loader for ever."""
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), batch_size=1000, mode=mode)
    with pytest.raises(ValueError, match=r"batch_size 1000 is more than the \d+ training crops .*VoxCeleb2/wav"):
        train(cfg)
    assert not run_path(cfg).exists()  # nothing written before the check


def test_ranks_other_than_0_get_a_run_folder_that_writes_nothing(tiny_db: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), epochs=1)
    run = RunDir.create(cfg, RankInfo(1, 2, torch.device("cpu")), tiny_db)
    assert isinstance(run, NullRunDir) and run.path == run_path(cfg)
    methods = {name for name, value in vars(RunDir).items() if inspect.isfunction(value) and not name.startswith("_")}
    assert methods - set(vars(NullRunDir)) == {"last_checkpoint"}, "every writer has a silent twin"

    model = build_model(cfg, 3)
    optimizer, scheduler = make_optimizer(model, cfg)
    run.log(1, "a line")
    run.start(speakers=3, utterances=9, hours=0.1)
    run.step(1, 50, 50, 1.0, 0.5, 1e-3)
    assert np.isnan(run.score(1, {}, TrialList(np.ones(1, np.int8), ["a/v/1.wav"], ["a/v/2.wav"])))
    stats = {"val_eer": 0.5, "loss": 1.0, "accuracy": 0.5, "crops_per_s": 1.0, "crops_per_s_per_device": 1.0,
             "audio_seconds_per_s": 1.0, "fps_seed": 1.0, "epoch": 1, "data_wait_share": 0.1,
             "loader_crops_per_s": 1.0, "lr": 1e-3}
    run.end_epoch(1, stats, [stats], model, optimizer, scheduler, None, ["a", "b", "c"], True)
    assert run.summary([stats]) == {} and run.finish_performance(stats) == {}
    assert run.profiler() is None and run.progress_bar(5, "epoch 1").disable
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "rank 1 wrote nothing"


def test_no_weight_decay_on_batch_norm() -> None:
    model = build_model("smoke", 4)
    optimizer, scheduler = make_optimizer(model, load_config("smoke"))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert any(p is model.first_bn.weight for p in plain["params"])
    assert optimizer.defaults["amsgrad"] is True
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 / (1 + 1e-4 * 10))


def test_train_notebook_runs_headless(run_notebook, tiny_db: Path, tmp_path: Path) -> None:
    run_notebook("train", preset="smoke", data_path=str(tiny_db), out_dir=str(tmp_path), epochs=1)
    run = tmp_path / "train_1P" / "DNNS" / "smoke"
    assert (run / "figures" / "history.png").stat().st_size > 0
    assert (run / "figures" / "loader.png").stat().st_size > 0
    history = json.loads((run / "history.json").read_text())
    with np.load(run / "figures" / "history.npz") as curves, np.load(run / "figures" / "loader.npz") as loader:
        assert curves["val_eer"].tolist() == [h["val_eer"] for h in history]
        assert loader["crops_per_s"].tolist() == [h["crops_per_s"] for h in history]
    assert_seed_layout(run, epochs=1)


def test_the_run_takes_the_numbers_torchrun_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder is named after devices x nnodes: a shell's torchrun without them gives its own;
    numbers that are not torchrun's, or several devices in one process, are refused."""
    from rawnet_lib.dist import DistError, launched_as
    for var in ("RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cpu = torch.device("cpu")
    assert launched_as(1, 1, RankInfo(0, 1, cpu)) == (1, 1)
    with pytest.raises(DistError, match=r"devices 2 x nnodes 1 asked for in one process: start the ranks with "
                                        r"`python -m rawnet_lib.train`"):
        launched_as(2, 1, RankInfo(0, 1, cpu))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launched_as(1, 1, RankInfo(3, 16, cpu)) == (8, 2)
    assert launched_as(8, 2, RankInfo(3, 16, cpu)) == (8, 2)
    with pytest.raises(DistError, match=r"devices 4 x nnodes 1 asked for, but torchrun started 16 process\(es\), "
                                        r"8 per node: start torchrun with --nproc_per_node=4 --nnodes=1, or give "
                                        r"--devices 8 --nnodes 2"):
        launched_as(4, 1, RankInfo(3, 16, cpu))
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # 8 + 4 processes: no one folder name fits
    with pytest.raises(DistError, match=r"torchrun started 12 processes on 2 nodes, 8 on this one: give every node "
                                        r"the same --nproc_per_node"):
        launched_as(1, 1, RankInfo(3, 12, cpu))


def test_a_name_that_is_not_one_folder_is_refused() -> None:
    """An empty or relative name would point at the folder of other runs, which overwrite deletes."""
    for name in ("", ".", "..", "../x", "a/b", "/tmp/x", "a b"):
        with pytest.raises(ConfigError, match=r"becomes the run's folder name"):
            run_path(load_config("smoke", name=name, overwrite=True))
    assert run_path(load_config("smoke", name="paper_4n.v2-b")).name == "paper_4n.v2-b"


def test_the_global_batch_must_split_over_the_ranks() -> None:
    from rawnet_lib.dist import rank_batch
    assert rank_batch(96, 8) == 12 and rank_batch(100, 4) == 25
    with pytest.raises(ConfigError, match=r"batch_size 100 \(the global batch\) does not split evenly over 8 "
                                          r"processes; use a multiple of 8, e.g. 96 or 104"):
        rank_batch(100, 8)
    with pytest.raises(ConfigError, match=r"use a multiple of 8, e.g. 8$"):
        rank_batch(4, 8)
    with pytest.raises(ConfigError, match=r"batch_size 100 .* over 8 processes"):  # before torchrun starts
        launch(load_config("paper", devices=8, name="never", out_dir="/tmp/rawnet-never-created"))


@pytest.mark.slow
def test_shell_commands_name_the_folder_after_the_processes(tiny_db: Path, tmp_path: Path) -> None:
    """torchrun from a shell without --devices, and --devices 2 without torchrun (which starts it)."""
    (tmp_path / "DB").symlink_to(tiny_db)  # a relative data_path is the shell's, also when torchrun is started for it
    flags = ["--config", "smoke", "--data_path", "DB", "--out_dir", str(tmp_path), "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "rawnet_lib.train", *flags, "--name", "torchrun"],
                "plain": [sys.executable, "-m", "rawnet_lib.train", *flags, "--name", "plain", "--devices", "2"]}
    for name, cmd in commands.items():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["epochs"] == 1
        run = tmp_path / "train_2P" / "DNNS" / name
        assert_seed_layout(run, epochs=1)
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["devices"] == 2


def test_more_devices_than_exist_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from rawnet_lib.dist import DistError
    from rawnet_lib.training import launch as launch_module
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    with pytest.raises(DistError, match="no CUDA device"):
        launch(load_config("smoke", device="cuda", name="nocuda", out_dir="/tmp/rawnet-never-created"))
    monkeypatch.setattr(launch_module, "resolve_device_kind", lambda kind: "cuda")
    monkeypatch.setattr(launch_module, "available_devices", lambda kind: 4)
    with pytest.raises(DistError, match="devices=8, but this machine has 4 cuda"):
        launch(load_config("smoke", devices=8, name="toomany", out_dir="/tmp/rawnet-never-created"))
