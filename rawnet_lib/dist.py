"""Process-group setup for one process per device, from torchrun's environment variables.

Without RANK in the environment this is a single process, so the same training code runs
from a plain `python -m rawnet_lib.train` and from `torchrun --nproc_per_node=8`.
Backends: NCCL on CUDA, HCCL on Ascend NPU (torch_npu), gloo on CPU.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist

from rawnet_lib.config import ConfigError
from rawnet_lib.errors import WorkbookError

__all__ = ["RankInfo", "setup", "launched_as", "rank_batch", "single", "cleanup", "resolve_device_kind",
           "available_devices", "barrier", "main_first", "share", "gather_rows", "broadcast_from_main",
           "all_reduce_sum", "average_buffers", "check_fast_path", "DistError"]

T = TypeVar("T")
BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


class DistError(WorkbookError, RuntimeError):
    """A device or process-group problem; the message says which rank and what to change."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the run; made once by `setup` (or `single`) and passed down."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder, caches and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)
    return torch.npu.is_available()


def resolve_device_kind(kind: str = "auto") -> str:
    """auto picks npu (when torch_npu is installed and sees a device), then cuda, then cpu."""
    if kind == "auto":
        if _npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "npu" and not _npu_available():
        raise DistError("device: npu needs torch_npu and Ascend's CANN libraries: pip install -e '.[npu]' "
                        "on an Ascend host (and source CANN's set_env.sh)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DistError("device: cuda asked for, but PyTorch sees no CUDA device; use device: cpu or auto")
    return kind


def check_fast_path(fast: bool, device: str | torch.device, source: str = "model.fast: true",
                    fix: str = "use the accelerator path there, fast: false with amp: bf16 (--fast false --amp bf16), "
                               "or device: cpu to keep the fast path") -> None:
    """Refuse `model.fast: true` on an accelerator, before any work. Its kernels were written and
    measured for CPUs (torch.compile'd element-wise loops, a GEMM-folded sinc layer, a bf16
    channels-last body) and have never run on CUDA or an NPU, so they are not offered there;
    the accelerator path is the exact model with AMP. Never a silent switch to the other path."""
    kind = getattr(device, "type", device)  # a torch.device (or the like) or its kind
    if fast and kind != "cpu":
        raise ConfigError(f"{source} asks for the CPU fast path (rawnet_lib/models/fastsinc.py), which is not "
                          f"validated on {kind}; {fix}")


def available_devices(kind: str) -> int:
    """Accelerators on this node; the CPU counts as unlimited (gloo ranks share its cores)."""
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count()
    return 1 << 30


# How long a collective may wait. The longest wait is by design: the other ranks wait at a barrier
# while rank 0 scans the training tree once (VoxCeleb2: ~11 min from the page cache, longer from a
# cold disk; README, "VoxCeleb scale"). A crashed rank ends the group at once through torchrun.
TIMEOUT_S = 3600.0


def setup(kind: str = "auto", timeout_s: float = TIMEOUT_S) -> RankInfo:
    """Join the process group torchrun describes (or none) and pick this rank's device."""
    kind = resolve_device_kind(kind)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_world > available_devices(kind):
        raise DistError(f"{local_world} processes per node asked for, but this node has "
                        f"{available_devices(kind)} {kind} device(s); set devices to at most that")
    device = torch.device("cpu") if kind == "cpu" else torch.device(kind, local_rank)
    if kind == "cuda":
        torch.cuda.set_device(device)
    elif kind == "npu":
        torch.npu.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(BACKENDS[kind], timeout=datetime.timedelta(seconds=timeout_s),
                                      **({"device_id": device} if kind == "cuda" else {}))
    return RankInfo(rank, world, device)


def launched_as(devices: int, nnodes: int, rank: RankInfo) -> tuple[int, int]:
    """(processes per node, nodes) as torchrun started them, which name the run folder (`train_<N>P`).
    A shell's torchrun without --devices and --nnodes (the config's 1 x 1) gives its own numbers;
    other numbers than torchrun's are an error, as the folder would name another run than this."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    started = (per_node, int(os.environ.get("GROUP_WORLD_SIZE", rank.world_size // per_node)))
    if per_node * started[1] != rank.world_size:
        raise DistError(f"torchrun started {rank.world_size} processes on {started[1]} nodes, {per_node} on this one: "
                        "give every node the same --nproc_per_node (a run folder names one number of processes)")
    if (devices, nnodes) in (started, (1, 1)):
        return started
    if "RANK" not in os.environ:
        raise DistError(f"devices {devices} x nnodes {nnodes} asked for in one process: start the ranks with "
                        "`python -m rawnet_lib.train` (which starts torchrun itself), torchrun, or, from Python, "
                        "rawnet_lib.training.launch.launch(cfg)")
    raise DistError(f"devices {devices} x nnodes {nnodes} asked for, but torchrun started {rank.world_size} "
                    f"process(es), {per_node} per node: start torchrun with --nproc_per_node={devices} "
                    f"--nnodes={nnodes}, or give --devices {per_node} --nnodes {started[1]}")


def rank_batch(batch_size: int, world_size: int) -> int:
    """Each rank's share of the global batch, which must split evenly (DDP averages equal shares)."""
    if batch_size % world_size:
        below = batch_size // world_size * world_size
        raise ConfigError(f"batch_size {batch_size} (the global batch) does not split evenly over {world_size} "
                          f"processes; use a multiple of {world_size}, e.g. "
                          f"{' or '.join(str(b) for b in (below, below + world_size) if b)}")
    return batch_size // world_size


def single(device: str | torch.device = "cpu") -> RankInfo:
    """One process without a process group on `device` (notebooks, tests)."""
    return RankInfo(0, 1, torch.device(device))


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def main_first(rank: RankInfo, work: Callable[[], T]) -> T:
    """`work()` on rank 0, then, after a barrier, on the others: rank 0 builds what they then
    find (the demo corpus, a cache) and prints the progress."""
    result = work() if rank.is_main else None
    barrier()
    return result if rank.is_main else work()


def share(n: int, rank: RankInfo) -> slice:
    """This rank's contiguous part of n items: equal parts of ceil(n / world) (the last ones shorter),
    so rank 0 can stack what it receives without being told where each row belongs."""
    per = _part_size(n, rank)
    return slice(min(rank.rank * per, n), min((rank.rank + 1) * per, n))


def _part_size(n: int, rank: RankInfo) -> int:
    """Rows of the largest share: ceil(n / world)."""
    return -(-n // rank.world_size)


def gather_rows(local: np.ndarray, n: int, rank: RankInfo) -> np.ndarray | None:
    """The (n, dim) float32 rows whose `share(n, ...)` each rank holds, on rank 0 only (None elsewhere).

    Point to point into one buffer: rank 0 holds the n rows once, the others only their share
    (an all-gather would give every rank everything, and pickling would double it).
    """
    if not rank.distributed:
        return local
    per, dim = _part_size(n, rank), local.shape[1]
    if not rank.is_main:
        send = torch.zeros(per, dim, dtype=torch.float32, device=rank.device)
        send[: len(local)] = torch.from_numpy(local)
        torch_dist.send(send, dst=0)
        return None
    buffer = torch.empty(rank.world_size, per, dim, dtype=torch.float32, device=rank.device)
    buffer[0, : len(local)] = torch.from_numpy(local)
    for src in range(1, rank.world_size):
        torch_dist.recv(buffer[src], src=src)
    return buffer.reshape(-1, dim)[:n].cpu().numpy()


def broadcast_from_main(obj: T) -> T:
    """Rank 0's object on every rank (a decision, a key list, a metric); `obj` itself without a process group."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (loss and accuracy counts for the log)."""
    if not torch_dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def average_buffers(model: torch.nn.Module) -> None:
    """Average the batch-norm running statistics over ranks, in place.

    Training normalises with batch statistics, so this changes no weight and no step; it makes the
    model every rank validates with the one `last.pt` holds, so a resumed run scores as one never
    stopped, and each rank's statistics count (as timm's distribute_bn). Other buffers (the sinc
    layer's window) are equal on every rank and left alone: (k x) / k is not always x in float32.
    """
    if not torch_dist.is_initialized():
        return
    stats = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
             and m.track_running_stats and m.running_mean is not None for b in (m.running_mean, m.running_var)]
    if not stats:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in stats])  # float32: HCCL has no float64
    torch_dist.all_reduce(flat)
    flat /= torch_dist.get_world_size()
    for b, part in zip(stats, flat.split([b.numel() for b in stats])):
        b.copy_(part.view_as(b))
