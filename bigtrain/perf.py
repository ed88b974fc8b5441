"""Peak FLOP/s of the device, the denominator of MFU."""

from __future__ import annotations

import functools
import time

import torch

from bigtrain.dist import LOW_PRECISION

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common training GPUs, by name substring.
_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device_type: str, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` n x n matmul FLOP/s on this device (what MFU on CPU is relative to)."""
    a = torch.randn(n, n, device=device_type).to(dtype)
    b = torch.randn(n, n, device=device_type).to(dtype)
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
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK.items():
            if key in name:
                return value if precision != "fp32" else value / 2
    dtype = LOW_PRECISION.get(precision, torch.float32)
    return measured_matmul_flops(device.type, dtype)
