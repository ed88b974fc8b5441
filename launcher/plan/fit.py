"""Devices, step time, whether a plan fits, and the cheapest change that makes it fit. No torch.

Memory budget: a GPU's memory as CUDA reports it (``total_memory``), of which ``USABLE`` (92%)
may be allocated; the rest is the CUDA context, cuBLAS/NCCL workspaces and allocator
fragmentation, none of which ``max_memory_allocated`` (what the estimate models) counts. On the
CPU the budget is the host's memory (``resources.mem`` when set, else this machine's), shared by
the ranks on a node, and offloaded states and each rank's process (``CPU_RANK_BYTES``) count
against it too. What GPU ranks offload must fit
in ``HOST_USABLE`` of the node's memory (``resources.mem``, else ``GPU_NODE_MEMORY``: a DGX
A100's 1 TiB for 8 GPUs) shared by the node's ranks.

Step time: the runtime's FLOPs per token (6 x matmul parameters + attention) x tokens per rank,
over the device's dense peak (bf16; fp32 at half, as ``bigtrain/perf.py``) x MFU. MFU is
measured when a run directory is given (its metrics.jsonl ``mfu``), else assumed
(``ASSUMED_MFU``, in line with torchtitan's published 33-39% for Llama 3.1 8B on H100 and 50-58%
on A100). With an assumed MFU the estimate adds what MFU alone does not show: activation
checkpointing's recomputed forward (+1/3 of the block FLOPs), collectives (bus bandwidth within a
node or between nodes; overlapped with compute, so a step takes the longer of the two), a fixed
launch overhead per layer and micro-batch, and with CPU offload the PCIe traffic and the CPU's
Adam step.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bigtrain.config import ConfigError, RunConfig
from launcher.plan.memory import Estimate, Setup, estimate
from launcher.plan.shapes import Shape

GIB = 2**30
USABLE = 0.92
HOST_USABLE = 0.8  # of a node's memory, for offloaded states (the OS, data loaders, pinned buffers)
GPU_NODE_MEMORY = 2**40  # per 8 GPUs, when resources.mem does not say
CPU_RANK_BYTES = 0.6e9  # a CPU rank's interpreter, torch (and DeepSpeed): 450-600 MB RSS with the tiny test model
ASSUMED_MFU = 0.40
LAYER_OVERHEAD_S = 3e-4  # kernel launches etc. per layer per micro-batch (forward + backward), assumed
PCIE_BYTES_S = 25e9  # host <-> device, per GPU
CPU_ADAM_PARAMS_S = 1e9  # DeepSpeed's CPU Adam, parameters per second per rank


@dataclass(frozen=True)
class Device:
    name: str
    memory: float  # bytes
    peak_flops: float | None  # dense bf16/fp16 FLOP/s; None: unknown
    intra_bw: float = 0.0  # collective bus bandwidth within a node, bytes/s
    inter_bw: float = 0.0  # between nodes, per GPU
    fp32_ratio: float = 0.5  # fp32 (TF32) peak / bf16 peak
    node_memory: float | None = None  # host memory per node (GPUs: for offloaded states); None: GPU_NODE_MEMORY

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"


DEVICES = {  # memory: total_memory as CUDA reports it; bandwidths: typical NCCL bus bandwidth
    "h100": Device("h100", 79.2 * GIB, 989e12, 350e9, 40e9),  # SXM, NVLink 4, 400 Gb/s IB per GPU
    "h200": Device("h200", 139.8 * GIB, 989e12, 350e9, 40e9),
    "a100-80g": Device("a100-80g", 79.3 * GIB, 312e12, 230e9, 20e9),  # SXM, NVLink 3, 200 Gb/s IB per GPU
    "a100-40g": Device("a100-40g", 39.4 * GIB, 312e12, 230e9, 20e9),
}
DEVICE_NAMES = (*DEVICES, "cpu")


def device_named(name: str, cfg: RunConfig | None = None, option: str = "--gpu-type") -> Device:
    if name == "cpu":
        return Device("cpu", _host_memory(cfg), _cpu_peak_flops(), fp32_ratio=1.0)
    if name not in DEVICES:
        raise ConfigError(f"{option}: unknown GPU type {name!r} (known: {', '.join(DEVICE_NAMES)})")
    node = _node_memory(cfg)
    return replace(DEVICES[name], node_memory=node) if node else DEVICES[name]


def _node_memory(cfg: RunConfig | None) -> float | None:
    """resources.mem (per node) when set and not 0."""
    mem = cfg.resources.mem if cfg is not None else None
    if mem and mem != "0":
        units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        return float(int(mem[:-1]) * units[mem[-1]] if mem[-1] in units else int(mem) * 2**20)
    return None


def _host_memory(cfg: RunConfig | None) -> float:
    """resources.mem, else this machine's physical memory."""
    return _node_memory(cfg) or float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@functools.cache
def _cpu_peak_flops() -> float | None:
    """fp32 FLOP/s of a 1024 x 1024 matmul through numpy (bigtrain's MFU on CPU is relative to a
    measured matmul too); None without numpy."""
    try:
        import numpy as np
    except ImportError:
        return None
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


# -- time -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    seconds: float
    compute: float
    comm: float
    offload: float
    mfu: float
    measured: bool

    def tokens_per_s(self, setup: Setup) -> float:
        return setup.global_batch * setup.seq_len / self.seconds


def measured_mfu(run_dir: str) -> float:
    """The median ``mfu`` of a run's metrics.jsonl, its first record (warm-up, compilation) left out."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise ConfigError(f"--run: cannot read {path} ({err.__class__.__name__}: {err})") from None
    values = [r["mfu"] for r in records[1:] or records if isinstance(r.get("mfu"), (int, float)) and r["mfu"] > 0]
    if not values:
        raise ConfigError(f"--run: {path} has no mfu values")
    return float(statistics.median(values))


def step_time(shape: Shape, setup: Setup, device: Device, mfu: float | None = None) -> Timing | None:
    """Seconds per optimizer step; None when the device's peak is unknown."""
    if device.peak_flops is None:
        return None
    measured = mfu is not None
    mfu = mfu if measured else ASSUMED_MFU
    peak = device.peak_flops * (1.0 if setup.low_precision else device.fp32_ratio)
    tokens = setup.global_batch * setup.seq_len / setup.world
    flops = shape.flops_per_token(setup.seq_len) * tokens
    if measured:  # the run's MFU already holds recomputation, communication and overheads
        compute = flops / (peak * mfu)
        return Timing(compute, compute, 0.0, 0.0, mfu, True)
    if setup.activation_checkpointing:
        blocks = 6.0 * shape.n_layer * shape.block_params * tokens
        flops += blocks / 3
    compute = flops / (peak * mfu) + LAYER_OVERHEAD_S * shape.n_layer * setup.accumulation
    comm = _comm_seconds(shape, setup, device)
    offload = 0.0
    if setup.offloads:
        local = shape.params / setup.shards
        offload = local * 2 * setup.compute_bytes / PCIE_BYTES_S + local / CPU_ADAM_PARAMS_S
    return Timing(max(compute, comm) + offload, compute, comm, offload, mfu, False)


def _comm_seconds(shape: Shape, setup: Setup, device: Device) -> float:
    """Collective traffic per rank per step over the bus bandwidth (ring: 2(N-1)/N of the data
    for an all-reduce, (N-1)/N for a reduce-scatter or an all-gather)."""
    n = setup.world
    if n == 1 or device.is_cpu:
        return 0.0
    p, c = shape.params, setup.compute_bytes
    ring = (n - 1) / n
    if setup.strategy == "ddp":
        traffic = 2 * ring * p * 4  # fp32 gradients
    elif setup.strategy == "fsdp":
        shard, replicas = setup.shards, setup.fsdp_replicate
        gathers = 2 * setup.accumulation * ((shard - 1) / shard) * p * c  # forward + backward, every micro-batch
        reduce = ((shard - 1) / shard) * p * 4 + 2 * ((replicas - 1) / replicas) * p / shard * 4  # fp32
        traffic = gathers + reduce
    elif setup.stage == 3:
        traffic = 2 * setup.accumulation * ring * p * c + ring * p * c
    else:  # ZeRO-0/1/2: gradients reduced, updated parameters gathered
        traffic = 2 * ring * p * c
    bandwidth = device.intra_bw if setup.nodes == 1 else device.inter_bw
    return traffic / bandwidth


# -- fit --------------------------------------------------------------------------------------
@dataclass
class Fit:
    shape: Shape
    setup: Setup
    device: Device
    estimate: Estimate
    timing: Timing | None

    @property
    def need(self) -> float:
        """Bytes per rank counted against the budget (on the CPU: offloaded states and the process too)."""
        return self.estimate.peak + (self.estimate.host + CPU_RANK_BYTES if self.device.is_cpu else 0.0)

    @property
    def budget(self) -> float:
        share = self.setup.world // self.setup.nodes if self.device.is_cpu else 1
        return self.device.memory * USABLE / max(1, share)

    @property
    def host_budget(self) -> float:
        """Host bytes per rank for offloaded states (GPUs; on the CPU they are in ``need``)."""
        per_node = self.setup.world // self.setup.nodes
        node = self.device.node_memory or GPU_NODE_MEMORY * max(1, per_node) / 8
        return node * HOST_USABLE / max(1, per_node)

    @property
    def fits(self) -> bool:
        host_fits = self.device.is_cpu or self.estimate.host <= self.host_budget
        return self.need <= self.budget and host_fits

    @property
    def cost(self) -> float:
        """Device-seconds per token (what a suggestion minimises); memory when time is unknown."""
        if self.timing is None:
            return self.need
        return self.timing.seconds * self.setup.world / (self.setup.global_batch * self.setup.seq_len)


def plan_fit(shape: Shape, setup: Setup, device: Device, mfu: float | None = None) -> Fit:
    return Fit(shape, setup, device, estimate(shape, setup), step_time(shape, setup, device, mfu))


def _engines(setup: Setup) -> list[Setup]:
    """The engine settings a suggestion may switch to at ``setup``'s world size."""
    plain = "single" if setup.world == 1 else "ddp"
    out = [setup, replace(setup, strategy=plain), replace(setup, strategy="fsdp", fsdp_offload=False),
           replace(setup, strategy="fsdp", fsdp_offload=True)]
    for stage in (1, 2, 3):
        for opt, par in ((False, False), (True, False), (True, True)):
            if par and stage != 3:
                continue
            out.append(replace(setup, strategy="deepspeed", stage=stage, offload_optimizer=opt, offload_param=par))
    if setup.strategy == "fsdp":
        out.append(replace(setup, reshard_after_forward=True))
    return list(dict.fromkeys(out))  # the run's own settings first, each once


def _micro_batches(setup: Setup) -> list[int]:
    """Micro-batch sizes up to the configured one that split the global batch over the ranks."""
    per_rank, rem = divmod(setup.global_batch, setup.world)
    if rem or per_rank < 1:
        return []
    return [m for m in range(min(setup.micro_batch, per_rank), 0, -1) if per_rank % m == 0]


def _candidates(setup: Setup) -> list[Setup]:
    out = []
    for engine in _engines(setup):
        for ac in (False, True):
            for micro in _micro_batches(setup):
                out.append(replace(engine, activation_checkpointing=ac, micro_batch=micro))
    return out


def _world_sizes(setup: Setup, device: Device) -> list[tuple[int, int]]:
    """(world, nodes) to try when nothing fits on the current ranks: doubling up to 64x, filling a
    node to 8 GPUs before adding nodes."""
    per_node = setup.world // setup.nodes
    node_size = per_node if device.is_cpu else max(per_node, 8)
    out = []
    world = setup.world
    for _ in range(6):
        world *= 2
        out.append((world, 1) if world <= node_size else (world, -(-world // node_size)))
    return [(w, n) for w, n in out if w % n == 0]


def cheapest_fit(shape: Shape, setup: Setup, device: Device, mfu: float | None = None) -> Fit | None:
    """The fitting variant of ``setup`` with the lowest device-seconds per token: other engine
    settings, activation checkpointing, smaller micro-batches on the same ranks; failing those,
    more ranks. Costs within 5% of each other count as equal (the time model is not finer than
    that); among them the fewest changes win."""
    def best(setups: list[Setup]) -> Fit | None:
        fits = [f for f in (plan_fit(shape, s, device, mfu) for s in setups) if f.fits]
        if not fits:
            return None
        cheapest = min(f.cost for f in fits)
        near = [f for f in fits if f.cost <= cheapest * 1.05]
        return min(near, key=lambda f: (len(setup.overrides(f.setup)), f.cost, f.need))

    found = best(_candidates(setup))
    if found is not None:
        return found
    for world, nodes in _world_sizes(setup, device):
        found = best(_candidates(replace(setup, world=world, nodes=nodes)))
        if found is not None:
            return found
    return None


def change_text(setup: Setup, other: Setup, launcher: str = "submit") -> str:
    """What to change, as overrides (and the rank count in the launcher's own terms)."""
    parts = setup.overrides(other)
    if other.world != setup.world:
        per_node = other.world // other.nodes
        if launcher == "train":
            parts.append(f"--nproc {other.world}")
        else:
            if per_node != setup.world // setup.nodes:
                parts.append(f"resources.procs_per_node={per_node}")
            if other.nodes != setup.nodes:
                parts.append(f"resources.nodes={other.nodes}")
    return " ".join(parts)


def gb(value: float) -> str:
    return f"{value / 1e9:.1f}"


def seconds(t: Timing | None) -> str:
    if t is None:
        return "step time unknown"
    return f"~{t.seconds:.3g} s/step"
