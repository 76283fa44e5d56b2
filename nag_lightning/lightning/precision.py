"""``precision: auto``: the Trainer precision this machine runs fastest without changing the maths.

On CUDA: ``bf16-mixed`` where the GPU supports bfloat16, else ``16-mixed``. On a CPU:
``bf16-mixed`` only where the processor computes bfloat16 natively (``avx512_bf16`` or AMX on
x86, or elsewhere a bf16 matmul measured no slower than float32), else ``32-true``: without native
support, torch's CPU bf16 matmul is emulated, about 250x slower than float32 (2-core AVX2 AMD
EPYC, torch 2.13: five 2048^3 products took 287 s in bf16, 1.15 s in float32).

The choice is made on the machine that runs the command, so a checkpoint trained in bf16 on a
GPU is evaluated in float32 on such a CPU unless the user asks otherwise.
"""

from __future__ import annotations

import functools
import platform
import time
import warnings
from pathlib import Path

import torch

AUTO = "auto"
# x86 CPU flags (/proc/cpuinfo) of native bfloat16 arithmetic.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str] | None:
    """The processor's flags from /proc/cpuinfo (Linux), None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


@functools.lru_cache(maxsize=1)
def bf16_matmul_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times slower a bf16 matmul is than a float32 one on this CPU (a few milliseconds
    where bf16 is native; on emulating CPUs up to a second at this size)."""
    a = torch.randn(size, size)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # first call: allocation and dispatch
        started = time.perf_counter()
        for _ in range(repeats):
            x @ x
        times[dtype] = (time.perf_counter() - started) / repeats
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def cpu_native_bf16(flags: set[str] | None = None, machine: str | None = None) -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, why we think so)."""
    flags = cpu_flags() if flags is None else flags
    machine = (platform.machine() if machine is None else machine).lower()
    if machine in ("x86_64", "amd64", "i686", "x86") and flags is not None:
        found = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
        if found:
            return True, f"this CPU has native bf16 ({', '.join(found)})"
        return False, "this CPU has no native bf16 (no avx512_bf16 or AMX)"
    slowdown = bf16_matmul_slowdown()
    if slowdown <= 1.0:
        return True, f"a bf16 matmul measured {1 / slowdown:.1f}x as fast as float32 on this CPU"
    return False, f"a bf16 matmul measured {slowdown:.0f}x slower than float32 on this CPU"


def resolve_precision(requested, accelerator: str | None = "auto", *, cuda_available: bool | None = None,
                      cuda_bf16: bool | None = None, cpu_bf16: tuple[bool, str] | None = None,
                      slowdown: float | None = None) -> tuple[str, str | None]:
    """(the precision to run, a one-line explanation or None). ``auto`` is resolved for the
    accelerator (``cpu``, ``gpu``/``cuda`` or ``auto``); an explicit value is kept, with a warning
    line when it asks for bf16 on a CPU that would emulate it. The keyword arguments replace what
    is probed (tests fake the hardware through them; ``slowdown``: bf16 vs float32 matmul time)."""
    accelerator = str(accelerator or "auto").lower()
    on_cuda = accelerator in ("gpu", "cuda") or accelerator == "auto" and (
        torch.cuda.is_available() if cuda_available is None else cuda_available)
    if str(requested) != AUTO:
        if on_cuda or "bf16" not in str(requested):
            return str(requested), None
        native, why = cpu_native_bf16() if cpu_bf16 is None else cpu_bf16
        if native:
            return str(requested), None
        return str(requested), (f"precision {requested} asked for explicitly, but {why}: bf16 matmuls run "
                                f"~{_slowdown_words(slowdown)} slower than float32 here. `precision: auto` (or 32-true) "
                                "picks float32.")
    if on_cuda:
        bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if bf16:
            return "bf16-mixed", "precision: bf16-mixed (this GPU supports bf16)"
        return "16-mixed", "precision: 16-mixed (this GPU has no bf16)"
    native, why = cpu_native_bf16() if cpu_bf16 is None else cpu_bf16
    if native:
        return "bf16-mixed", f"precision: bf16-mixed ({why})"
    return "32-true", f"precision: 32-true ({why}; bf16 matmuls would be ~{_slowdown_words(slowdown)} slower)"


def _slowdown_words(slowdown: float | None = None) -> str:
    """The bf16 slowdown of this CPU (measured unless given), in words ("250x")."""
    return f"{bf16_matmul_slowdown() if slowdown is None else slowdown:.0f}x"


_said: set[str] = set()


def announce(line: str | None, warning: bool = False) -> None:
    """Say ``line`` once per process (stderr: stdout is the commands' output)."""
    if line is None or line in _said:
        return
    _said.add(line)
    if warning:
        warnings.warn(line, UserWarning, stacklevel=3)
    else:
        import sys

        print(line, file=sys.stderr, flush=True)


def precision_on_this_machine(trained_with: str) -> str:
    """The precision to evaluate a checkpoint with here: the one it trained with, except a 16-bit
    one on a CPU that would emulate bf16 (Lightning runs float16 as bf16 on CPUs), which runs in
    float32 (one line says so). Asked for explicitly (``nag generate --precision``), a precision
    is taken as given instead."""
    if "16" not in str(trained_with) or torch.cuda.is_available():
        return str(trained_with)
    native, why = cpu_native_bf16()
    if native:
        return str(trained_with)
    announce(f"precision: 32-true (the checkpoint trained in {trained_with}, but {why})")
    return "32-true"
