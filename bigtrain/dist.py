"""Process-group setup and the one place that chooses device and backend.

On GPUs the default group is ``cpu:gloo,cuda:nccl``: NCCL for CUDA tensors (gradients, losses,
eval statistics) and gloo for CPU tensors and pickled objects (checkpoint planning, resume
choices), so a collective on either device has a backend. On CPUs it is gloo. Checkpoint I/O
gets a process group of its own (:func:`checkpoint_group`): DCP's async save runs collectives
from a background thread, which must never interleave with the training loop's on one group.

Rank/world come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) or,
when started by ``srun`` directly, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def env_world() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun or SLURM variables."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    local_world = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world if world == 1 else 1)
    return rank, world, local_rank, local_world


def backend_for(device_type: str) -> str:
    """The default process group's backend for ranks computing on ``device_type``."""
    if device_type == "cuda":
        return "cpu:gloo,cuda:nccl"  # NCCL has no CPU tensors; gloo carries those
    return "gloo"


def pick_device(local_rank: int, accelerator: str = "auto") -> torch.device:
    """This rank's device for ``resources.accelerator`` (auto | gpu | cpu). A run configured for
    GPUs that finds none stops here, instead of training on the CPU by surprise."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        from bigtrain.config import ConfigError

        raise ConfigError("resources.accelerator: gpu, but this process sees no CUDA device (check the job's GPU "
                          "request and CUDA_VISIBLE_DEVICES, or set resources.accelerator=cpu)")
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# `precision` values that compute in a 16-bit dtype (fp32 is absent).
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision_supported(precision: str) -> None:
    """fp16 needs CUDA (its loss scaling and kernels); called before any process group exists."""
    if precision == "fp16" and not torch.cuda.is_available():
        from bigtrain.config import ConfigError

        raise ConfigError("precision: fp16 needs CUDA GPUs; this machine has none (use bf16 or fp32)")


def set_cpu_threads(local_world_size: int, threads: int | None = None) -> int:
    """One share of the cores per local rank (at least one thread), unless told otherwise."""
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys prefixed by torchrun's restart count.

    After torchrun restarts its workers (``--max-restarts``), the store still holds the
    previous attempt's keys (gloo's peer addresses among them); fresh keys per attempt keep the
    new workers from connecting to dead peers.
    """
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not use_agent_store, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"bigtrain/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


_CHECKPOINT_GROUP = None


def checkpoint_group():
    """The process group for checkpoint I/O (gloo, every rank; None without a default group).

    Used only by checkpoint writers and readers (DCP), one save at a time, so a save running in a
    background thread never shares a group with the training loop's collectives."""
    return _CHECKPOINT_GROUP


def init(threads: int | None = None, timeout_s: float = 600.0, always: bool = False,
         accelerator: str = "auto") -> DistInfo:
    """Initialise the default process group if there is more than one rank (or ``always``:
    sharded engines need a group even on one rank), and the checkpoint group beside it."""
    global _CHECKPOINT_GROUP
    rank, world, local_rank, local_world = env_world()
    device = pick_device(local_rank, accelerator)
    backend = backend_for(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        set_cpu_threads(local_world, threads)
    if (world > 1 or always) and not dist.is_initialized():
        if device.type == "cuda":  # NCCL's flight recorder: what each rank's collectives were, for hang dumps
            os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()) if world == 1 else "29500")
        # Engines (DeepSpeed) read these directly; srun or a plain `python` may not have set them.
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
                            ("LOCAL_WORLD_SIZE", local_world)):
            os.environ.setdefault(name, str(value))
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            store=_attempt_store(rank, world, timeout),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        _CHECKPOINT_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def shutdown() -> None:
    """Destroy every process group, and free them now, while the interpreter is whole.

    A group someone still references outlives ``destroy_process_group`` with its gloo/NCCL
    threads running; freed during interpreter exit instead, it can abort a finished run
    ("terminate called without an active exception", seen with DeepSpeed's groups). DeepSpeed
    keeps its own references, released by its own destroy.
    """
    global _CHECKPOINT_GROUP
    _CHECKPOINT_GROUP = None
    if dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    gc.collect()


def collective_trace_dumper(info: DistInfo):
    """On NCCL, a function that writes this rank's flight-recorder entries (pickled) into a
    directory; None where there is none (gloo)."""
    if info.device.type != "cuda" or not dist.is_initialized():
        return None
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None:
        return None

    def write(directory) -> None:
        from pathlib import Path

        (Path(directory) / f"rank-{info.rank}-nccl-trace.pkl").write_bytes(dump())

    return write


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(make, is_main: bool):
    """Collective: ``make()`` on rank 0, its (picklable) result on every rank; an exception it
    raises is raised on every rank (none waits for a result that never comes)."""
    result, error = None, None
    if is_main:
        try:
            result = make()
        except Exception as err:  # re-raised below, on every rank
            error = err
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result
