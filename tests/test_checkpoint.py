"""Checkpoints: ours carry their config and load with weights_only=True, bare reference
state_dicts are inferred, resume restores the RNGs, and nothing that could run code loads."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import rawnet_lib.training.run as run_module
from rawnet_lib.config import ConfigError, load_config
from rawnet_lib.errors import WorkbookError
from rawnet_lib.models.checkpoint import (CheckpointError, average_checkpoints, infer_model_config,
                                          load_checkpoint_model, model_checkpoint, read_checkpoint, resume_training,
                                          save_checkpoint, training_checkpoint)
from rawnet_lib.models.rawnet2 import build_model
from rawnet_lib.training.run import RunDir, epoch_models, resolve_checkpoint, run_checkpoint
from rawnet_lib.training.schedules import make_optimizer


@pytest.mark.parametrize("layer_norm", [True, False])
def test_bare_reference_state_dict_is_inferred_and_loads_strictly(tmp_path: Path, layer_norm: bool) -> None:
    cfg = load_config("smoke", {"model": {"blocks": [8, 8, 16, 16, 24]}}, gru_units=40, embedding_dim=24,
                      layer_norm=layer_norm)
    model = build_model(cfg, n_classes=7)
    state = model.state_dict()
    path = tmp_path / "reference.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as nn.DataParallel saves it

    loaded, got = load_checkpoint_model(path, base="smoke")

    for field in ("sinc_filters", "blocks", "gru_units", "gru_layers", "embedding_dim", "layer_norm", "sinc_kernel"):
        assert getattr(got.model, field) == getattr(cfg.model, field), field
    if layer_norm:
        assert got.model.n_samples == cfg.model.n_samples
    assert loaded.fc2_gru.out_features == 7
    assert set(loaded.state_dict()) == set(state)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert not loaded.training


def test_weights_without_a_config_take_the_rest_from_base(tmp_path: Path) -> None:
    """{"model": state_dict} (someone's own save) loads like a bare state_dict: shapes, then `base`."""
    model = build_model("smoke", n_classes=4)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "mine.pt")
    loaded, cfg = load_checkpoint_model(tmp_path / "mine.pt", base="smoke")
    assert cfg.model == load_config("smoke").model and loaded.fc2_gru.out_features == 4
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.save({"model": "not weights"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="neither a training checkpoint"):
        load_checkpoint_model(tmp_path / "bad.pt")


def test_reference_shapes_give_the_paper_model() -> None:
    state = build_model("paper", n_classes=5994).state_dict()
    cfg, n_classes = infer_model_config(state)
    assert (cfg, n_classes) == (load_config("paper").model, 5994)


@pytest.mark.slow  # trains the smoke run
def test_training_checkpoint_carries_its_config(smoke_run: Path) -> None:
    model, cfg = load_checkpoint_model(smoke_run / "models" / "best_opt_eval.pt")
    assert cfg.to_dict() == yaml.safe_load((smoke_run / "config.yaml").read_text())
    assert model.embed(torch.randn(2, cfg.model.n_samples)).shape == (2, cfg.model.embedding_dim)


def test_non_checkpoints_are_refused_with_the_file_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt is not a readable PyTorch checkpoint"):
        load_checkpoint_model(text)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match=r"other.pt: not a RawNet2 state_dict: no first_conv.low_hz_"):
        load_checkpoint_model(other)
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        load_checkpoint_model(tmp_path / "missing.pt")


class _RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint would do with a worse call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_holding_a_python_object_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "trojan.pt"
    state = build_model("smoke", n_classes=3).state_dict()
    torch.save({"model": state, "config": {}, "extra": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"trojan.pt holds Python objects .*could run code, so it is refused"):
        load_checkpoint_model(path)
    assert isinstance(CheckpointError("x"), WorkbookError)
    assert not marker.exists(), "nothing in the file was executed"


@pytest.mark.slow  # trains the smoke run
def test_our_checkpoints_hold_only_tensors_and_plain_values(smoke_run: Path) -> None:
    for name in ("last.pt", "best_opt_eval.pt"):
        state = torch.load(smoke_run / "models" / name, map_location="cpu", weights_only=True)  # no allow-list
        assert {"model", "config", "optimizer", "scheduler", "scaler", "history", "rng"} <= set(state)
        assert all(type(v) in (int, float) for h in state["history"] for v in h.values())


def _training_objects(seed: int):
    torch.manual_seed(seed)
    cfg = load_config("smoke")
    model = build_model(cfg, n_classes=3)
    optimizer, scheduler = make_optimizer(model, cfg)
    return cfg, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.random()), torch.rand(3)


def test_resume_restores_weights_optimiser_and_every_rng(tmp_path: Path) -> None:
    cfg, model, optimizer, scheduler, scaler = _training_objects(0)
    model(torch.randn(2, cfg.model.n_samples)).sum().backward()
    optimizer.step()
    scheduler.step()
    random.seed(1)
    np.random.seed(2)
    path = tmp_path / "last.pt"
    save_checkpoint(training_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 1, np.float64(0.25)),
                                        optimizer, scheduler, scaler, [{"epoch": 1, "val_eer": np.float64(0.25)}]),
                    path)
    expected = _draws()

    _, fresh, fresh_opt, fresh_sched, fresh_scaler = _training_objects(1)
    state = resume_training(path, fresh, fresh_opt, fresh_sched, fresh_scaler)
    got = _draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert fresh_sched.last_epoch == scheduler.last_epoch and state["history"] == [{"epoch": 1, "val_eer": 0.25}]
    assert resume_training(None, fresh, fresh_opt, fresh_sched, fresh_scaler) is None


def test_a_damaged_last_checkpoint_names_the_way_back(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK half a checkpoint")
    _, model, optimizer, scheduler, scaler = _training_objects(0)
    with pytest.raises(CheckpointError, match=r"last.pt is not a readable .*copy models/best_opt_eval.pt .* over it "
                                              r"to resume from that epoch"):
        resume_training(path, model, optimizer, scheduler, scaler)


def test_a_resume_names_other_speakers_and_starts_fp16_with_a_fresh_scale(tmp_path: Path) -> None:
    cfg, model, optimizer, scheduler, scaler = _training_objects(0)  # trained without fp16: no scaler state
    path = tmp_path / "last.pt"
    save_checkpoint(training_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 1, 0.25), optimizer, scheduler,
                                        scaler, [{"epoch": 1, "val_eer": 0.25}]), path)
    _, fresh, fresh_opt, fresh_sched, _ = _training_objects(1)
    with pytest.raises(CheckpointError, match=r"last.pt trained on 3 speakers, the training data now gives 3 "
                                              r"\(b -> x\); resume with the data it trained on"):
        resume_training(path, fresh, fresh_opt, fresh_sched, scaler, ["a", "x", "c"])
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    assert resume_training(path, fresh, fresh_opt, fresh_sched, fp16, ["a", "b", "c"])["epoch"] == 1
    assert fp16.get_scale() == torch.amp.GradScaler("cpu", enabled=True).get_scale()
    save_checkpoint({"model": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"last.pt holds no optimizer, scheduler, .*: it is not a training "
                                              r"checkpoint"):
        resume_training(path, fresh, fresh_opt, fresh_sched, scaler)


def test_a_run_killed_after_last_pt_resumes_with_that_epoch_s_best_model_and_history(tmp_path: Path) -> None:
    """last.pt is where an epoch counts; the best model and the history are written after it."""
    cfg, model, optimizer, scheduler, scaler = _training_objects(0)
    (tmp_path / "models").mkdir()
    history = [{"epoch": 1, "val_eer": 0.3}, {"epoch": 2, "val_eer": 0.2}]
    save_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 1, 0.3), tmp_path / "models" / "best_opt_eval.pt")
    (tmp_path / "history.json").write_text(json.dumps(history[:1]))
    run = RunDir(tmp_path, cfg, False, None)
    run.resumed(training_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 2, 0.2), optimizer, scheduler,
                                    scaler, history))
    assert read_checkpoint(tmp_path / "models" / "best_opt_eval.pt")["epoch"] == 2
    assert json.loads((tmp_path / "history.json").read_text()) == history
    (tmp_path / "models" / "best_opt_eval.pt").unlink()  # killed after the first last.pt, before any best model
    run.resumed(training_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 2, 0.2), optimizer, scheduler,
                                    scaler, history))
    assert read_checkpoint(tmp_path / "models" / "best_opt_eval.pt")["epoch"] == 2
    assert (tmp_path / "eers.txt").read_text().splitlines()[-1] == "epoch:2, TA_eval_eer:0.2000"
    stamp = (tmp_path / "models" / "best_opt_eval.pt").stat().st_mtime_ns
    (tmp_path / "summary.json").write_text("{}")  # a finished run resumed for more epochs: not finished
    run.resumed(training_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 3, 0.4), optimizer, scheduler,
                                    scaler, [*history, {"epoch": 3, "val_eer": 0.4}]))  # not the best: left alone
    assert (tmp_path / "models" / "best_opt_eval.pt").stat().st_mtime_ns == stamp
    assert not (tmp_path / "summary.json").exists()
    # older versions wrote the best model before last.pt: a discarded epoch 4 may hold it; epoch 2's file comes back
    save_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 4, 0.1), tmp_path / "models" / "best_opt_eval.pt")
    save_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 2, 0.2), tmp_path / "models" / "TA_2_0.2000.pt")
    run.resumed(training_checkpoint(model_checkpoint(model, cfg, ["a", "b", "c"], 3, 0.4), optimizer, scheduler,
                                    scaler, [*history, {"epoch": 3, "val_eer": 0.4}]))
    assert read_checkpoint(tmp_path / "models" / "best_opt_eval.pt")["epoch"] == 2


def test_an_epoch_counts_from_last_pt_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order end_epoch writes in: a kill before last.pt retrains the epoch; one after it, `resumed`."""
    cfg, model, optimizer, scheduler, scaler = _training_objects(0)
    (tmp_path / "models").mkdir()
    written = []
    monkeypatch.setattr(run_module, "save_checkpoint", lambda state, path: written.append(Path(path).name))
    monkeypatch.setattr(run_module, "atomic_write_text", lambda path, text: written.append(Path(path).name))
    stats = {"loss": 1.0, "accuracy": 0.5, "val_eer": 0.2, "crops_per_s": 1.0, "crops_per_s_per_device": 1.0,
             "audio_seconds_per_s": 1.0, "fps_seed": 1.0, "data_wait_share": 0.0, "loader_crops_per_s": 1.0}
    run = RunDir(tmp_path, cfg, True, None)
    monkeypatch.setattr(run_module, "emit", lambda *a, **k: None)
    (tmp_path / "log").mkdir()
    run.end_epoch(1, stats, [{"epoch": 1, **stats}], model, optimizer, scheduler, scaler, ["a", "b", "c"], best=True)
    assert written == ["TA_1_0.2000.pt", "last.pt", "best_opt_eval.pt", "eers.txt", "history.json"]


def test_the_last_and_averaged_models_are_of_the_epochs_the_run_finished(tmp_path: Path) -> None:
    """A TA file of an epoch the run never finished is not counted; a missing one is named; without
    per-epoch files the last model is last.pt."""
    cfg, speakers, models = load_config("smoke"), ["a", "b", "c"], tmp_path / "run" / "models"
    models.mkdir(parents=True)
    _epoch_models(models, range(1, 6), cfg, speakers)
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"epochs": 4}))  # TA_5: an attempt it never finished
    assert run_checkpoint(tmp_path / "run", "last").name == "TA_4_0.4000.pt"
    assert read_checkpoint(run_checkpoint(tmp_path / "run", "avg_last2"))["averaged"] == ["TA_3_0.3000.pt",
                                                                                           "TA_4_0.4000.pt"]
    (models / "TA_3_0.3000.pt").unlink()
    with pytest.raises(WorkbookError, match=r"avg_last3 averages epochs 2-4, but models/ holds no .* epoch\(s\) 3 "):
        run_checkpoint(tmp_path / "run", "avg_last3")
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"epochs": 7}))  # epochs 6-7 kept no TA file
    assert run_checkpoint(tmp_path / "run", "last") == models / "last.pt"


def test_checkpoints_written_with_numpy_rng_state_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"rng": {"numpy": np.random.get_state()}, "val_eer": np.float64(0.5)}, path)
    state = read_checkpoint(path)
    assert state["val_eer"] == 0.5 and state["rng"]["numpy"][1].dtype == np.uint32


def _epoch_models(models: Path, epochs: range, cfg, speakers: list[str]) -> list[dict]:
    """TA_<epoch>_<eer>.pt files as training writes them, each with other random weights."""
    states = []
    for epoch in epochs:
        torch.manual_seed(epoch)
        state = model_checkpoint(build_model(cfg, len(speakers)), cfg, speakers, epoch, 0.1 * epoch)
        save_checkpoint(state, models / f"TA_{epoch}_{0.1 * epoch:.4f}.pt")
        states.append(state)
    return states


def test_the_last_epochs_average_is_their_mean_and_follows_the_run(tmp_path: Path) -> None:
    cfg, speakers, models = load_config("smoke"), ["a", "b", "c"], tmp_path / "run" / "models"
    models.mkdir(parents=True)
    states = _epoch_models(models, range(8, 12), cfg, speakers)  # epochs 8..11: the sort is numeric, not by name
    with pytest.raises(WorkbookError, match=r"checkpoint last needs a finished run \(no summary.json yet"):
        run_checkpoint(tmp_path / "run", "last")
    (tmp_path / "run" / "summary.json").write_text("{}")
    assert run_checkpoint(tmp_path / "run", "last").name == "TA_11_1.1000.pt"
    assert run_checkpoint(tmp_path / "run", "best") == models / "best_opt_eval.pt"

    named = run_checkpoint(tmp_path / "run", "avg_last3", make=False)  # a sweep's summary only looks
    assert named == models / "avg_last3.pt" and not named.exists()
    path = run_checkpoint(tmp_path / "run", "avg_last3")
    averaged = read_checkpoint(path)
    assert averaged["averaged"] == ["TA_9_0.9000.pt", "TA_10_1.0000.pt", "TA_11_1.1000.pt"]
    for key, value in averaged["model"].items():
        parts = [s["model"][key] for s in states[1:]]
        if value.is_floating_point():
            exact = sum(p.double() for p in parts) / 3
            # one rounding of the float64 mean to float32: half an ulp of the value's own magnitude
            assert torch.allclose(value.double(), exact, rtol=2.0 ** -24, atol=0), key
        else:
            assert torch.equal(value, parts[-1]), key  # batch norm's step count: the last epoch's
    model, loaded_cfg = load_checkpoint_model(path)  # evaluation reads it as any model checkpoint
    assert loaded_cfg.model == cfg.model and averaged["epoch"] == 11

    stamp = path.stat().st_mtime_ns
    assert run_checkpoint(tmp_path / "run", "avg_last3") == path and path.stat().st_mtime_ns == stamp  # reused
    _epoch_models(models, range(12, 13), cfg, speakers)  # the run went on: the average follows it
    assert read_checkpoint(run_checkpoint(tmp_path / "run", "avg_last3"))["averaged"][-1] == "TA_12_1.2000.pt"

    # evaluate's --checkpoint <run folder> --pick avg_last3 (and the notebook's pick) reach the same file
    assert resolve_checkpoint(tmp_path / "run", "avg_last3") == path
    with pytest.raises(ConfigError, match=r"pick='last' chooses among a run's models, but .*avg_last3.pt is a file"):
        resolve_checkpoint(path, "last")
    # a run killed between an epoch's model and last.pt trains the epoch again: the newer file counts
    again = model_checkpoint(build_model(cfg, 3), cfg, speakers, 12, 0.9)
    save_checkpoint(again, models / "TA_12_0.9000.pt")
    os.utime(models / "TA_12_0.9000.pt", ns=(time.time_ns() + 10**9,) * 2)
    assert [p.name for p in epoch_models(tmp_path / "run")][-2:] == ["TA_11_1.1000.pt", "TA_12_0.9000.pt"]
    assert read_checkpoint(run_checkpoint(tmp_path / "run", "avg_last3"))["averaged"][-1] == "TA_12_0.9000.pt"
    with pytest.raises(WorkbookError, match=r"avg_last9 averages epochs 4-12, but models/ holds no TA_<epoch>_<eer>.pt "
                                            r"of epoch\(s\) 4, 5, 6, 7 \(written with train.save_every_epoch: true\)"):
        run_checkpoint(tmp_path / "run", "avg_last9")
    with pytest.raises(ConfigError, match=r"unknown checkpoint choice 'avg_last1'; valid: best, last or avg_last<N>"):
        run_checkpoint(tmp_path / "run", "avg_last1")
    other = load_config("smoke", {"model": {"gru_units": 8}})
    save_checkpoint(model_checkpoint(build_model(other, 3), other, speakers, 13, 0.5), models / "TA_13_0.5000.pt")
    with pytest.raises(CheckpointError, match=r"TA_12_1.2000.pt holds another model than .*TA_13_0.5000.pt"):
        average_checkpoints([models / "TA_12_1.2000.pt", models / "TA_13_0.5000.pt"])
