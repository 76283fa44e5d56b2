"""``nag bench``: time training steps (forward, backward, optimizer) of configs in one process.

Each positional argument is one configuration, parsed by the same LightningCLI parser as
``nag fit`` (``a.yaml+b.yaml`` composes files like repeated ``--config``; ``CONFIG@0,0.1,0.25``
gives one row per skip rate). Steps run on synthetic tokens with the config's model, micro-batch,
context length and precision, through Fabric.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from nag_lightning.errors import NagError
from nag_lightning.reporting import render_table, write_atomically
from nag_lightning.runs import instantiate


def calibrate_skipping(model, batch: torch.Tensor, rate: float, spec: str) -> None:
    residual = model.model.residual
    if not residual.can_skip:
        raise NagError(f"nag bench --skip_rate: {spec} uses {type(residual).__name__}, which has no gate to skip "
                       "sub-layers with; skipping needs the NAG residual strategy.")
    with torch.no_grad(), residual.calibrate(rate):
        model.loss(batch)


class PeakMemory:
    """Peak memory while a block runs: the process's resident set (sampled every 10 ms from
    /proc/self/statm, Linux) and, on a GPU, the allocator's peak."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rss_mb, self.gpu_mb = device, None, None

    def _rss_mb(self) -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> "PeakMemory":
        import threading

        self.rss_mb = self._rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.01):
                now = self._rss_mb()
                if now is not None and (self.rss_mb is None or now > self.rss_mb):
                    self.rss_mb = now

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.device.type == "cuda":
            self.gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20


def time_training_steps(model, batch_size: int, context_length: int, precision: str, steps: int,
                        warmup: int, seed: int = 0, skip_rate: float = 0.0, forward_only: bool = False,
                        spec: str = "", profile_steps: int = 0) -> dict:
    """Milliseconds of each of ``steps`` timed training steps (or forward passes) after ``warmup``
    untimed ones, the realized skip rate (0 without skipping), peak memory over the timed steps
    and, with ``profile_steps``, torch.profiler's operators by self time over that many more steps."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="auto", devices=1, precision=precision)
    model.configure_model()  # compilation and activation checkpointing, as under the Trainer
    optimizer = model.build_optimizer()
    model, optimizer = fabric.setup(model, optimizer)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    batches = [torch.randint(vocab, (batch_size, context_length + 1), generator=generator) for _ in range(4)]
    batches = [fabric.to_device(b) for b in batches]
    sync = torch.cuda.synchronize if fabric.device.type == "cuda" else (lambda: None)
    residual = model.model.residual
    residual.set_training_step(10**9)  # steady state: past any warm-up of the strategy (NAG's alpha)
    if skip_rate > 0:
        with fabric.autocast():
            calibrate_skipping(model, batches[0], skip_rate, spec)

    def one_step(step: int) -> None:
        with fabric.autocast(), torch.set_grad_enabled(not forward_only):
            # `loss` is not `forward`, so Fabric's module wrapper does not autocast it by itself.
            loss = model.loss(batches[step % len(batches)])
        if not forward_only:
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for step in range(warmup):
        one_step(step)
    times, skipped = [], []
    with PeakMemory(fabric.device) as memory:
        for step in range(warmup, warmup + steps):
            sync()
            started = time.perf_counter()
            one_step(step)
            sync()
            times.append((time.perf_counter() - started) * 1e3)
            if skip_rate > 0:  # after the clock stopped: reading the counts synchronises
                skipped.append(residual.skip_stats(batch_size, context_length).skip_rate.item())
    result = {"times": times, "skip_rate": sum(skipped) / len(skipped) if skipped else 0.0,
              "peak_rss_mb": memory.rss_mb, "peak_gpu_mb": memory.gpu_mb, "profile": None}
    if profile_steps:
        result["profile"] = profile_operators(lambda i: one_step(warmup + steps + i), profile_steps, fabric.device)
    return result


def profile_operators(step, steps: int, device: torch.device, top: int = 15) -> list[dict]:
    """torch.profiler over ``steps`` calls of ``step``: the ``top`` operators by self time, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for i in range(steps):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)
    total = sum(getattr(e, attribute) for e in events) or 1.0
    return [{"operator": e.key, "self_ms_per_step": getattr(e, attribute) / 1e3 / steps,
             "share": getattr(e, attribute) / total, "calls_per_step": e.count / steps} for e in events[:top]]


def expand_specs(specs: list[str], skip_rate: float) -> list[tuple[str, float]]:
    """``CONFIG`` (at ``--skip_rate``), ``CONFIG@RATE`` and ``CONFIG@R1,R2,...`` (one row per rate)."""
    expanded = []
    for spec in specs:
        config, _, rates = spec.partition("@")
        try:
            values = [float(r) for r in rates.split(",")] if rates else [skip_rate]
        except ValueError:
            raise NagError(f"nag bench: {spec!r}: the part after @ must be rates like 0.25 or 0,0.1,0.25.") from None
        for rate in values:
            if not 0.0 <= rate < 1.0:
                raise NagError(f"nag bench: {spec!r}: a skip rate must be in [0, 1), got {rate}.")
            expanded.append((config, rate))
    return expanded


def benchmark(specs: list[str], steps: int, warmup: int, skip_rate: float = 0.0, forward_only: bool = False,
              profile_steps: int = 0) -> list[dict]:
    rows = []
    for spec, rate in expand_specs(specs, skip_rate):
        loaded = instantiate(spec.split("+"))
        model, data, precision = loaded.model, loaded.datamodule, loaded.precision
        measured = time_training_steps(model, data.batch_size, data.context_length, precision, steps, warmup,
                                       skip_rate=rate, forward_only=forward_only, spec=spec,
                                       profile_steps=profile_steps)
        times = measured["times"]
        median = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
        rows.append({
            "config": spec + (f"@{rate:g}" if rate else ""),
            "params": sum(p.numel() for p in model.parameters()),
            "backend": model.config.kernels + ("+compile" if model.hparams.compile else ""),
            "precision": precision,
            "mode": "forward" if forward_only else "train",
            "target_skip_rate": rate,
            "skip_rate": measured["skip_rate"],
            "batch_tokens": data.batch_size * data.context_length,
            "ms_per_step_median": median,
            "ms_per_step_iqr": q[2] - q[0],
            "tokens_per_sec": data.batch_size * data.context_length / (median / 1e3),
            "peak_rss_mb": measured["peak_rss_mb"],
            "peak_gpu_mb": measured["peak_gpu_mb"],
        })
        rows[-1]["ratio"] = median / rows[0]["ms_per_step_median"]
        if measured["profile"] is not None:
            rows[-1]["profile"] = measured["profile"]
        del model
    return rows


def format_profiles(rows: list[dict]) -> str:
    """Per row, its top operators by self time (the rows' ``profile``)."""
    blocks = []
    for row in rows:
        if not row.get("profile"):
            continue
        lines = [[p["operator"][:64], f"{p['self_ms_per_step']:.2f}", f"{100 * p['share']:.1f}%",
                  f"{p['calls_per_step']:.0f}"] for p in row["profile"]]
        blocks.append(f"profile of {row['config']} ({row['mode']}, skip {row['skip_rate']:.3f}, "
                      f"{row['ms_per_step_median']:.1f} ms/step unprofiled):\n"
                      + render_table(["operator", "self ms/step", "share", "calls/step"], lines))
    return "\n\n".join(blocks)


def format_table(rows: list[dict]) -> str:
    header = ["config", "params", "backend", "precision", "mode", "skip_rate", "ms/step (median ± IQR/2)", "tokens/s",
              "peak_rss_mb", "ratio"]
    lines = [[r["config"], f"{r['params'] / 1e6:.2f}M", r["backend"], r["precision"], r["mode"], f"{r['skip_rate']:.3f}",
              f"{r['ms_per_step_median']:.1f} ± {r['ms_per_step_iqr'] / 2:.1f}",
              f"{r['tokens_per_sec']:,.0f}", "?" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:,.0f}",
              f"{r['ratio']:.3f}"] for r in rows]
    if any(r["peak_gpu_mb"] is not None for r in rows):
        header.insert(-1, "peak_gpu_mb")
        for line, r in zip(lines, rows):
            line.insert(-1, "?" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:,.0f}")
    return render_table(header, lines)


def add_arguments(parser) -> None:
    """``nag bench``'s options (a jsonargparse parser; see ``nag_lightning/cli.py``)."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("configs", nargs="*", type=str,
                        help="config files; a.yaml+b.yaml composes files; CONFIG@RATE skips RATE of (token, sub-layer) pairs")
    parser.add_argument("--kernels", action="store_true",
                        help="instead of configs, time the NAG update kernels (eager, compiled, Triton) at training sizes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per config")
    parser.add_argument("--json", type=str | None, default=None, help="also write the rows as a JSON list to this path")
    parser.add_argument("--skip_rate", type=float, default=0.0,
                        help="calibrate NAG skip thresholds to skip this fraction of (token, sub-layer) pairs; "
                             "per config: CONFIG@RATE")
    parser.add_argument("--forward", action="store_true", help="time forward passes without gradients (inference)")
    parser.add_argument("--profile", type=int, default=0,
                        help="after timing, profile this many more steps per config (torch.profiler) and print the "
                             "operators by self time (0: off; 3 is plenty)")


def run(args) -> None:
    if args.steps < 1 or args.warmup < 0:
        raise NagError("nag bench: --steps must be >= 1 and --warmup >= 0.")
    if args.kernels:
        from nag_lightning.kernel_bench import benchmark_kernels, format_kernel_table

        rows = benchmark_kernels(args.steps, args.warmup)
        table = format_kernel_table(rows)
    elif not args.configs:
        raise NagError("nag bench: give one or more config files, or --kernels.")
    else:
        if not 0.0 <= args.skip_rate < 1.0:
            raise NagError(f"nag bench: --skip_rate must be in [0, 1), got {args.skip_rate}.")
        if args.profile < 0:
            raise NagError("nag bench: --profile must be >= 0.")
        rows = benchmark(args.configs, args.steps, args.warmup, args.skip_rate, args.forward, args.profile)
        table = format_table(rows)
        if args.profile:
            table += "\n\n" + format_profiles(rows)
    print(table)
    if args.json:
        write_atomically(args.json, json.dumps(rows, indent=2))
