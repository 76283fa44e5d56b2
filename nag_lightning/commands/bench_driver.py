"""What every timing mode of ``nag bench`` shares (training steps in ``bench.py``, generation in
``generation_bench.py``): the ``CONFIG@RATE`` grammar, and the loop of warm-up and timed steps
whose failures stay in their own row."""

from __future__ import annotations

import torch

from nag_lightning.errors import NagError


def expand_specs(specs: list[str], skip_rate: float) -> list[tuple[str, float]]:
    """``CONFIG`` (at ``--skip_rate``), ``CONFIG@RATE`` and ``CONFIG@R1,R2,...`` (one row per rate)."""
    expanded = []
    for spec in specs:
        config, at, rates = spec.rpartition("@")
        if not at:  # no @: the whole spec is the config
            config, rates = spec, ""
        try:
            values = [float(r) for r in rates.split(",")] if rates else [skip_rate]
        except ValueError:
            raise NagError(f"nag bench: {spec!r}: the part after @ must be rates like 0.25 or 0,0.1,0.25.") from None
        for rate in values:
            if not 0.0 <= rate < 1.0:
                raise NagError(f"nag bench: {spec!r}: a skip rate must be in [0, 1), got {rate}.")
            expanded.append((config, rate))
    return expanded



def run_steps(runners: list, steps: int, warmup: int, interleave: bool) -> None:
    """``warmup`` untimed and ``steps`` timed steps of every runner (``warmup_step``, ``timed_step``,
    ``error`` and ``fabric``): one runner after the other, or
    round-robin one step each (``interleave``), so that a machine whose speed drifts (shared
    hosts, thermal limits) moves every configuration alike and their ratios stay fair."""
    order = [runners] if interleave else [[runner] for runner in runners]
    for group in order:
        for runner in group:
            runner.warmup_steps = warmup
        for _ in range(warmup):
            for runner in group:
                _guarded(runner, runner.warmup_step)
        for _ in range(steps):
            for runner in group:
                _guarded(runner, runner.timed_step)


def _guarded(runner, call) -> None:
    """Run ``call`` unless the runner already failed; a failure is kept (its row says why) and the others go on."""
    if runner.error is not None:
        return
    try:
        call()
    except Exception as error:  # noqa: BLE001 - a benchmark row reports any failure and the suite goes on
        runner.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]
        if runner.fabric.device.type == "cuda":
            torch.cuda.empty_cache()
