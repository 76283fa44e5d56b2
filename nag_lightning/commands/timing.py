"""The one timer of the micro-benchmarks (the kernels' GB/s, the matmul peak behind MFU):
``torch.utils.benchmark.Timer``, which synchronises CUDA around what it times."""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer


def mean_ms(fn, calls: int, warmup: int) -> float:
    """Mean milliseconds per ``fn()`` over ``calls`` back-to-back calls, after ``warmup`` untimed ones.
    The device is synchronised before and after the calls, not between them: on a GPU the calls
    queue up as in a training step, so the figure is the device's throughput, not a launch's latency."""
    for _ in range(warmup):
        fn()
    # Every thread torch uses (Timer's default is one), as the training steps these figures sit beside.
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(calls).mean * 1e3
