"""Faults: bad audio, NaN loss, SIGKILL (also mid-checkpoint), a failing rank, Ctrl-C, unsafe
output folders, random bytes. Each must end in a clear error and lose nothing."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rawnet_lib.config import load_config
from rawnet_lib.dataset.audio import AudioError, random_crop, read_audio
from rawnet_lib.dataset.utterances import load_utterances
from rawnet_lib.models.checkpoint import read_checkpoint
from rawnet_lib.train import train
from rawnet_lib.training.launch import launch, launch_command
from rawnet_lib.training.run import NonFiniteLossError, run_path

REPO = Path(__file__).resolve().parents[1]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "models" / "last.pt")["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def fault_env(tmp_path: Path, child_env) -> Callable[[str], dict[str, str]]:
    """fault_env(code): an environment whose Python processes run `code` at start-up
    (sitecustomize): fault injection from the outside, with no test hook in the library."""
    def env(code: str) -> dict[str, str]:
        folder = tmp_path / "fault"
        folder.mkdir()
        (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
        return child_env(folder)
    return env


def _train_cmd(db: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rawnet_lib.train", "--config", "smoke", "--data_path", str(db),
            "--out_dir", str(out), "--name", "fixture", *extra]


@pytest.fixture
def bad_tree(tiny_db: Path, tmp_path: Path) -> Path:
    """A copy of the tiny corpus under a path with a space and non-ASCII letters, with one
    training speaker of every kind of bad file."""
    db = tmp_path / "données à tester" / "DB"
    shutil.copytree(tiny_db, db, ignore=shutil.ignore_patterns("lists", "m4a"))
    bad = db / "VoxCeleb2" / "wav" / "id0ünï" / "vïdeo 1"
    bad.mkdir(parents=True)
    (bad / "00001.wav").write_bytes(b"")
    (bad / "00002.wav").write_text("this is not audio")
    sf.write(bad / "00003.wav", np.zeros((8000, 2), dtype=np.float32), 16000)
    sf.write(bad / "00004.wav", np.random.default_rng(0).normal(size=8000).astype(np.float32) * 0.1, 8000)
    good = bad.parent / "video2"
    good.mkdir()
    sf.write(good / "00001.wav", np.zeros(20000, dtype=np.float32), 16000)  # silence: usable, peak 0
    sf.write(good / "00002.wav", np.full(800, 0.1, dtype=np.float32), 16000)  # 50 ms: tiled
    truncated = (tiny_db / "VoxCeleb1" / "eval_wav").rglob("*.wav").__next__().read_bytes()[:30]
    (bad / "00005.wav").write_bytes(truncated)
    return db


def test_bad_audio_stops_before_the_first_step(bad_tree: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke", data_path=str(bad_tree), out_dir=str(tmp_path / "runs"), epochs=1)
    with pytest.raises(ValueError) as err:
        train(cfg)
    message = str(err.value)
    assert "5 unusable file(s)" in message and "on_bad_audio: skip" in message
    assert "00003.wav: 2 channels" in message and "sample rate 8000" in message
    assert not run_path(cfg).exists(), "stopped before the first step, without a run folder to refuse later"


@pytest.mark.slow
def test_bad_audio_is_skipped_and_counted_when_asked(bad_tree: Path, tmp_path: Path) -> None:
    cfg = load_config("smoke", data_path=str(bad_tree), out_dir=str(tmp_path / "runs"), epochs=1,
                      on_bad_audio="skip")
    summary = train(cfg)
    assert 0.0 <= summary["final_val_eer"] <= 1.0  # silence and a 50 ms file trained without NaN
    assert "skipping 5 unusable training file(s)" in (run_path(cfg) / "log" / "eval_epoch0.txt").read_text()


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_batch_and_keeps_the_last_checkpoint(
        tiny_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path), epochs=2)
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}
    steps = len(load_utterances(tiny_db, "VoxCeleb2/wav")) // 8  # per epoch, batch 8

    def poisoned(logits, target, *args, **kwargs):
        calls["n"] += 1
        loss = real(logits, target, *args, **kwargs)
        return loss * float("nan") if calls["n"] == steps + 2 else loss  # epoch 2, step 2

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2 .*batch \['id0"):
        train(cfg)
    last = read_checkpoint(run_path(cfg) / "models" / "last.pt")
    assert last["epoch"] == 1


KILL_MID_CHECKPOINT = """
    import os, torch
    _save, _seen = torch.save, []
    def save(obj, f, *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
        if ".last.pt." in str(name):
            _seen.append(name)
            if len(_seen) == 2:  # the second epoch's last.pt: die halfway through writing it
                f.write(b"PK half a checkpoint")
                f.flush()
                os._exit(137)
        return _save(obj, f, *args, **kwargs)
    torch.save = save
"""


def test_sigkill_mid_checkpoint_then_resume_loses_nothing(smoke_run: Path, tiny_db: Path, tmp_path: Path,
                                                         fault_env) -> None:
    out = tmp_path / "runs"
    died = subprocess.run(_train_cmd(tiny_db, out, "--epochs", "2"), env=fault_env(KILL_MID_CHECKPOINT),
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == 137, died.stdout + died.stderr
    run = run_path(load_config("smoke", out_dir=str(out), name="fixture"))
    assert list(run.rglob(".last.pt.*.tmp")), "the half-written checkpoint is where the kill left it"
    assert read_checkpoint(run / "models" / "last.pt")["epoch"] == 1  # the good one
    train(load_config("smoke", data_path=str(tiny_db), out_dir=str(out), name="fixture", epochs=2, resume=True))
    assert not list(run.rglob("*.tmp"))
    assert _same_weights(run, smoke_run)


KILL_IN_EPOCH_2 = """
    import os, signal, threading, time
    import numpy as np
    import torch.nn.functional as F
    _ce, _n = F.cross_entropy, [0]
    _rng = np.random.default_rng(2026)            # seeded: the same moment on every run
    _step = int(_rng.integers(1, STEPS + 1))      # a step of epoch 2 ...
    _delay = float(_rng.uniform(0.0, 0.2))        # ... and a moment inside it, from another thread
    def ce(*args, **kwargs):
        _n[0] += 1
        if _n[0] == STEPS + _step:
            threading.Timer(_delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        if _n[0] == 2 * STEPS:  # epoch 2's last step waits for the kill: a fast CPU cannot finish the epoch first
            time.sleep(60)
        return _ce(*args, **kwargs)
    F.cross_entropy = ce
"""


def test_sigkill_at_a_random_moment_then_resume_loses_nothing(smoke_run: Path, tiny_db: Path, tmp_path: Path,
                                                             fault_env) -> None:
    out = tmp_path / "runs"
    run = run_path(load_config("smoke", out_dir=str(out), name="fixture"))
    steps = len(load_utterances(tiny_db, "VoxCeleb2/wav")) // 8  # per epoch, batch 8
    code = KILL_IN_EPOCH_2.replace("STEPS", str(steps))
    died = subprocess.run(_train_cmd(tiny_db, out, "--epochs", "2"), env=fault_env(code),
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stdout + died.stderr
    assert torch.load(run / "models" / "last.pt", weights_only=False)["epoch"] == 1, "killed inside epoch 2"
    train(load_config("smoke", data_path=str(tiny_db), out_dir=str(out), name="fixture", epochs=2, resume=True))
    assert _same_weights(run, smoke_run)


FAIL_RANK_1 = """
    import os
    if os.environ.get("RANK") == "1":
        import torch.nn.functional as F
        _ce, _n = F.cross_entropy, [0]
        def ce(*args, **kwargs):
            _n[0] += 1
            if _n[0] == 2:
                raise RuntimeError("injected fault on rank 1")
            return _ce(*args, **kwargs)
        F.cross_entropy = ce
"""


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_with_its_name(tiny_db: Path, tmp_path: Path, fault_env) -> None:
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path / "runs"), devices=2, epochs=2)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(__import__("yaml").safe_dump(cfg.to_dict()))
    result = subprocess.run(launch_command(cfg, config_file), env=fault_env(FAIL_RANK_1), cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # a hang fails here, not forever
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "injected fault on rank 1" in output and "rank: 1" in output


@pytest.mark.slow
def test_ctrl_c_stops_all_ranks_and_leaves_a_resumable_run(tiny_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    script = (f"from rawnet_lib.config import load_config\nfrom rawnet_lib.training.launch import launch\n"
              f"launch(load_config('smoke', data_path={str(tiny_db)!r}, out_dir={str(out)!r}, devices=2, epochs=6))\n")
    # A background job (nohup ... &) starts with SIGINT ignored, and Python keeps it so: give the
    # "kernel" the default disposition, as an interactive Jupyter kernel has.
    kernel = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = run_path(load_config("smoke", out_dir=str(out), devices=2))
    while not (run / "models" / "last.pt").exists() and kernel.poll() is None:
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(kernel.pid).children(recursive=True)]
    kernel.send_signal(signal.SIGINT)  # what the Jupyter kernel's interrupt does
    output, _ = kernel.communicate(timeout=120)
    assert kernel.returncode != 0 and "resume it with resume=True" in output
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, "every rank and the launcher are gone"
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(out), devices=2, epochs=2, resume=True)
    summary = launch(cfg)
    assert summary["epochs"] == 2


@pytest.mark.slow
def test_an_error_in_the_kernel_side_loop_stops_the_whole_process_group(
        tiny_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only Ctrl-C: any exception while the kernel follows the run (here, drawing the first
    progress event) ends torchrun and both ranks."""
    from rawnet_lib.training import launch as launch_module
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def broken_display(event, bar, echo_logs):
        if event["type"] == "epoch":  # both ranks are up and have finished an epoch
            raise RuntimeError("display broke")
        return bar

    monkeypatch.setattr(launch_module.subprocess, "Popen", popen)
    monkeypatch.setattr(launch_module, "_show", broken_display)
    seen: list[psutil.Process] = []
    real_split = launch_module.split_event

    def split_event(line):  # note every process of the group while it is alive
        seen.extend(p for p in psutil.Process(started[0].pid).children(recursive=True) if p not in seen)
        return real_split(line)

    monkeypatch.setattr(launch_module, "split_event", split_event)
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path / "runs"), devices=2, epochs=6)
    with pytest.raises(RuntimeError, match="display broke"):
        launch(cfg)
    group = [psutil.Process(started[0].pid)] if psutil.pid_exists(started[0].pid) else []
    assert len(seen) >= 2, "torchrun and its ranks were running"
    gone, alive = psutil.wait_procs(seen + group, timeout=60)
    assert not alive, f"left running: {alive}"
    assert started[0].poll() is not None


def test_an_event_sharing_its_line_with_another_process_output_is_read_and_the_text_kept() -> None:
    from rawnet_lib.training.launch import split_event
    from rawnet_lib.training.run import EVENT_PREFIX
    event = EVENT_PREFIX + '{"type": "step", "epoch": 1, "loss": 2.5}'
    assert split_event(event + "\n") == ("", {"type": "step", "epoch": 1, "loss": 2.5})
    assert split_event(event + "UserWarning: once per rank\n") == ("UserWarning: once per rank\n",
                                                                    {"type": "step", "epoch": 1, "loss": 2.5})
    assert split_event("worker 1 says" + event + "\n") == ("worker 1 says\n", {"type": "step", "epoch": 1,
                                                                                "loss": 2.5})
    torn = EVENT_PREFIX + '{"type": "st' + "UserWarning\n"
    assert split_event(torn) == (torn, None)  # shown as text; the run goes on
    assert split_event("plain log line\n") == ("plain log line\n", None)


def test_emit_writes_each_event_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """print() writes the text and the newline apart, and another rank's output can land between."""
    from rawnet_lib.training.run import EVENT_PREFIX, emit
    writes: list[str] = []
    monkeypatch.setattr(sys, "stdout", type("Pipe", (), {"write": lambda self, text: writes.append(text),
                                                          "flush": lambda self: None})())
    emit("epoch", epoch=3)
    assert writes == [EVENT_PREFIX + '{"type": "epoch", "epoch": 3}\n']


def test_unwritable_or_full_output_is_reported_before_training(tiny_db: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("smoke", data_path=str(tiny_db), out_dir=str(tmp_path))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="choose a writable out_dir"):
        launch(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(OSError, match="MiB free"):
        train(cfg)
    assert not run_path(cfg).exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_wav_reader_on_random_bytes_raises_only_audio_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.wav"
    path.write_bytes(data)
    for read in (lambda: read_audio(path), lambda: random_crop(path, 1000, np.random.default_rng(0))):
        try:
            x = read()
        except AudioError as err:
            assert str(path) in str(err)
        else:
            assert x.dtype == np.float32 and np.isfinite(x).all()


def test_wav_reader_on_corrupted_real_files_raises_only_audio_errors(tiny_db: Path, tmp_path: Path) -> None:
    source = next((tiny_db / "VoxCeleb1" / "eval_wav").rglob("*.wav")).read_bytes()
    rng = np.random.default_rng(0)
    for i in range(40):
        damaged = bytearray(source[: int(rng.integers(0, len(source)))])
        for pos in rng.integers(0, max(len(damaged), 1), size=min(len(damaged), 8)):
            damaged[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"damaged{i}.wav"
        path.write_bytes(bytes(damaged))
        try:
            assert np.isfinite(random_crop(path, 4000, rng)).all()
        except AudioError as err:
            assert path.name in str(err)
