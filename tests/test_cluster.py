"""Tests for running on clusters and accelerators: two localhost "nodes" meeting through torchrun's
c10d rendezvous (rawnet_lib.training.launch), and the refusal of the CPU fast path on CUDA / NPU
(rawnet_lib.dist.check_fast_path) in every place that starts work on a device."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rawnet_lib.dist as dist
import rawnet_lib.evaluate as evaluate_mod
import rawnet_lib.training.launch as launch_mod
from rawnet_lib.config import ConfigError, load_config
from rawnet_lib.models.checkpoint import model_checkpoint, save_checkpoint
from rawnet_lib.models.rawnet2 import build_model
from rawnet_lib.train import train
from rawnet_lib.training.run import run_path

REPO = Path(__file__).resolve().parents[1]

# --- two nodes on one machine -----------------------------------------------------------------

NODE = """
import json, sys
from rawnet_lib.config import load_config
from rawnet_lib.training.launch import launch
result = launch(load_config("smoke", **json.loads(sys.argv[1])))
print("RESULT " + json.dumps(result), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_settings(tiny_db: Path, out_dir: Path, port: int, node_rank: int) -> dict:
    return {"data_path": str(tiny_db), "out_dir": str(out_dir), "name": "nodes", "epochs": 1, "device": "cpu",
            "devices": 2, "nnodes": 2, "node_rank": node_rank, "master_addr": "127.0.0.1", "master_port": port}


@pytest.mark.slow
def test_two_nodes_of_two_ranks_on_localhost_make_one_run(tiny_db, tmp_path, child_env):
    out_dir, port = tmp_path / "runs", _free_port()   # one out_dir, as a shared file system gives
    settings = [_node_settings(tiny_db, out_dir, port, node) for node in (0, 1)]
    nodes = [subprocess.Popen([sys.executable, "-c", NODE, json.dumps(s)], cwd=tmp_path, env=child_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for s in settings]
    outputs = []
    try:
        outputs = [node.communicate(timeout=900)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]

    # both nodes agree on the run folder, and exactly one of them (global rank 0's) reports it
    path = run_path(load_config("smoke", **settings[0]))
    assert path == run_path(load_config("smoke", **settings[1])) and path.parent.parent.name == "train_4P"
    results = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == 2
    reported = [r for r in results if r]
    assert len(reported) == 1 and reported[0]["run"] == str(path) and reported[0]["epochs"] == 1
    assert sorted(p.relative_to(out_dir) for p in out_dir.glob("*/DNNS/*")) == [path.relative_to(out_dir)]

    # the run folder is complete and written once
    for name in ("config.yaml", "run.json", "summary.json", "history.json", "eers.txt", "models/last.pt",
                 "models/best_opt_eval.pt", "results/eval_epoch1.txt"):
        assert (path / name).is_file(), name
    assert len(json.loads((path / "history.json").read_text())) == 1
    assert (path / "eers.txt").read_text().count("epoch:1,") == 1
    log = (path / "log" / "eval_epoch1.txt").read_text()
    assert log.count("epoch 1: loss") == 1
    assert not list(path.rglob(".*.tmp"))


def test_multi_node_command_uses_c10d_rendezvous_hosted_by_node_0():
    cfg = load_config("smoke", devices=8, nnodes=2, master_addr="h0", master_port=29400, name="paper_run")
    cmd = launch_mod.launch_command(cfg, Path("c.yaml"))
    assert {"--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=h0:29400",
            "--rdzv_id=paper_run", "--rdzv_conf=is_host=1"} <= set(cmd)
    assert not any(a.startswith(("--master_addr", "--node_rank", "--standalone")) for a in cmd)
    cfg.train.node_rank = 1
    assert "--rdzv_conf=is_host=0" in launch_mod.launch_command(cfg, Path("c.yaml"))


def test_slurm_script_starts_torchrun_with_c10d_on_the_first_node():
    script = (REPO / "scripts" / "slurm_train.sh").read_text()
    assert script.startswith("#!/bin/bash") and "#SBATCH --ntasks-per-node=1" in script
    assert "srun" in script and "-m rawnet_lib.train" in script and "--rdzv_backend=c10d" in script
    assert "scontrol show hostnames" in script
    result = subprocess.run(["bash", "-n", str(REPO / "scripts" / "slurm_train.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- the fast path stops on accelerators --------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda", "npu", torch.device("cuda", 1)])
def test_check_fast_path_refuses_accelerators_and_names_the_accelerator_path(device):
    with pytest.raises(ConfigError, match=r"fast: false with amp: bf16 \(--fast false --amp bf16\)"):
        dist.check_fast_path(True, device)
    dist.check_fast_path(False, device)   # the exact path is the accelerator path
    dist.check_fast_path(True, "cpu")
    dist.check_fast_path(True, torch.device("cpu"))


def _pretend_device(monkeypatch, kind: str) -> None:
    """This process as rank 0 of one on a `kind` device, touched by nothing before the check (a
    stand-in for the NPU, whose torch.device needs torch_npu)."""
    device = torch.device(kind, 0) if kind == "cuda" else SimpleNamespace(type=kind, index=0)
    monkeypatch.setattr(dist, "setup", lambda *a, **k: dist.RankInfo(0, 1, device))


@pytest.mark.parametrize("kind", ["cuda", "npu"])
def test_train_stops_before_any_work_with_fast_on_an_accelerator(kind, tmp_path, monkeypatch):
    _pretend_device(monkeypatch, kind)
    cfg = load_config("smoke", fast=True, amp="bf16", data_path=str(tmp_path / "no_data"), out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=f"not validated on {kind}"):
        train(cfg)                         # before the data path is looked at
    assert not run_path(cfg).exists()


def test_launch_stops_before_starting_processes_with_fast_on_an_accelerator(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_mod, "resolve_device_kind", lambda kind: "cuda")
    monkeypatch.setattr(launch_mod.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ConfigError, match="fast: false with amp: bf16"):
        launch_mod.launch(load_config("smoke", fast=True, amp="bf16", device="cuda", out_dir=str(tmp_path)))


def test_evaluate_stops_with_a_fast_checkpoint_on_an_accelerator(tmp_path, monkeypatch):
    cfg = load_config("smoke", fast=True)
    ckpt = tmp_path / "fast.pt"
    save_checkpoint(model_checkpoint(build_model(cfg, 3), cfg, ["a", "b", "c"], 1, 0.5), ckpt)
    _pretend_device(monkeypatch, "cuda")
    real_load = evaluate_mod.checkpoint_model
    monkeypatch.setattr(evaluate_mod, "checkpoint_model",
                        lambda stored, path, device, base: real_load(stored, path, "cpu", base))
    with pytest.raises(ConfigError, match=r"fast\.pt \(model\.fast: true\).*--device cpu"):
        evaluate_mod.evaluate(ckpt, out_dir=tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
