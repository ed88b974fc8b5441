"""Peak FLOP/s of the device, the denominator of MFU, and how much slower low precision runs on
a CPU without native support for it."""

from __future__ import annotations

import functools
import time

import torch

from bigtrain.dist import LOW_PRECISION

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common training GPUs, by name substring.
_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def _matmul_seconds(device_type: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best-of-``repeats`` time of one n x n matmul (after a warm-up one). Its operands come from a
    private generator: drawing from the global one after a resume restored it would shift every
    later dropout draw."""
    gen = torch.Generator(device=device_type).manual_seed(0)
    a = torch.randn(n, n, device=device_type, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device_type, generator=gen).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


# The largest n measured. A CPU reaches its matmul peak by n = 1024 (these 2 cores, quiet: fp32
# 169 GFLOP/s at 1024, 170 at 2048; bf16 408 and 384), and every process of a run measures it at
# start: n = 2048 took 1.5 s of each start. A GPU needs large operands to fill (at 2048 a matmul is
# launch-bound).
_MAX_N = {"cpu": 1024}


@functools.cache
def measured_matmul_flops(device_type: str, dtype: torch.dtype, max_n: int | None = None, budget_s: float = 0.05,
                          repeats: int = 5) -> float:
    """The best n x n matmul FLOP/s on this device (what MFU on CPU is relative to). n doubles
    from 256 up to ``max_n`` (1024 on CPU, 8192 on GPUs) while one matmul takes under ``budget_s``,
    so a slow path (bf16 on a CPU without bf16 instructions: ~1 GFLOP/s) costs well under a
    second to measure, not minutes."""
    max_n = max_n or _MAX_N.get(device_type, 8192)
    n, best = 256, 0.0
    while True:
        seconds = _matmul_seconds(device_type, dtype, n, repeats)
        best = max(best, 2 * n**3 / seconds)
        if n >= max_n or seconds > budget_s:
            return best
        n *= 2


def peak_flops(device: torch.device, precision: str) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK.items():
            if key in name:
                return value if precision != "fp32" else value / 2
    dtype = LOW_PRECISION.get(precision, torch.float32)
    return measured_matmul_flops(device.type, dtype)


def cpu_low_precision_slowdown(device: torch.device, precision: str) -> float:
    """How many times slower a matmul runs in ``precision`` than in fp32 on this CPU (1.0 on GPUs
    and for fp32). Above ~2, the CPU has no native kernels for it (bf16 needs AVX512-BF16 or AMX)."""
    if device.type != "cpu" or precision not in LOW_PRECISION:
        return 1.0
    return measured_matmul_flops("cpu", torch.float32) / measured_matmul_flops("cpu", LOW_PRECISION[precision])
