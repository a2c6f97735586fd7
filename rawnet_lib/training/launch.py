"""Start `rawnet_lib.train` from a notebook as a torchrun-style subprocess and follow it.

Ranks never run inside the Jupyter kernel: the kernel starts the standard launcher
(`python -m torch.distributed.run`, i.e. torchrun) with one process per device in a process
group of its own, reads the events rank 0 prints (progress, then the result), and draws them as
a progress bar. Ctrl-C (the kernel's interrupt) or any exception in the kernel stops the whole
group; the run keeps its last finished epoch and can be resumed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from rawnet_lib.config import REPO_DIR, Config
from rawnet_lib.dist import DistError, available_devices, check_fast_path, rank_batch, resolve_device_kind
from rawnet_lib.errors import WorkbookError
from rawnet_lib.training.run import EVENT_PREFIX, check_run_dir, run_path

__all__ = ["launch_command", "launch", "split_event", "TrainingFailed"]


class TrainingFailed(WorkbookError, RuntimeError):
    """The training processes exited with an error; the message carries their last output."""


def launch_command(cfg: Config, config_file: Path) -> list[str]:
    """The shell command for this config: plain python for one process, torchrun otherwise.

    Several nodes meet through torchrun's c10d rendezvous at master_addr:master_port, which node
    0 hosts (`is_host`, so two "nodes" on one machine do not both try to serve it); the
    rendezvous then numbers the nodes itself (by host name), so global rank 0, the one that writes
    the run folder and reports, is on the node whose name sorts first, not necessarily node 0.
    """
    train = ["-m", "rawnet_lib.train", "--config", str(config_file)]
    if cfg.train.devices == 1 and cfg.train.nnodes == 1:
        return [sys.executable, *train]
    if cfg.train.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--nnodes={cfg.train.nnodes}", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint={cfg.train.master_addr}:{cfg.train.master_port}",
                      f"--rdzv_id={cfg.train.name}", f"--rdzv_conf=is_host={int(cfg.train.node_rank == 0)}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous,
            f"--nproc_per_node={cfg.train.devices}", *train]


def launch(cfg: Config, echo_logs: bool = False, cwd: Path = REPO_DIR) -> dict[str, Any]:
    """Run training to the end and return its summary (or performance figures); {} on a node
    that does not hold global rank 0. Relative data paths are read from `cwd` (the repository,
    for notebooks; the shell's folder, for the command line)."""
    check_run_dir(cfg)  # refuse to clobber an earlier run before starting any process
    rank_batch(cfg.train.batch_size, cfg.train.devices * cfg.train.nnodes)
    kind = resolve_device_kind(cfg.train.device)
    check_fast_path(cfg.model.fast, kind)
    if cfg.train.devices > available_devices(kind):
        raise DistError(f"devices={cfg.train.devices}, but this machine has {available_devices(kind)} {kind} "
                        f"device(s); set devices to at most that (or device: cpu for gloo ranks)")
    launch_dir = REPO_DIR / "outputs" / ".launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=launch_dir, delete=False) as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    cmd = launch_command(cfg, Path(f.name))
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "RAWNET_EVENTS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            cwd=cwd, env=env, start_new_session=True)
    tail: list[str] = []
    result: dict[str, Any] = {}
    bar = None
    try:
        for line in proc.stdout:
            text, event = split_event(line)
            if text.strip():
                tail = (tail + [text])[-40:]
                print(text, end="", flush=True)
            if event is None:
                continue
            if event["type"] == "result":
                result = event["summary"]
            else:
                bar = _show(event, bar, echo_logs)
        proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise KeyboardInterrupt(f"training stopped; resume it with resume=True ({run_path(cfg)})") from None
    except BaseException:
        _stop(proc)  # whatever failed in the kernel, no rank outlives it
        raise
    finally:
        if bar is not None:
            bar.close()
        Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise TrainingFailed(f"training exited with code {proc.returncode}:\n" + "".join(tail[-20:]))
    return result


def split_event(line: str) -> tuple[str, dict[str, Any] | None]:
    """(log text, progress event or None) of one output line. Every rank and loader worker writes
    to one pipe, so an event can share its line with text written just before or after it; a line
    whose event cannot be read is log text, never a reason to stop the run."""
    at = line.find(EVENT_PREFIX)
    if at < 0:
        return line, None
    try:
        event, end = json.JSONDecoder().raw_decode(line, at + len(EVENT_PREFIX))
    except ValueError:
        return line, None
    if not isinstance(event, dict) or "type" not in event:
        return line, None
    text = line[:at] + line[end:]
    return text if text.strip() else "", event


def _show(event: dict[str, Any], bar, echo_logs: bool):
    """Draw one progress event; returns the current epoch's bar."""
    kind = event["type"]
    if kind == "step":
        if bar is None or bar.desc != f"epoch {event['epoch']}":
            if bar is not None:
                bar.close()
            bar = tqdm(total=event["steps"], desc=f"epoch {event['epoch']}")
        bar.set_postfix(loss=f"{event['loss']:.3f}", acc=f"{event['acc']:.3f}", refresh=False)
        bar.update(event["step"] - bar.n)
    elif kind == "epoch":
        if bar is not None:
            bar.update(bar.total - bar.n)
            bar.close()
            bar = None
        print(f"epoch {event['epoch']}: loss {event['loss']:.4f}  acc {event['accuracy']:.4f}  "
              f"val EER {100 * event['val_eer']:.2f} %  {event['crops_per_s']:.1f} crops/s"
              + ("  (best)" if event.get("best") else ""), flush=True)
    elif kind == "start":
        print(f"run folder: {event['path']}", flush=True)
    elif kind == "log" and echo_logs:
        print(event["line"], flush=True)
    return bar


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Interrupt the whole process group (launcher and ranks), then insist."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
